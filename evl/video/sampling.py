"""Which frames of a video make a clip (the reference's sampling rules).

Positive `sampling_rate`: `num_frames` frames, `sampling_rate` apart. Negative: segment (TSN) sampling, one
frame from each of `num_frames` equal segments of the whole video. Indices past the end of a short video
repeat its last frame, so every clip has exactly `num_frames` frames. Randomness comes only from the numpy
Generator passed in, so a seed reproduces a clip.
"""

from __future__ import annotations

import numpy as np


def clip_span(num_frames: int, sampling_rate: int) -> int:
    """Frames covered by one strided clip, first to last sampled frame inclusive."""
    return (num_frames - 1) * sampling_rate + 1


def _check(video_frames: int, num_frames: int, sampling_rate: int) -> None:
    if video_frames < 1:
        raise ValueError(f"video has no frames ({video_frames})")
    if num_frames < 1 or sampling_rate == 0:
        raise ValueError(f"need num_frames >= 1 and sampling_rate != 0, got {num_frames}, {sampling_rate}")


def _segment_edges(video_frames: int, num_frames: int) -> np.ndarray:
    """Start of each of `num_frames` equal segments plus the end: float64 [num_frames + 1]."""
    return np.linspace(0, video_frames, num_frames + 1)


def train_indices(video_frames: int, num_frames: int, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices of one random training clip: int64 [num_frames], each in [0, video_frames)."""
    _check(video_frames, num_frames, sampling_rate)
    if sampling_rate < 0:
        edges = _segment_edges(video_frames, num_frames)
        lo = np.floor(edges[:-1])
        width = np.maximum(np.floor(edges[1:]) - lo, 1)  # a segment shorter than a frame still owns one
        idx = lo + np.floor(rng.random(num_frames) * width)
    else:
        slack = max(video_frames - clip_span(num_frames, sampling_rate), 0)
        start = rng.integers(0, slack + 1)
        idx = start + np.arange(num_frames) * sampling_rate
    return np.minimum(idx, video_frames - 1).astype(np.int64)


def test_indices(video_frames: int, num_frames: int, sampling_rate: int, num_views: int) -> np.ndarray:
    """Frame indices of `num_views` deterministic clips evenly spaced over the video: int64 [num_views, num_frames].

    Strided: starts evenly spaced from the first to the last possible start (one view: the centred clip).
    Segment: view v takes the frame at fraction (v + 0.5) / num_views of every segment.
    """
    _check(video_frames, num_frames, sampling_rate)
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if sampling_rate < 0:
        edges = _segment_edges(video_frames, num_frames)
        offsets = (np.arange(num_views) + 0.5) / num_views  # [V]
        idx = np.floor(edges[None, :-1] + offsets[:, None] * (edges[1:] - edges[:-1])[None, :])
    else:
        slack = max(video_frames - clip_span(num_frames, sampling_rate), 0)
        starts = np.full(1, slack / 2) if num_views == 1 else np.linspace(0, slack, num_views)
        idx = np.round(starts)[:, None] + np.arange(num_frames)[None, :] * sampling_rate
    return np.minimum(idx, video_frames - 1).astype(np.int64)
