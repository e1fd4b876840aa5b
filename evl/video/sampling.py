"""Which frames of a video make a clip: the reference's sampling rules, vectorised.

A video of `n` frames; a strided clip of `num_frames` frames `sampling_rate` apart spans
`span = (num_frames - 1) * sampling_rate + 1` frames.

Training (`train_indices`):
  - span < n: a uniform random start in [0, n - span], then every `sampling_rate`-th frame.
  - span >= n: frame i is i * sampling_rate while that is inside the video; past the end the last sampled
    in-range frame repeats (not the video's last frame, unless they coincide).
  - negative `sampling_rate`, segment (TSN) sampling: seg = (n - 1) / num_frames, and frame i is a uniform
    integer in [round(seg * i), round(seg * (i + 1))], both ends included (Python's rounding, halves to even).

Test (`test_indices`):
  - a video shorter than the span is padded with its last frame; slide = max(n - span, 0); one view starts
    at slide // 2 (floor), V views at round(slide / (V - 1) * v) (halves to even).
  - negative `sampling_rate`: the reference has no test rule for segment sampling; this project's own:
    the frames of segment i are the candidates [round(seg * i), round(seg * (i + 1))] of training, and
    view v takes candidate floor((v + 1/2) * count / V) of the `count` candidates, so one view takes the
    middle one and V views spread evenly through every segment (distinct while a segment has >= V frames).

Randomness comes only from the numpy Generator passed in, so a seed reproduces a clip.
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


def _segment_bounds(video_frames: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last candidate frame of each segment, both included: int64 [num_frames] each.

    np.round halves to even, as Python's round does, and seg * i is the same float product as the
    reference's, so the bounds are the reference's exactly.
    """
    seg = (video_frames - 1) / num_frames
    edges = np.round(seg * np.arange(num_frames + 1)).astype(np.int64)
    return edges[:-1], edges[1:]


def train_indices(video_frames: int, num_frames: int, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices of one random training clip: int64 [num_frames], each in [0, video_frames)."""
    _check(video_frames, num_frames, sampling_rate)
    if sampling_rate < 0:
        lo, hi = _segment_bounds(video_frames, num_frames)
        return rng.integers(lo, hi + 1).astype(np.int64)
    steps = np.arange(num_frames, dtype=np.int64) * sampling_rate
    span = clip_span(num_frames, sampling_rate)
    if span < video_frames:
        return int(rng.integers(0, video_frames - span + 1)) + steps
    last_sampled = (video_frames - 1) // sampling_rate * sampling_rate  # the last i * rate inside the video
    return np.minimum(steps, last_sampled)


def test_indices(video_frames: int, num_frames: int, sampling_rate: int, num_views: int) -> np.ndarray:
    """Frame indices of `num_views` deterministic clips: int64 [num_views, num_frames] (rules in the module doc)."""
    _check(video_frames, num_frames, sampling_rate)
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if sampling_rate < 0:
        lo, hi = _segment_bounds(video_frames, num_frames)
        count = hi - lo + 1  # [T]
        twice_v = 2 * np.arange(num_views, dtype=np.int64)[:, None] + 1  # [V, 1]: 2v + 1
        return lo[None, :] + twice_v * count[None, :] // (2 * num_views)  # floor((v + 1/2) * count / V)
    slide = max(video_frames - clip_span(num_frames, sampling_rate), 0)  # a padded short video: no slide
    if num_views == 1:
        starts = np.array([slide // 2], dtype=np.int64)
    else:
        starts = np.round(slide / (num_views - 1) * np.arange(num_views)).astype(np.int64)
    idx = starts[:, None] + np.arange(num_frames, dtype=np.int64)[None, :] * sampling_rate
    return np.minimum(idx, video_frames - 1)  # frames of the padding are the video's last frame
