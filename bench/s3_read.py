"""Training clips read from S3: bytes fetched, requests and time per clip, whole-object against ranged reads.

One train clip (8 frames x stride 16, drawn by `evl.video.sampling.train_indices`) is read from an S3 object,
for 1280x720 h264 originals and for their 320 px copies (made by `evl.video.transcode`, as `evl prepare
--transcode` makes them), each way below, on the same clips:
  local:       `read_frames` on the local file: decoding alone, the floor under the others.
  whole:       `read_frames` on the s3:// URI, as training reads it: `storage.read_bytes` fetches the whole
               object in one HEAD and one GET (it opens a pyarrow random-access file, which learns its size
               from the HEAD, and read()s it), then the selective PyAV reader indexes and decodes it in memory.
  stream:      the whole object through a pyarrow input stream (`fs.open_input_stream(inner).readall()`, with
               `storage.resolve(uri)`), then the same PyAV reader on the bytes: a stream does not know its
               size, so pyarrow fetches it one GET per 256 KiB. The alternative to `whole`'s one GET.
  ranged-N:    `storage.open_input` (a pyarrow random-access file: each read() is one ranged GET) handed to
               PyAV as a file object, read N bytes at a time (PyAV's I/O buffer; its default is 32 KiB). The
               reader, `ranged_read`, mirrors `_pyav_seek_read` but takes the frame index from the container
               header instead of demuxing every packet (which would fetch every byte): it seeks to the keyframe
               before the clip and reads packets from there to the clip's last frame.
Every S3 read's frames are checked equal to `local`'s; the script exits non-zero if one differs. decord is no
candidate for ranged reads: given a file object, `decord.VideoReader` reads all of it into memory first.

The store is moto's S3 server on 127.0.0.1, started and stopped here with fake credentials: nothing leaves the
machine. Loopback has next to no latency and no bandwidth limit, so the measured times are the client's work
plus moto's per request. Requests (HEAD and GET) are counted from the server's request log, bytes from what the
reads returned (whole: the object's size). The `est.` column adds an assumed first-byte latency per request
(`--latency-ms`, default 30 ms, within the 20-50 ms typical of S3 in the same region) to each clip's measured
time: one reader thread issues its requests one after another. Transfer time at real S3 bandwidth is not in it.

    python bench/s3_read.py                           # 3 synthetic 10 s 720p videos and copies, 6 clips each
    python bench/s3_read.py --videos 6 --clips 20 --json s3_read.json
    python bench/s3_read.py --read-sizes 32768 262144 1048576 4194304
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from bench.decode import _parallel, transcoded_videos  # noqa: E402

BUCKET = "evl-bench"
# Fake credentials for the local server, in the environment before the first S3 filesystem or client is made.
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
# werkzeug logs each request line, e.g. '"GET /evl-bench/x.mp4 HTTP/1.1" 206 -' (method maybe in ANSI colours),
# before it sends the response body: once a read has returned, its request is in the log.
REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) /" + BUCKET.encode() + rb"[/ ?]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=3, help="synthetic originals (and as many copies)")
    p.add_argument("--clips", type=int, default=6, help="timed clips per video, each read every way")
    p.add_argument("--warmup", type=int, default=1, help="untimed clips first (S3 client, connections)")
    p.add_argument("--size", type=int, nargs=2, default=[1280, 720], metavar=("W", "H"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--grain", type=float, default=4.0,
                   help="per-frame sensor noise of the synthetic scenes (std); 4 gives ~3.5 MB per 10 s at 720p, "
                        "like Kinetics originals (evl.video.synth's default 3 gives ~1.4 MB)")
    p.add_argument("--short-side", type=int, default=320, help="short side of the transcoded copies")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--decode-short-side", type=int, default=None,
                   help="resize while decoding (data.decode_short_side; default: none, as the config's)")
    p.add_argument("--read-sizes", type=int, nargs="+", default=[32768, 1048576],
                   help="bytes per ranged read (PyAV's buffer_size; PyAV's default is 32768)")
    p.add_argument("--latency-ms", type=float, default=30.0, help="assumed S3 first-byte latency per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(ROOT / "data" / "bench_videos"), help="where synthetic videos go")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if min(args.videos, args.clips, args.frames, args.stride, *args.read_sizes) < 1 or args.warmup < 0:
        p.error("--videos, --clips, --frames, --stride and --read-sizes must be positive, --warmup not negative")
    return args


# --------------------------------------------------------------------------------------------------------------
# Videos


def synthetic_originals(args: argparse.Namespace) -> list[str]:
    """Kinetics-like 720p originals, cached by their parameters: evl.video.synth scenes (textured background,
    panning camera, moving object) with enough sensor grain to take a few MB per 10 s, x264 defaults as in
    bench/decode.py (preset medium, crf 23, a keyframe every 250 frames)."""
    width, height = args.size
    frames = round(args.seconds * args.fps)
    folder = Path(args.cache) / f"s3_{width}x{height}_{frames}f_{args.fps}fps_grain{args.grain:g}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"video_{i:03d}.mp4" for i in range(args.videos)]
    todo = [(i, str(p), width, height, frames, args.fps, args.grain) for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        print(f"... writing {len(todo)} synthetic {width}x{height} videos to {folder}", file=sys.stderr, flush=True)
        _parallel(_write_original, todo)
    return [str(p) for p in paths]


def _write_original(job: tuple) -> None:
    import numpy as np

    from evl.video.synth import SYNTH_CLASSES, encode_video, render_video

    i, path, width, height, frames, fps, grain = job
    pixels = render_video(SYNTH_CLASSES[i % len(SYNTH_CLASSES)], np.random.default_rng(i), width, height, frames,
                          grain=grain)
    encode_video(path + ".part.mp4", pixels, fps=fps, options={"crf": "23", "preset": "medium"})
    os.replace(path + ".part.mp4", path)


def transcoded_copies(args: argparse.Namespace, originals: list[str]) -> list[str]:
    """The originals' copies at --short-side with evl.video.transcode's defaults (bench/decode.py's cache)."""
    settings = argparse.Namespace(transcode=args.short_side, copy_keyint=None, copy_crf=None, copy_preset=None,
                                  cache=args.cache)
    copies, _ = transcoded_videos(settings, originals)
    return copies


# --------------------------------------------------------------------------------------------------------------
# The S3 server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RequestLog:
    """The requests the server has logged since the last `take()`."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def take(self) -> dict[str, int]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        counts: dict[str, int] = {}
        for method in REQUEST_LINE.findall(text):
            counts[method.decode()] = counts.get(method.decode(), 0) + 1
        return counts


@contextlib.contextmanager
def moto_s3(log_path: Path):
    """moto's S3 server on a free loopback port with the bench bucket; yields its request log."""
    import boto3

    port = _free_port()
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")  # boto3 and pyarrow read these
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                   str(port)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"moto_server exited with {server.returncode} (log: {log_path})")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start in 60 s") from None
                time.sleep(0.2)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield RequestLog(log_path)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# --------------------------------------------------------------------------------------------------------------
# Readers


class CountingFile:
    """A pyarrow random-access file as a Python file object, counting read() calls and the bytes they return."""

    def __init__(self, raw):
        self.raw, self.reads, self.bytes = raw, 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(None if n is None or n < 0 else n)
        self.reads += 1
        self.bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def seekable(self) -> bool:
        return True


def ranged_read(file, indices, size: tuple[int, int] | None, read_size: int):
    """`_pyav_seek_read` for a file object that fetches what it reads: uint8 [T, H, W, 3].

    The production reader demuxes every packet to learn the frames' timestamps, which reads the whole file.
    The mp4 header (`moov`) already lists every frame in decode order (decode timestamp, keyframe flag, byte
    range), so this one reads the header, seeks to the clip's keyframe and demuxes only from there on.
    """
    import av
    import numpy as np

    from evl.video.decode import _video_stream, decode_wanted

    with av.open(file, buffer_size=read_size) as container:
        stream = _video_stream(container)
        entries = stream.index_entries
        if not len(entries) or stream.start_time is None:
            raise ValueError("no frame index in the header")
        # The header has decode timestamps only. At a constant frame rate the presentation timestamps are the
        # same values shifted by the reordering delay (first pts - first dts), so frame i, the i-th in
        # presentation order, has the i-th smallest: the numbering _pyav_seek_read gets from the packets.
        shift = stream.start_time - entries[0].timestamp
        order = sorted(e.timestamp + shift for e in entries)
        indices = np.minimum(indices, len(order) - 1)
        wanted = {order[i] for i in indices.tolist()}
        keyframe = max((e.timestamp + shift for e in entries if e.is_keyframe and e.timestamp + shift <= min(wanted)),
                       default=order[0])
        container.seek(keyframe, stream=stream, backward=True)  # lands on the last keyframe at or before it
        packets = (p for p in container.demux(stream) if p.size)  # (size 0: the demuxer's end-of-stream packet)
        got = decode_wanted(stream, packets, wanted, size)
    return np.stack([got[order[i]] for i in indices.tolist()])  # [T, H, W, 3]


def read_clip(method: str, local: str, uri: str, indices, info, short_side: int | None):
    """Frames of one clip read `method`'s way, the bytes it fetched and the read() calls on the S3 file (None:
    not counted)."""
    from evl import storage
    from evl.video.decode import _pyav_seek_read, read_frames, resized_size

    size = (info.width, info.height)  # the manifest's, as training passes it
    if method == "local":
        return read_frames(local, indices, short_side, size=size), None, None
    if method == "whole":
        return read_frames(uri, indices, short_side, size=size), os.path.getsize(local), None  # the object
    target = resized_size(*size, short_side) if short_side else size
    target = None if target == size else target  # as read_frames: no resize when the size is unchanged
    if method == "stream":
        fs, inner = storage.resolve(uri)
        with fs.open_input_stream(inner) as raw:
            data = raw.readall()
        return _pyav_seek_read(data, indices, target), len(data), None  # read_frames' first reader, on the bytes
    with storage.open_input(uri) as raw:
        file = CountingFile(raw)
        frames = ranged_read(file, indices, target, int(method.split("-")[1]))
    return frames, file.bytes, file.reads


# --------------------------------------------------------------------------------------------------------------
# Measuring


def measure(args: argparse.Namespace, log: RequestLog, case: str, locals_: list[str], uris: list[str],
            infos: list, methods: list[str], warmup: int) -> tuple[list[dict], int]:
    """Every method on the same clips, in turns (a slow spell of the shared machine hits them alike); `warmup`
    untimed clips first."""
    import numpy as np

    from evl.video.sampling import train_indices

    samples = {m: [] for m in methods}
    mismatches = 0
    for v, (local, uri, info) in enumerate(zip(locals_, uris, infos)):
        rng = np.random.default_rng([args.seed, v])  # fixed clips per video, the same for both cases
        for c in range(warmup + args.clips):
            indices = train_indices(info.num_frames, args.frames, args.stride, rng)
            reference = None
            for method in methods:
                log.take()  # requests of anything before this read are not its
                start = time.perf_counter()
                frames, fetched, reads = read_clip(method, local, uri, indices, info, args.decode_short_side)
                seconds = time.perf_counter() - start
                requests = log.take()
                if reference is None:
                    reference = frames  # "local" comes first
                elif not np.array_equal(frames, reference):
                    mismatches += 1
                    print(f"MISMATCH: {method} on {uri}, frames {indices.tolist()}", file=sys.stderr)
                if c >= warmup:
                    samples[method].append({"s": seconds, "bytes": fetched, "reads": reads,
                                            "requests": sum(requests.values()), "by_method": requests})
        print(f"... {case}: video {v + 1}/{len(uris)} done", file=sys.stderr, flush=True)
        warmup = 0
    object_mb = statistics.mean(os.path.getsize(p) for p in locals_) / 1e6
    return [summarise(case, m, samples[m], object_mb, args.latency_ms) for m in methods], mismatches


def summarise(case: str, method: str, samples: list[dict], object_mb: float, latency_ms: float) -> dict:
    fetched = [s["bytes"] for s in samples if s["bytes"] is not None]
    reads = [s["reads"] for s in samples if s["reads"] is not None]
    heads = [s["by_method"].get("HEAD", 0) for s in samples]
    gets = [s["by_method"].get("GET", 0) for s in samples]
    return {
        "case": case, "method": method, "clips": len(samples), "object_mb": object_mb,
        "fetched_mb_per_clip": statistics.mean(fetched) / 1e6 if fetched else 0.0,
        "requests_per_clip": statistics.mean(s["requests"] for s in samples),
        "head_per_clip": statistics.mean(heads), "get_per_clip": statistics.mean(gets),
        "read_calls_per_clip": statistics.mean(reads) if reads else None,  # on the S3 file; a read at its end is
        # answered without a GET
        "ms_per_clip": 1000 * statistics.median(s["s"] for s in samples),
        "est_ms_per_clip": statistics.median(1000 * s["s"] + latency_ms * s["requests"] for s in samples),
    }


# --------------------------------------------------------------------------------------------------------------
# Report


def _label(method: str) -> str:
    if method.startswith("ranged-"):
        n = int(method.split("-")[1])
        return f"ranged, {n // 1048576} MiB reads" if n % 1048576 == 0 else f"ranged, {n // 1024} KiB reads"
    return {"local": "local disk (decode only)", "whole": "whole object, `read_bytes` (one GET)",
            "stream": "whole object, input stream"}[method]


def format_table(rows: list[dict], latency_ms: float) -> str:
    lines = [f"| videos | read | MB per object | MB fetched per clip | requests per clip (HEAD + GET) | "
             f"ms per clip, loopback (median) | est. ms per clip at {latency_ms:g} ms/request |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fetched = requests = est = "-"  # local reads fetch nothing
        if r["method"] != "local":
            fetched = f"{r['fetched_mb_per_clip']:.2f}"
            requests = f"{r['requests_per_clip']:.3g} ({r['head_per_clip']:.3g} + {r['get_per_clip']:.3g})"
            est = f"{r['est_ms_per_clip']:.0f}"
        lines.append(f"| {r['case']} | {_label(r['method'])} | {r['object_mb']:.2f} | {fetched} | {requests} | "
                     f"{r['ms_per_clip']:.0f} | {est} |")
    return "\n".join(lines)


TIE = 0.05  # estimates this close are a tie on a shared machine


def kept(rows: list[dict]) -> dict[str, str]:
    """Per case, the S3 read with the lowest estimated time per clip on real S3; of reads within TIE of it, the
    first in the table (a whole-object read before a ranged one: it needs no new reader)."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        remote = [r for r in rows if r["case"] == case and r["method"] != "local"]
        best = min(r["est_ms_per_clip"] for r in remote)
        out[case] = next(r["method"] for r in remote if r["est_ms_per_clip"] <= best * (1 + TIE))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from evl import storage
    from evl.video.decode import probe

    originals = synthetic_originals(args)
    copies = transcoded_copies(args, originals)
    # The copies first: their warm-up clips (S3 client, connections) are cheap to decode.
    cases = {f"{args.short_side} px copies": copies, f"{args.size[0]}x{args.size[1]} originals": originals}
    methods = ["local", "whole", "stream"] + [f"ranged-{n}" for n in args.read_sizes]
    rows, mismatches = [], 0
    log_path = Path(args.cache) / "s3_read_moto.log"
    with moto_s3(log_path) as log:
        for case, paths in cases.items():
            infos = [probe(p) for p in paths]  # what `evl prepare` puts in the manifest; not timed
            uris = []
            for p in paths:
                uris.append(f"s3://{BUCKET}/{case.split()[-1]}/{Path(p).name}")
                storage.upload_file(p, uris[-1])
            print(f"... {case}: {len(paths)} videos of {infos[0].num_frames} frames, {infos[0].width}x"
                  f"{infos[0].height}, {args.clips} clips each", file=sys.stderr, flush=True)
            case_rows, bad = measure(args, log, case, paths, uris, infos, methods, args.warmup if not rows else 0)
            rows += case_rows
            mismatches += bad
    choice = kept(rows)
    print(f"\n{len(originals)} videos per case, {args.clips} clips each ({args.frames} frames x stride "
          f"{args.stride}), {os.cpu_count()} CPU cores, moto S3 on 127.0.0.1\n")
    print(format_table(rows, args.latency_ms))
    print()
    for case, method in choice.items():
        print(f"{case}: keep {_label(method)} (lowest estimated time per clip at {args.latency_ms:g} ms/request, "
              f"within {TIE:.0%})")
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows, "kept": choice}, indent=1))
        print(f"\nwrote {args.json}")
    if mismatches:
        print(f"FAILED: {mismatches} clips read by S3 differ from the local decode", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
