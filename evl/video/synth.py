"""A small synthetic action dataset made of real h264 videos, laid out like the CVDF Kinetics mirror.

Why: tests, demos and benchmarks need videos that go through the exact path real data takes (container
parsing, h264 decoding, annotation CSVs), and a task where a temporal model must beat a single-frame one.
Half the classes differ only in the direction or order of motion (the same frames played backwards belong
to another class); the others differ by appearance (shape). Backgrounds, colours, positions, sizes and
speeds are random per video, and everything is deterministic given the seed.

Layout written by `write_synth_dataset(out, ...)`:
    out/videos/<youtube_id>_<start:06d>_<end:06d>.mp4
    out/annotations/train.csv, out/annotations/val.csv   (label,youtube_id,time_start,time_end,split)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

# Index order is the label order; the first 8 mix 6 motion classes with 2 appearance classes.
SYNTH_CLASSES: tuple[str, ...] = (
    "moving left",
    "moving right",
    "growing",
    "shrinking",
    "red then blue",
    "blue then red",
    "square",
    "ring",
    "moving up",
    "moving down",
)
# Classes that a single frame cannot tell apart from another class (need temporal order).
MOTION_CLASSES: frozenset[str] = frozenset(
    {"moving left", "moving right", "growing", "shrinking", "red then blue", "blue then red",
     "moving up", "moving down"})
APPEARANCE_CLASSES: frozenset[str] = frozenset(set(SYNTH_CLASSES) - MOTION_CLASSES)

SPLITS = ("train", "val")
PARAMS_FILE = "synth.json"


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the generated files (the cache key of `evl synth`)."""

    num_classes: int = len(SYNTH_CLASSES)
    train_per_class: int = 40
    val_per_class: int = 10
    width: int = 64
    height: int = 64
    frames: int = 48
    fps: int = 24
    seed: int = 0
    crf: int = 23
    preset: str = "veryfast"  # x264 speed/size trade-off; "medium" is ffmpeg's default

    def validate(self) -> None:
        if not 1 <= self.num_classes <= len(SYNTH_CLASSES):
            raise ValueError(f"num_classes must be in [1, {len(SYNTH_CLASSES)}], got {self.num_classes}")
        if self.width % 2 or self.height % 2 or min(self.width, self.height) < 16:
            raise ValueError(f"width and height must be even and >= 16 (yuv420p), got {self.width}x{self.height}")
        if self.frames < 2 or self.fps < 1:
            raise ValueError(f"need frames >= 2 and fps >= 1, got {self.frames}, {self.fps}")
        if self.train_per_class < 0 or self.val_per_class < 0:
            raise ValueError("videos per class must be >= 0")


@dataclass(frozen=True)
class SynthVideo:
    """One row of the annotation CSV and where its video lives (relative to the dataset root)."""

    label: str
    youtube_id: str
    time_start: int
    time_end: int
    split: str

    @property
    def filename(self) -> str:
        return f"{self.youtube_id}_{self.time_start:06d}_{self.time_end:06d}.mp4"


# --------------------------------------------------------------------------------------------------------------
# Encoding


def encode_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 24, codec: str = "libx264",
                 pix_fmt: str = "yuv420p", options: dict[str, str] | None = None) -> None:
    """Encode uint8 RGB frames [T, H, W, 3] into a video file (container from the extension)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if options:
            stream.options = dict(options)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


# --------------------------------------------------------------------------------------------------------------
# Rendering: a textured background plus one main object whose behaviour is the class.


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random texture around a random base colour, float32 [H, W, 3] in 0..255."""
    base = rng.uniform(30, 225, size=3)
    grid = rng.normal(0, 35, size=(4, 5, 3))
    ys, xs = np.linspace(0, grid.shape[0] - 1, h), np.linspace(0, grid.shape[1] - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, grid.shape[0] - 1), np.minimum(x0 + 1, grid.shape[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    texture = top * (1 - fy) + bottom * fy  # [H, W, 3]
    grain = rng.normal(0, 6, size=(h, w, 3))
    return np.clip(base + texture + grain, 0, 255).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour far enough from the background's mean to be visible."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - mean).sum() > 200:
            return colour
    return 255 - mean


def _jitter(rng: np.random.Generator, colour: tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float64) + rng.normal(0, 18, size=3), 0, 255)


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape centred at (cy, cx) with radius r, [H, W]."""
    if shape == "square":
        dist = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
        return np.clip(r - dist + 0.5, 0, 1)
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    disc = np.clip(r - dist + 0.5, 0, 1)
    if shape == "ring":
        return disc * np.clip(dist - 0.55 * r + 0.5, 0, 1)
    return disc


@dataclass
class _Track:
    """Per-frame object state: centre, radius, colour, visibility, arrays of length T."""

    cy: np.ndarray
    cx: np.ndarray
    r: np.ndarray
    colour: np.ndarray  # [T, 3]
    visible: np.ndarray  # bool [T]
    shape: str = "disc"


def _linear(a: float, b: float, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t


def _drift_track(rng, h, w, t, r, colour, shape) -> _Track:
    """An object drifting slowly in a random direction (appearance classes)."""
    m = min(h, w)
    speed = rng.uniform(0.0, 0.25) * m
    angle = rng.uniform(0, 2 * np.pi)
    cy0, cx0 = rng.uniform(r, h - r), rng.uniform(r, w - r)
    cy = np.clip(cy0 + np.sin(angle) * speed * (t - 0.5), r, h - r)
    cx = np.clip(cx0 + np.cos(angle) * speed * (t - 0.5), r, w - r)
    return _Track(cy, cx, np.full_like(t, r), np.tile(colour, (len(t), 1)), np.ones(len(t), bool), shape)


def _track(name: str, rng: np.random.Generator, h: int, w: int, n: int, background: np.ndarray) -> _Track:
    """Where the main object is in each frame, for class `name`."""
    t = np.linspace(0, 1, n)
    m = min(h, w)
    r = rng.uniform(0.09, 0.16) * m
    colour = _contrasting_colour(rng, background)
    wobble = rng.normal(0, 0.01 * m, size=(2, n)).cumsum(1) * 0.3
    if name in ("moving left", "moving right", "moving up", "moving down"):
        travel = rng.uniform(0.45, 0.8)
        along = _linear(0.5 - travel / 2, 0.5 + travel / 2, t)
        if name in ("moving left", "moving up"):
            along = along[::-1]
        across = rng.uniform(0.25, 0.75)
        if name in ("moving left", "moving right"):
            cy, cx = across * h + wobble[0], along * w + wobble[1]
        else:
            cy, cx = along * h + wobble[0], across * w + wobble[1]
        return _Track(cy, cx, np.full(n, r), np.tile(colour, (n, 1)), np.ones(n, bool))
    if name in ("growing", "shrinking"):
        small, big = rng.uniform(0.04, 0.08) * m, rng.uniform(0.2, 0.3) * m
        radius = _linear(small, big, t) if name == "growing" else _linear(big, small, t)
        cy = rng.uniform(0.35, 0.65) * h + wobble[0]
        cx = rng.uniform(0.35, 0.65) * w + wobble[1]
        return _Track(cy, cx, radius, np.tile(colour, (n, 1)), np.ones(n, bool))
    if name in ("red then blue", "blue then red"):
        red, blue = _jitter(rng, (225, 35, 35)), _jitter(rng, (35, 70, 225))
        first, second = (red, blue) if name == "red then blue" else (blue, red)
        switch = rng.uniform(0.35, 0.65)
        gap = rng.uniform(0.0, 0.1)
        first_pos = rng.uniform(r, [h - r, w - r])
        second_pos = rng.uniform(r, [h - r, w - r])
        late = t >= switch
        cy = np.where(late, second_pos[0], first_pos[0]) + wobble[0]
        cx = np.where(late, second_pos[1], first_pos[1]) + wobble[1]
        colours = np.where(late[:, None], second, first)
        visible = (t < switch - gap) | late
        return _Track(cy, cx, np.full(n, r), colours, visible)
    if name in ("square", "ring"):
        return _drift_track(rng, h, w, t, r * 1.2, colour, name)
    raise ValueError(f"unknown synthetic class {name!r}")


def _camera_pan(rng: np.random.Generator, frames: int, pad: int) -> np.ndarray:
    """Integer (y, x) crop offsets in [0, 2 * pad] following a smooth random walk, [T, 2]."""
    velocity = rng.normal(0, 0.25, size=(frames, 2)).cumsum(0) * 0.2
    return np.clip(np.round(pad + velocity.cumsum(0) * 0.5), 0, 2 * pad).astype(int)


def render_video(name: str, rng: np.random.Generator, width: int, height: int, frames: int,
                 grain: float = 3.0) -> np.ndarray:
    """Frames of one video of class `name`: uint8 [T, H, W, 3]. `grain`: per-frame sensor noise (std)."""
    pad = max(2, min(width, height) // 8)
    scene = _background(rng, height + 2 * pad, width + 2 * pad)
    track = _track(name, rng, height, width, frames, scene[pad:-pad, pad:-pad])
    pan = _camera_pan(rng, frames, pad)  # [T, 2] integer offsets: a slowly moving camera
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 1 + np.cumsum(rng.normal(0, 0.004, size=frames))  # slow global illumination drift
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        oy, ox = pan[i]
        frame = scene[oy:oy + height, ox:ox + width] * light[i]
        frame = frame + rng.normal(0, grain, size=(height, width, 1)).astype(np.float32)
        if track.visible[i]:
            alpha = _mask(track.shape, yy, xx, track.cy[i], track.cx[i], track.r[i])[..., None]
            frame = frame * (1 - alpha) + track.colour[i] * alpha
        out[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------------------------
# The dataset


def _youtube_id(seed: int, split: str, label: int, index: int) -> str:
    """A deterministic 11-character id drawn from YouTube's alphabet (letters, digits, '-' and '_')."""
    digest = hashlib.sha256(f"{seed}/{split}/{label}/{index}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:11]


def _video_rng(params: SynthParams, split: str, label: int, index: int) -> np.random.Generator:
    """Independent stream per video, so results do not depend on which subset or order is generated."""
    return np.random.default_rng([params.seed, SPLITS.index(split), label, index])


def plan_videos(params: SynthParams) -> list[SynthVideo]:
    """The annotation rows for every split, in a deterministic order."""
    rows = []
    duration = max(1, round(params.frames / params.fps))
    for split, per_class in (("train", params.train_per_class), ("val", params.val_per_class)):
        for label in range(params.num_classes):
            for index in range(per_class):
                start = int(_video_rng(params, split, label, index).integers(0, 600))
                rows.append(SynthVideo(SYNTH_CLASSES[label], _youtube_id(params.seed, split, label, index),
                                       start, start + duration, split))
    return rows


def _write_one(args: tuple[SynthParams, SynthVideo, int, str]) -> None:
    params, video, index, folder = args
    label = SYNTH_CLASSES.index(video.label)
    rng = _video_rng(params, video.split, label, index)
    rng.integers(0, 600)  # the draw used for time_start in plan_videos
    frames = render_video(video.label, rng, params.width, params.height, params.frames)
    path = Path(folder) / video.filename
    tmp = path.with_suffix(".part.mp4")
    # x264 is not bit-for-bit reproducible with threads or with its macroblock tree (seen on these small
    # frames), so both are off: the same seed gives the same files
    options = {"crf": str(params.crf), "preset": params.preset, "threads": "1", "x264-params": "mbtree=0"}
    encode_video(tmp, frames, fps=params.fps, options=options)
    os.replace(tmp, path)  # no half-written video is ever visible under its final name


def _csv_line(video: SynthVideo) -> str:
    label = f'"{video.label}"' if (" " in video.label or "," in video.label) else video.label
    return f"{label},{video.youtube_id},{video.time_start},{video.time_end},{video.split}\n"


def write_annotations(root: Path, rows: list[SynthVideo]) -> dict[str, Path]:
    """annotations/<split>.csv in the CVDF format (labels with spaces quoted)."""
    folder = root / "annotations"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        path = folder / f"{split}.csv"
        lines = ["label,youtube_id,time_start,time_end,split\n"]
        lines += [_csv_line(v) for v in rows if v.split == split]
        path.write_text("".join(lines))
        paths[split] = path
    return paths


def is_generated(root: str | os.PathLike, params: SynthParams) -> bool:
    """True when `root` holds a complete dataset generated with exactly these params."""
    root = Path(root)
    try:
        saved = json.loads((root / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return False
    if saved != asdict(params):
        return False
    return all((root / "videos" / v.filename).is_file() for v in plan_videos(params))


def write_synth_dataset(root: str | os.PathLike, params: SynthParams = SynthParams(),
                        workers: int = 1) -> list[SynthVideo]:
    """Render and encode every video, then the CSVs, then `synth.json` (written last = complete marker)."""
    params.validate()
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / PARAMS_FILE).unlink(missing_ok=True)
    rows = plan_videos(params)
    indices = _indices_within_class(rows)
    jobs = [(params, video, index, str(root / "videos")) for video, index in zip(rows, indices)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=8))
    else:
        for job in jobs:
            _write_one(job)
    write_annotations(root, rows)
    (root / PARAMS_FILE).write_text(json.dumps(asdict(params), indent=1))
    return rows


def _indices_within_class(rows: list[SynthVideo]) -> list[int]:
    """Position of each row within its (split, label) group, as used by plan_videos."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for video in rows:
        key = (video.split, video.label)
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out
