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
Each worker is one process with one decoder thread and one torch/OpenCV thread, so clips/s per worker is
clips/s per core. Per-phase CPU times (decode, augment) show where the time goes.

    python bench/decode.py                        # synthetic 10 s 340x256 h264 clips (cached in data/)
    python bench/decode.py --videos /k400/val     # your own videos (a folder or files)
    python bench/decode.py --workers 1 2 --clips 60 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("reference", "decord", "evl")
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
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--clips", type=int, default=48, help="timed clips per worker per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed clips per worker first")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Videos


def synthetic_videos(args: argparse.Namespace) -> list[str]:
    """Kinetics-like clips: h264 (x264 defaults: preset medium, crf 23), cached by their parameters."""
    import numpy as np

    from evl.video.synth import SYNTH_CLASSES, encode_video, render_video

    width, height = args.size
    frames = round(args.seconds * args.fps)
    tag = f"{width}x{height}_{frames}f_{args.fps}fps_g{args.keyint or 'default'}"
    folder = Path(args.cache) / tag
    folder.mkdir(parents=True, exist_ok=True)
    options = {"crf": "23", "preset": "medium", **({"g": str(args.keyint)} if args.keyint else {})}
    paths = []
    for i in range(args.num_videos):
        path = folder / f"bench_{i:03d}.mp4"
        if not path.is_file():
            name = SYNTH_CLASSES[i % len(SYNTH_CLASSES)]
            pixels = render_video(name, np.random.default_rng(i), width, height, frames)
            encode_video(str(path) + ".part.mp4", pixels, fps=args.fps, options=options)
            os.replace(str(path) + ".part.mp4", path)
        paths.append(str(path))
    return paths


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
    if job["method"] == "reference":
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
        frames = read[job["method"]]()
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


def run_methods(methods: list[str], workers: int, args: argparse.Namespace, videos: list[str],
                infos: list) -> list[dict]:
    """Each method in turn on one pool of `workers` processes (started once: importing torch is slow)."""
    ctx = mp.get_context("spawn")
    results = []
    with ctx.Manager() as manager, ctx.Pool(workers, initializer=_single_threaded) as pool:
        for method in methods:
            barrier = manager.Barrier(workers)
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
    head = (f"{'method':<10}{'workers':>8}{'clips/s':>9}{'per core':>10}{'per CPU-s':>11}"
            f"{'decode ms':>11}{'augment ms':>12}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['method']:<10}{r['workers']:>8}{r['clips_per_s']:>9.1f}{r['clips_per_s_per_core']:>10.1f}"
                     f"{r['clips_per_cpu_s']:>11.1f}{r['decode_ms_per_clip']:>11.1f}{r['augment_ms_per_clip']:>12.1f}")
    return "\n".join(lines)


def speedups(results: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """method / reference, per method and worker count: per core (wall), per CPU-second, each phase alone."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    by = {(r["method"], r["workers"]): r for r in results}
    for (method, w), ours in sorted(by.items()):
        ref = by.get(("reference", w))
        if method == "reference" or ref is None:
            continue
        out.setdefault(method, {})[str(w)] = {
            "per_core": ours["clips_per_s_per_core"] / ref["clips_per_s_per_core"],
            "per_cpu_s": ours["clips_per_cpu_s"] / ref["clips_per_cpu_s"],
            "decode_only": ref["decode_ms_per_clip"] / ours["decode_ms_per_clip"],
            "augment_only": ref["augment_ms_per_clip"] / ours["augment_ms_per_clip"],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from evl.video.decode import probe

    videos = user_videos(args.videos) if args.videos else synthetic_videos(args)
    infos = [probe(v) for v in videos]  # what `evl prepare` puts in the manifest; not timed
    results = [r for w in args.workers for r in run_methods(args.methods, w, args, videos, infos)]
    report = {
        "setup": {"videos": len(videos), "example": videos[0], "size": [infos[0].width, infos[0].height],
                  "video_frames": infos[0].num_frames, "frames": args.frames, "stride": args.stride,
                  "crop": args.crop, "rand_augment": args.rand_augment, "clips_per_worker": args.clips,
                  "reference_resample": args.reference_resample,
                  "cpu_count": os.cpu_count()},
        "results": results,
        "speedup": speedups(results),
    }
    print(table(results))
    for method, by_workers in report["speedup"].items():
        for w, s in by_workers.items():
            print(f"{method} vs reference, {w} worker(s): {s['per_core']:.2f}x per core (wall), "
                  f"{s['per_cpu_s']:.2f}x per CPU-second; decoding alone {s['decode_only']:.2f}x, "
                  f"augmentation alone {s['augment_only']:.2f}x")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
