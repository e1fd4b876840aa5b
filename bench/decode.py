"""Train-mode clip throughput per CPU core: this project's clip pipeline vs the reference's.

Every method draws the same kind of clips (train sampling, 8 frames x stride 16 by default) from the same
videos in the same run, and ends with a RandAugment + RandomResizedCrop-to-224 clip:
  reference:  what the reference implementation does for every clip: PyAV decodes every frame of the video
              and keeps them all, the sampled ones are converted to RGB, then float [0, 1]; RandAugment on
              PIL images (the same op on every frame, bicubic resampling as the reference's default), back
              to float, CLIP normalisation at full size, crop + bilinear interpolation of the float clip.
  decord:     decord's get_batch (seeks to the keyframe before the wanted frames, decodes up to the last of
              them, converts only those), then this project's augmentation.
  evl:        this project's pipeline: evl.video.decode.read_frames (like decord, and also skips decoding
              the non-reference frames that are not wanted; pixel-identical), then evl.video.transforms.
              TrainTransform (RandAugment with OpenCV for the affine ops and sharpness, crop on uint8;
              normalisation is left to the trainer's GPU).
With --transcode S, the videos are also re-encoded as `evl prepare --transcode DEST --short-side S` does
(evl.video.transcode: h264, short side S, a keyframe every --copy-keyint frames; cached), and
`evl-transcoded` (this project's pipeline on those copies) runs in the same run, compared with `evl` on the
originals against the 3x target.
Each worker is one process with one decoder thread and one torch/OpenCV thread, so clips/s per worker is
clips/s per core. Per-phase CPU times (decode, augment) show where the time goes.

    python bench/decode.py                        # synthetic 10 s 340x256 h264 clips (cached in data/)
    python bench/decode.py --size 1280 720 --num-videos 6 --transcode 320   # 720p originals vs copies
    python bench/decode.py --videos /k400/val     # your own videos (a folder or files)
    python bench/decode.py --workers 1 2 --clips 60 --json bench.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("reference", "decord", "evl")
TRANSCODED = tuple(f"{m}-transcoded" for m in METHODS)  # the same methods on the transcoded copies
TRANSCODE_TARGET = 3.0  # evl-transcoded / evl, clips/s per core
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", nargs="+", help="video files or folders (default: synthetic videos)")
    p.add_argument("--cache", default=str(ROOT / "data" / "bench_videos"), help="where synthetic videos go")
    p.add_argument("--num-videos", type=int, default=12)
    p.add_argument("--size", type=int, nargs=2, default=[340, 256], metavar=("W", "H"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--keyint", type=int, default=None, help="x264 keyframe interval (default: x264's 250)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--rand-augment", default="rand-m7-n4-mstd0.5-inc1", help="'' to disable")
    p.add_argument("--reference-resample", choices=("bicubic", "bilinear"), default="bicubic",
                   help="resampling of the baseline's RandAugment affine ops (the reference's default: bicubic; "
                        "this project's: bilinear)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker process counts to run")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS + TRANSCODED,
                   help="default: reference decord evl, plus evl-transcoded with --transcode")
    p.add_argument("--transcode", type=int, default=None, metavar="SHORT_SIDE",
                   help="also re-encode the videos to this short side (as evl prepare --transcode) and run "
                        "evl-transcoded on the copies")
    p.add_argument("--copy-keyint", type=int, default=None, help="keyframe interval of the copies "
                                                                  "(default: evl.video.transcode's)")
    p.add_argument("--copy-preset", default=None, help="x264 preset of the copies (default: evl.video.transcode's)")
    p.add_argument("--copy-crf", type=int, default=None, help="x264 crf of the copies (default: evl.video.transcode's)")
    p.add_argument("--clips", type=int, default=48, help="timed clips per worker per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed clips per worker first")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = list(METHODS) + (["evl-transcoded"] if args.transcode else [])
    if not args.transcode and any(m in TRANSCODED for m in args.methods):
        p.error("the *-transcoded methods need --transcode SHORT_SIDE")
    return args


# --------------------------------------------------------------------------------------------------------------
# Videos


def synthetic_videos(args: argparse.Namespace) -> list[str]:
    """Kinetics-like clips: h264 (x264 defaults: preset medium, crf 23, keyframes every 250 frames, as the CVDF
    mirror's ffmpeg-cut files have), cached by their parameters. The content is evl.video.synth's: a textured
    background under a slowly panning camera, per-frame sensor grain, a moving object; there is no real data
    here, so these stand in for real videos of that size (real ones have more detail: more bits per frame)."""
    width, height = args.size
    frames = round(args.seconds * args.fps)
    tag = f"{width}x{height}_{frames}f_{args.fps}fps_g{args.keyint or 'default'}"
    folder = Path(args.cache) / tag
    folder.mkdir(parents=True, exist_ok=True)
    options = {"crf": "23", "preset": "medium", **({"g": str(args.keyint)} if args.keyint else {})}
    paths = [folder / f"bench_{i:03d}.mp4" for i in range(args.num_videos)]
    todo = [(i, str(p), width, height, frames, args.fps, options) for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        print(f"writing {len(todo)} synthetic {width}x{height} videos of {frames} frames to {folder} ...", flush=True)
        _parallel(_write_synthetic, todo)
    return [str(p) for p in paths]


def _write_synthetic(job: tuple) -> None:
    import numpy as np

    from evl.video.synth import SYNTH_CLASSES, encode_video, render_video

    i, path, width, height, frames, fps, options = job
    pixels = render_video(SYNTH_CLASSES[i % len(SYNTH_CLASSES)], np.random.default_rng(i), width, height, frames)
    encode_video(path + ".part.mp4", pixels, fps=fps, options=options)
    os.replace(path + ".part.mp4", path)


def transcoded_videos(args: argparse.Namespace, videos: list[str]) -> tuple[list[str], dict]:
    """Copies of `videos` made by evl.video.transcode (as `evl prepare --transcode`), cached beside them."""
    from evl.video.transcode import TranscodeSettings

    defaults = TranscodeSettings()
    settings = TranscodeSettings(short_side=args.transcode, keyint=args.copy_keyint or defaults.keyint,
                                 crf=defaults.crf if args.copy_crf is None else args.copy_crf,
                                 preset=args.copy_preset or defaults.preset)
    settings.validate()
    tag = f"s{settings.short_side}_g{settings.keyint}_crf{settings.crf}_{settings.preset}"
    jobs = []
    for video in videos:
        source = Path(video).resolve()
        key = hashlib.sha256(str(source).encode()).hexdigest()[:10]  # one copy per original file
        jobs.append((video, str(Path(args.cache) / "transcoded" / tag / f"{source.stem}_{key}.mp4"), settings))
    todo = [job for job in jobs if not Path(job[1]).is_file()]  # copies are committed only when complete
    seconds = []
    if todo:
        print(f"transcoding {len(todo)} videos to short side {settings.short_side} ...", flush=True)
        seconds = _parallel(_transcode_one, todo)
    setup = {"short_side": settings.short_side, "keyint": settings.keyint, "crf": settings.crf,
             "preset": settings.preset, "example": jobs[0][1] if jobs else None,
             "transcode_s_per_video": sum(seconds) / len(seconds) if seconds else None,
             "mbytes_original": sum(os.path.getsize(v) for v in videos) / 1e6,
             "mbytes_transcoded": sum(os.path.getsize(j[1]) for j in jobs) / 1e6}
    return [j[1] for j in jobs], setup


def _transcode_one(job: tuple) -> float:
    """Re-encode one video; returns the CPU seconds it took (one thread)."""
    from evl.video.transcode import transcode_video

    src, dst, settings = job
    start = time.process_time()
    transcode_video(src, dst, settings)
    return time.process_time() - start


def _cores() -> int:
    return max(1, os.cpu_count() or 1)


def _parallel(fn, jobs: list) -> list:
    """fn over jobs, one process per core (spawned: no forked torch/OpenCV state)."""
    if len(jobs) == 1 or _cores() == 1:
        return [fn(job) for job in jobs]
    with mp.get_context("spawn").Pool(min(len(jobs), _cores()), initializer=_single_threaded) as pool:
        return pool.map(fn, jobs, chunksize=1)


def user_videos(items: list[str]) -> list[str]:
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS)
        else:
            paths.append(str(p))
    return paths


# --------------------------------------------------------------------------------------------------------------
# The two decoders


def reference_frames(path: str, num_frames: int, stride: int, rng):
    """The reference's way: decode the whole video with PyAV, keep every frame, convert the sampled ones."""
    import av
    import numpy as np

    from evl.video.sampling import train_indices

    container = av.open(path)
    stream = container.streams.video[0]
    stream.thread_count = 1
    decoded = {frame.pts: frame for frame in container.decode(stream)}
    container.close()
    frames = [decoded[k] for k in sorted(decoded)]
    indices = train_indices(len(frames), num_frames, stride, rng)
    return np.stack([frames[i].to_rgb().to_ndarray() for i in indices])  # [T, H, W, 3]


class ReferenceTransform:
    """The reference's train augmentation of uint8 frames [T, H, W, 3] -> normalised float clip [3, T, S, S]."""

    def __init__(self, crop: int, rand_augment: str | None, resample: str = "bicubic"):
        import torch
        from PIL import Image
        from timm.data.auto_augment import rand_augment_transform

        from evl.video.transforms import CLIP_MEAN, CLIP_STD

        self.crop = crop
        hparams = {"translate_const": int(crop * 0.45), "img_mean": tuple(round(255 * m) for m in CLIP_MEAN),
                   "interpolation": {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[resample]}
        self.augment = rand_augment_transform(rand_augment, hparams) if rand_augment else None
        self.mean, self.std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)

    def rand_augment(self, images: list, rng) -> list:
        """Each drawn op applied to every frame with the same decisions (Python's random re-seeded per frame)."""
        import random

        ops = rng.choice(len(self.augment.ops), self.augment.num_layers)
        for i in ops:
            seed = int(rng.integers(2**63))
            for k, image in enumerate(images):
                random.seed(seed)
                images[k] = self.augment.ops[i](image)
        return images

    def __call__(self, frames, rng):
        import torch
        import torch.nn.functional as F
        import torchvision.transforms.functional as TF

        from evl.video.transforms import sample_crop_box

        clip = torch.as_tensor(frames).float() / 255  # [T, H, W, 3]
        if self.augment is not None:
            images = self.rand_augment([TF.to_pil_image(f.permute(2, 0, 1)) for f in clip], rng)
            clip = torch.stack([TF.to_tensor(image) for image in images]).permute(0, 2, 3, 1)
        clip = ((clip - self.mean) / self.std).permute(3, 0, 1, 2)  # [3, T, H, W]
        top, left, h, w = sample_crop_box(clip.shape[-2], clip.shape[-1], rng)
        return F.interpolate(clip[:, :, top:top + h, left:left + w], size=(self.crop, self.crop), mode="bilinear",
                             align_corners=False)  # [3, T, S, S]


def decord_frames(path: str, num_frames: int, stride: int, rng, info):
    import numpy as np

    from evl.video.decode import _decord_read
    from evl.video.sampling import train_indices

    indices = train_indices(info.num_frames, num_frames, stride, rng)
    return _decord_read(path, np.asarray(indices), None, 1)  # [T, H, W, 3]


def evl_frames(path: str, num_frames: int, stride: int, rng, info):
    from evl.video.decode import read_frames
    from evl.video.sampling import train_indices

    indices = train_indices(info.num_frames, num_frames, stride, rng)
    return read_frames(path, indices, size=(info.width, info.height))  # [T, H, W, 3]


# --------------------------------------------------------------------------------------------------------------
# Workers


def _worker(job: dict) -> dict:
    """Run one method for `clips` clips in this process; returns timings."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch

    from evl.video.transforms import TrainTransform

    torch.set_num_threads(1)
    rng = np.random.default_rng(job["seed"])
    method = job["method"].removesuffix("-transcoded")  # the same method, on the copies' files
    if method == "reference":
        transform = ReferenceTransform(job["crop"], job["rand_augment"] or None, job["reference_resample"])
        shape = (3, job["frames"], job["crop"], job["crop"])
    else:
        transform = TrainTransform(job["crop"], job["rand_augment"] or None)
        shape = (job["frames"], 3, job["crop"], job["crop"])
    videos, infos = job["videos"], job["infos"]

    def one(i: int) -> tuple[float, float]:
        k = (job["seed"] + i) % len(videos)
        t0 = time.process_time()
        read = {"reference": lambda: reference_frames(videos[k], job["frames"], job["stride"], rng),
                "decord": lambda: decord_frames(videos[k], job["frames"], job["stride"], rng, infos[k]),
                "evl": lambda: evl_frames(videos[k], job["frames"], job["stride"], rng, infos[k])}
        frames = read[method]()
        t1 = time.process_time()
        clip = transform(frames, rng)
        assert tuple(clip.shape) == shape
        return t1 - t0, time.process_time() - t1

    for i in range(job["warmup"]):
        one(i)
    job["barrier"].wait()  # all workers of a run start timing together
    wall0, cpu0 = time.perf_counter(), time.process_time()
    decode = augment = 0.0
    for i in range(job["clips"]):
        d, a = one(job["warmup"] + i)
        decode += d
        augment += a
    return {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0, "decode_s": decode,
            "augment_s": augment, "clips": job["clips"]}


def run_methods(methods: list[str], workers: int, args: argparse.Namespace, sets: dict[str, tuple]) -> list[dict]:
    """Each method in turn on one pool of `workers` processes (started once: importing torch is slow).

    sets: "original" (and "transcoded") -> (video paths, their probed infos).
    """
    ctx = mp.get_context("spawn")
    results = []
    with ctx.Manager() as manager, ctx.Pool(workers, initializer=_single_threaded) as pool:
        for method in methods:
            barrier = manager.Barrier(workers)
            videos, infos = sets["transcoded" if method in TRANSCODED else "original"]
            jobs = [{"method": method, "seed": w, "videos": videos, "infos": infos, "frames": args.frames,
                     "stride": args.stride, "crop": args.crop, "rand_augment": args.rand_augment,
                     "reference_resample": args.reference_resample,
                     "clips": args.clips, "warmup": args.warmup, "barrier": barrier} for w in range(workers)]
            results.append(_summarise(method, workers, pool.map(_worker, jobs, chunksize=1)))
    return results


def _summarise(method: str, workers: int, results: list[dict]) -> dict:
    clips = sum(r["clips"] for r in results)
    wall = max(r["wall_s"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "method": method, "workers": workers, "clips": clips,
        "clips_per_s": clips / wall,
        "clips_per_s_per_core": clips / wall / workers,
        "clips_per_cpu_s": clips / cpu,
        "decode_ms_per_clip": 1000 * sum(r["decode_s"] for r in results) / clips,
        "augment_ms_per_clip": 1000 * sum(r["augment_s"] for r in results) / clips,
    }


def _single_threaded() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


# --------------------------------------------------------------------------------------------------------------
# Report


def table(results: list[dict]) -> str:
    head = (f"{'method':<16}{'workers':>8}{'clips/s':>9}{'per core':>10}{'per CPU-s':>11}"
            f"{'decode ms':>11}{'augment ms':>12}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['method']:<16}{r['workers']:>8}{r['clips_per_s']:>9.1f}{r['clips_per_s_per_core']:>10.1f}"
                     f"{r['clips_per_cpu_s']:>11.1f}{r['decode_ms_per_clip']:>11.1f}{r['augment_ms_per_clip']:>12.1f}")
    return "\n".join(lines)


def speedups(results: list[dict], baseline: str = "reference",
             pairs: dict[str, str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """ours / base, per method and worker count: per core (wall), per CPU-second, each phase alone.

    Every method other than `baseline` against it, or with `pairs`, each method against its own base.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    by = {(r["method"], r["workers"]): r for r in results}
    for (method, w), ours in sorted(by.items()):
        base_name = pairs.get(method) if pairs is not None else (None if method == baseline else baseline)
        base = by.get((base_name, w))
        if base is None:
            continue
        out.setdefault(method, {})[str(w)] = {
            "per_core": ours["clips_per_s_per_core"] / base["clips_per_s_per_core"],
            "per_cpu_s": ours["clips_per_cpu_s"] / base["clips_per_cpu_s"],
            "decode_only": base["decode_ms_per_clip"] / ours["decode_ms_per_clip"],
            "augment_only": base["augment_ms_per_clip"] / ours["augment_ms_per_clip"],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from evl.video.decode import probe

    videos = user_videos(args.videos) if args.videos else synthetic_videos(args)
    infos = [probe(v) for v in videos]  # what `evl prepare` puts in the manifest; not timed
    sets = {"original": (videos, infos)}
    setup = {"videos": len(videos), "example": videos[0], "size": [infos[0].width, infos[0].height],
             "video_frames": infos[0].num_frames, "frames": args.frames, "stride": args.stride,
             "crop": args.crop, "rand_augment": args.rand_augment, "clips_per_worker": args.clips,
             "reference_resample": args.reference_resample, "cpu_count": os.cpu_count()}
    if args.transcode:
        copies, setup["transcoded"] = transcoded_videos(args, videos)
        copy_infos = [probe(v) for v in copies]  # `evl prepare --transcode` writes these into the manifest
        if [i.num_frames for i in copy_infos] != [i.num_frames for i in infos]:
            raise SystemExit("a transcoded copy does not have its original's frame count")
        sets["transcoded"] = (copies, copy_infos)
        setup["transcoded"]["size"] = [copy_infos[0].width, copy_infos[0].height]
    results = [r for w in args.workers for r in run_methods(args.methods, w, args, sets)]
    pairs = {m: m.removesuffix("-transcoded") for m in args.methods if m in TRANSCODED}
    report = {"setup": setup, "results": results,
              "speedup": speedups([r for r in results if r["method"] in METHODS]),
              "transcoded_vs_original": speedups(results, pairs=pairs)}
    report["transcode_target"] = {"target_per_core": TRANSCODE_TARGET, **{
        w: s["per_core"] >= TRANSCODE_TARGET
        for w, s in report["transcoded_vs_original"].get("evl-transcoded", {}).items()}}
    print(table(results))
    for method, by_workers in report["speedup"].items():
        for w, s in by_workers.items():
            print(f"{method} vs reference, {w} worker(s): {s['per_core']:.2f}x per core (wall), "
                  f"{s['per_cpu_s']:.2f}x per CPU-second; decoding alone {s['decode_only']:.2f}x, "
                  f"augmentation alone {s['augment_only']:.2f}x")
    if args.transcode:
        t = setup["transcoded"]
        print(f"transcoded copies: {t['size'][0]}x{t['size'][1]}, keyframe every {t['keyint']} frames, "
              f"crf {t['crf']} {t['preset']}; {t['mbytes_transcoded']:.1f} MB vs {t['mbytes_original']:.1f} MB "
              f"originals" + (f"; {t['transcode_s_per_video']:.1f} CPU-s per video to make"
                              if t["transcode_s_per_video"] else " (cached)"))
    for method, by_workers in report["transcoded_vs_original"].items():
        for w, s in by_workers.items():
            verdict = ""
            if method == "evl-transcoded":
                meets = "meets" if s["per_core"] >= TRANSCODE_TARGET else "MISSES"
                verdict = f" (target {TRANSCODE_TARGET:g}x: {meets})"
            print(f"{method} vs {pairs[method]} on the originals, {w} worker(s): {s['per_core']:.2f}x per core "
                  f"(wall){verdict}, {s['per_cpu_s']:.2f}x per CPU-second; decoding alone "
                  f"{s['decode_only']:.2f}x, augmentation alone {s['augment_only']:.2f}x")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
