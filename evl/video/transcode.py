"""Training-ready copies of videos: h264 at a small short side, keyframes close together, same frames.

Kinetics as users download it is at its original resolution (often 1280x720 or more), so every training clip
decodes several times the pixels its 224 px crops need, and x264's default keyframe interval (250 frames)
makes the decoder start far before the frames a clip wants. `transcode_video` re-encodes one video once:
  * every decoded frame is kept, in presentation order, none added or dropped, and the copy is checked to hold
    exactly as many frames as the original, so a manifest's frame indices mean the same frames in both;
  * the frame rate is the original's average rate, as a constant rate. A variable-frame-rate original keeps
    its frames (and count) but gets evenly spaced timestamps: frame i of the copy is frame i of the original,
    only the time between frames is evened out (this project, like the reference, samples clips by frame
    index, never by timestamp);
  * the short side is scaled to `short_side` (never up: a smaller video keeps its size), the long side keeps
    the aspect, both rounded to even numbers (yuv420p needs them);
  * h264 (libx264, yuv420p), a keyframe at least every `keyint` frames, audio and other streams dropped.

A copy is written under a temporary name and committed only once it has been checked (decodes, right frame
count and size): a killed job never leaves a half-written file under the real name. Local destinations are
renamed into place; object stores (s3://, gs://, ... through pyarrow filesystems) publish an object only when
its upload completes, so the checked local file is uploaded straight to its final key. `check_copy` tells a
resumed job which copies are already complete. No Ray here: `workflows/prepare.py` runs this on Ray Data.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction

import av
import pyarrow.fs as pafs

from evl import storage
from evl.video.decode import VideoError, VideoInfo, probe

OUTPUT_EXTENSION = ".mp4"
PART_SUFFIX = ".part"  # temporary name beside the final one (not a video extension: never listed as a video)

# Keyframe interval, in frames. The reader (evl.video.decode) starts decoding at the last keyframe before a
# clip's first frame, so the interval bounds the lead-in a clip pays for and never uses: at 32 it is at most
# 31 frames (about 1 s) however long the video and whatever GOP its original had (x264's default is 250 frames;
# some sources have one keyframe per minute). Shorter buys nothing with this reader: it decodes every
# reference frame between a clip's first and last frame anyway, and keyframes are the costliest frames to
# decode and store. Measured on 10 s 1280x720 videos copied at 320 px (bench/README.md): a train clip
# (8 x stride 16) decodes in 45-56 ms whatever the interval from 8 to 250, while the files grow fast below
# 32 (vs 250: +13% at 64, +33% at 32, +80% at 16, +170% at 8), and every byte is read again at every epoch.
DEFAULT_KEYINT = 32
DEFAULT_SHORT_SIDE = 320  # common Kinetics preprocessing; leaves room for the 224 px crops' scale jitter
# x264 quality: crf 23 is x264's default and visually clean at 320 px. Preset "veryfast": the copy is made
# once per dataset on CPU nodes, and on the same videos "veryfast" took 3.6 CPU-s per video against 5.2 for
# "medium", whose files at crf 23 came out 16% larger (it spends the bits on quality) and decoded 15% slower.
DEFAULT_CRF = 23
DEFAULT_PRESET = "veryfast"
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class TranscodeSettings:
    short_side: int = DEFAULT_SHORT_SIDE
    keyint: int = DEFAULT_KEYINT
    crf: int = DEFAULT_CRF
    preset: str = DEFAULT_PRESET
    threads: int = 1  # x264 and decoder threads: 1 is the most work per core when one task runs per core

    def validate(self) -> None:
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"short side must be even and >= 16 (yuv420p), got {self.short_side}")
        if self.keyint < 1:
            raise ValueError(f"keyframe interval must be >= 1 frame, got {self.keyint}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: automatic), got {self.threads}")


@dataclass(frozen=True)
class Transcoded:
    """A copy that is complete: where it is, what it holds, and whether this call wrote it."""

    path: str
    status: str  # "encoded" (written now) or "kept" (already complete)
    num_frames: int
    fps: float
    width: int
    height: int
    bytes: int
    seconds: float  # wall time spent on this video


# --------------------------------------------------------------------------------------------------------------
# Names and sizes


def transcoded_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the copy: short side scaled down to `short_side` (never up), aspect kept, both even."""
    if min(width, height) <= short_side:
        return max(2, width - width % 2), max(2, height - height % 2)
    scale = short_side / min(width, height)
    return _even(width * scale), _even(height * scale)


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def output_path(src: str, src_root: str, dest_root: str) -> str:
    """Where the copy of `src` goes: its path relative to `src_root`, under `dest_root`, with `.mp4`.

    Raises ValueError for a source outside `src_root` (it has no place in the same layout).
    """
    rel = storage.relative(src, src_root)
    stem, _ = os.path.splitext(rel)
    return storage.join(storage.absolute(dest_root), *(stem + OUTPUT_EXTENSION).split("/"))


# --------------------------------------------------------------------------------------------------------------
# Checking a copy


def check_copy(path: str, num_frames: int, width: int, height: int, original: str | None = None) -> VideoInfo:
    """The copy's info if it is complete: decodes (first and last frame), `num_frames` frames, this size, and
    not older than `original` (when given). Raises VideoError saying what is wrong otherwise."""
    try:
        info, src_info = storage.info(path), storage.info(original) if original is not None else None
    except storage.StorageError as e:
        raise VideoError(path, f"cannot check the copy: {e}") from None
    if info.type != pafs.FileType.File:
        raise VideoError(path, "no copy yet")
    if src_info is not None:
        if src_info.mtime is not None and info.mtime is not None and src_info.mtime > info.mtime:
            raise VideoError(path, "the original is newer than the copy")
    got = probe(path)
    if got.num_frames != num_frames:
        raise VideoError(path, f"copy has {got.num_frames} frames, the original {num_frames}")
    if (got.width, got.height) != (width, height):
        raise VideoError(path, f"copy is {got.width}x{got.height}, expected {width}x{height}")
    return got


# --------------------------------------------------------------------------------------------------------------
# Transcoding


def transcode_or_keep(src: str, dst: str, settings: TranscodeSettings, num_frames: int, width: int,
                      height: int) -> Transcoded:
    """Keep `dst` if it is a complete copy of `src` (see check_copy), else (re-)encode it.

    num_frames, width, height: the original's, as probed (the manifest's values).
    """
    start = time.perf_counter()
    size = transcoded_size(width, height, settings.short_side)
    try:
        info = check_copy(dst, num_frames, *size, original=src)
    except VideoError:
        return transcode_video(src, dst, settings, expected_frames=num_frames)
    return Transcoded(dst, "kept", info.num_frames, info.fps, info.width, info.height, _size_of(dst),
                      time.perf_counter() - start)


def transcode_video(src: str, dst: str, settings: TranscodeSettings = TranscodeSettings(),
                    expected_frames: int | None = None) -> Transcoded:
    """Re-encode `src` (local path or URI) to `dst` (local path or URI): see the module docstring.

    expected_frames: the original's frame count as the manifest has it; the copy must hold exactly that many
    (default: as many as decode from `src`). Raises VideoError(src, reason) when the original cannot be fully
    decoded or the copy would not match it; nothing is then written under `dst` (a file already there stays).
    """
    settings.validate()
    start = time.perf_counter()
    inner = storage.local_path(dst)
    local = inner is not None
    if local:
        os.makedirs(os.path.dirname(inner), exist_ok=True)
        work = inner + PART_SUFFIX
    else:
        folder = tempfile.mkdtemp(prefix="evl-transcode-")
        work = os.path.join(folder, "copy" + OUTPUT_EXTENSION)
    try:
        count, size = _encode(src, work, settings)
        if expected_frames is not None and count != expected_frames:
            raise VideoError(src, f"decoded {count} frames where the probe counted {expected_frames}: "
                                  "frame numbers would not match")
        try:
            info = probe(work)
        except VideoError as e:
            raise VideoError(src, f"the copy does not decode: {e.reason}") from None
        if info.num_frames != count or (info.width, info.height) != size:
            raise VideoError(src, f"the copy reads as {info.num_frames} frames {info.width}x{info.height}, "
                                  f"wrote {count} frames {size[0]}x{size[1]}")
        nbytes = os.path.getsize(work)
        if local:
            os.replace(work, inner)
        else:
            try:
                storage.upload_file(work, dst)
            except storage.StorageError as e:
                raise VideoError(src, f"the copy could not be uploaded: {e}") from None
    finally:
        if local:
            if os.path.exists(work):
                os.remove(work)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return Transcoded(dst, "encoded", info.num_frames, info.fps, info.width, info.height, nbytes,
                      time.perf_counter() - start)


def _encode(src: str, work: str, settings: TranscodeSettings) -> tuple[int, tuple[int, int]]:
    """Decode every frame of `src`, scale, encode to the local file `work`; (frames written, (w, h))."""
    try:
        local = storage.local_path(src)
        source = io.BytesIO(storage.read_bytes(src)) if local is None else local
        if local is not None and not os.path.isfile(local):
            raise VideoError(src, "file not found")
        container = av.open(source)
    except VideoError:
        raise
    except storage.NotFound:
        raise VideoError(src, "file not found") from None
    except storage.StorageError as e:
        raise VideoError(src, f"cannot read: {e.reason}") from None
    except Exception as e:  # noqa: BLE001 - PyAV raises many types for a bad file
        raise VideoError(src, f"cannot open: {_reason(e, src)}") from None
    try:
        if not container.streams.video:
            raise VideoError(src, "no video stream")
        stream = container.streams.video[0]
        stream.thread_count = settings.threads
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise VideoError(src, "no frame size in the header")
        size = transcoded_size(ctx.width, ctx.height, settings.short_side)
        rate = _frame_rate(stream)
        count = _write(container, stream, work, size, rate, settings, src)
    finally:
        container.close()
    if count == 0:
        raise VideoError(src, "no decodable video frames")
    return count, size


def _write(container, stream, work: str, size: tuple[int, int], rate: Fraction, settings: TranscodeSettings,
           src: str) -> int:
    count = 0
    # faststart: the index goes before the frames, so a reader of a remote copy finds it in the first bytes
    with av.open(work, "w", format="mp4", container_options={"movflags": "+faststart"}) as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.options = {"crf": str(settings.crf), "preset": settings.preset, "g": str(settings.keyint),
                         "threads": str(settings.threads)}
        time_base = 1 / rate
        try:
            for frame in container.decode(stream):
                small = frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC")
                small.pts, small.time_base = count, time_base  # constant rate: frame i at i / rate
                out.mux(video.encode(small))
                count += 1
            out.mux(video.encode())
        except VideoError:
            raise
        except Exception as e:  # noqa: BLE001 - a decode error part way: the copy would miss frames
            raise VideoError(src, f"decoding failed after {count} frames: {_reason(e, src)}") from None
    return count


def _frame_rate(stream) -> Fraction:
    """The original's average frame rate (a sane fraction), else its guessed rate, else 30."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < float(rate) < 1000:
            return Fraction(rate).limit_denominator(1001 * 100)
    return Fraction(30)


def _reason(e: BaseException, path: str) -> str:
    """One line: the exception's type and message, the (known) path left out."""
    text = " ".join(str(e).split()).replace(f"'{path}'", "the file").replace(path, "the file")[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _size_of(path: str) -> int:
    return storage.info(path).size or 0
