"""Frame sampling reproduces the reference's rules exactly, and a seed reproduces a clip.

The `reference_*` functions below restate the reference's rules (shared/evl-reference.md, "Data pipeline of
the reference") as plain loops with Python's round and floor division; the vectorised sampling module must
give the same indices in every case, or draw from the same set of indices when the rule is random.
"""

import itertools

import numpy as np
import pytest

from evl.video import sampling
from evl.video.sampling import clip_span, train_indices

view_indices = sampling.test_indices  # not imported by its name: pytest would collect it as a test

VIDEO_FRAMES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 29, 30, 31, 49, 50, 57, 64, 113, 114, 128, 129, 200, 300]
CLIP_FRAMES = [1, 2, 3, 4, 8, 16, 32]
STRIDES = [1, 2, 3, 4, 8, 16]


def reference_train_strided(n, frames, rate, choose_start):
    """One training clip by the reference's rule; choose_start(high) stands for its random integer in
    [0, high)."""
    if rate * (frames - 1) + 1 >= n:
        out = []
        for i in range(frames):
            out.append(i * rate if i * rate < n else out[-1])  # the last sampled in-range frame repeats
        return out
    start = choose_start(n - rate * (frames - 1))
    return list(range(start, start + rate * frames, rate))


def reference_segment_ranges(n, frames):
    """Segment (TSN) sampling: frame i is a uniform integer in [low, high] (both included)."""
    seg = (n - 1) / frames
    return [(round(seg * i), round(seg * (i + 1))) for i in range(frames)]


def reference_test(n, frames, rate, views):
    """The reference's test clips: pad a short video with its last frame, then slide."""
    video = list(range(n))
    span = (frames - 1) * rate + 1
    if len(video) < span:
        video += [video[-1]] * (span - len(video))
    slide = len(video) - span
    if views == 1:
        starts = [slide // 2]
    else:
        starts = [round(slide / (views - 1) * v) for v in range(views)]
    return [video[start:start + span:rate] for start in starts]


def possible_strided_clips(n, frames, rate):
    """Every clip the reference can draw, by enumerating its random start."""
    clips = set()
    for start in range(max(n - rate * (frames - 1), 1)):
        clips.add(tuple(reference_train_strided(n, frames, rate, lambda high, s=start: s)))
    return clips


# --------------------------------------------------------------------------------------------------------------
# Training


def test_strided_train_clips_are_the_references_over_many_cases():
    rng = np.random.default_rng(0)
    for n, frames, rate in itertools.product(VIDEO_FRAMES, CLIP_FRAMES, STRIDES):
        possible = possible_strided_clips(n, frames, rate)
        seen = set()
        for _ in range(min(40 * len(possible), 300)):
            idx = train_indices(n, frames, rate, rng)
            assert idx.dtype == np.int64 and idx.shape == (frames,)
            seen.add(tuple(idx.tolist()))
        assert seen <= possible, (n, frames, rate, sorted(seen - possible)[:3])
        if len(possible) <= 7:  # every start drawn (a start missed by 280 draws: odds below 1e-16)
            assert seen == possible, (n, frames, rate)


def test_clip_longer_than_video_repeats_the_last_sampled_frame_not_the_videos_last():
    idx = train_indices(50, 8, 16, np.random.default_rng(0))  # span 113 > 50 frames
    assert idx.tolist() == [0, 16, 32, 48, 48, 48, 48, 48]  # frame 49 is never sampled
    assert train_indices(10, 4, 4, np.random.default_rng(0)).tolist() == [0, 4, 8, 8]
    assert train_indices(1, 4, 16, np.random.default_rng(0)).tolist() == [0, 0, 0, 0]
    assert train_indices(113, 8, 16, np.random.default_rng(0)).tolist() == list(range(0, 113, 16))  # span == n


def test_strided_train_start_covers_every_possible_start():
    rng = np.random.default_rng(1)
    starts = {int(train_indices(20, 2, 4, rng)[0]) for _ in range(500)}
    assert starts == set(range(20 - clip_span(2, 4) + 1))  # 0..15


def test_segment_train_frames_have_the_references_support():
    """Frame i ranges over [round(seg * i), round(seg * (i + 1))] with both ends drawn, and nothing else."""
    rng = np.random.default_rng(0)
    for n, frames in itertools.product(VIDEO_FRAMES, [1, 2, 3, 8, 16]):
        ranges = reference_segment_ranges(n, frames)
        widest = max(high - low + 1 for low, high in ranges)
        draws = np.stack([train_indices(n, frames, -1, rng) for _ in range(min(50 * widest, 1000))])  # [D, T]
        assert draws.dtype == np.int64
        for i, (low, high) in enumerate(ranges):
            seen, support = set(draws[:, i].tolist()), set(range(low, high + 1))
            if widest <= 20:  # every value drawn (one missed by 1000 draws: odds below 1e-20)
                assert seen == support, (n, frames, i, sorted(seen ^ support))
            else:
                assert seen <= support, (n, frames, i, sorted(seen - support))


def test_segment_rule_examples():
    # 80 frames, 8 segments: seg = 79 / 8 = 9.875; segment 0 is [0, 10] (10 included), segment 7 [69, 79]
    assert reference_segment_ranges(80, 8)[0] == (0, 10) and reference_segment_ranges(80, 8)[7] == (69, 79)
    rng = np.random.default_rng(0)
    draws = np.stack([train_indices(80, 8, -1, rng) for _ in range(2000)])
    assert draws[:, 0].max() == 10 and draws[:, 7].min() == 69
    # halves round to even: 9 frames, 16 segments, seg = 0.5 -> edges round(0.5 * i) = 0, 0, 1, 2, 2, 2, 3, 4...
    assert [r[0] for r in reference_segment_ranges(9, 16)][:8] == [0, 0, 1, 2, 2, 2, 3, 4]
    assert train_indices(1, 8, -1, rng).tolist() == [0] * 8


def test_same_seed_same_clip_different_seed_differs():
    for rate in (8, -1):
        a = [train_indices(1000, 8, rate, np.random.default_rng(7)) for _ in range(2)]
        np.testing.assert_array_equal(a[0], a[1])
        others = {tuple(train_indices(1000, 8, rate, np.random.default_rng(s))) for s in range(10)}
        assert len(others) > 1


# --------------------------------------------------------------------------------------------------------------
# Test views


def test_test_views_are_the_references_over_many_cases():
    for n, frames, rate, views in itertools.product(VIDEO_FRAMES, CLIP_FRAMES, STRIDES, [1, 2, 3, 4, 5]):
        got = view_indices(n, frames, rate, views)
        assert got.dtype == np.int64 and got.shape == (views, frames)
        assert got.tolist() == reference_test(n, frames, rate, views), (n, frames, rate, views)


def test_one_view_floors_the_centre_and_three_views_round_halves_to_even():
    # 300 frames, 8 x 16: span 113, slide 187
    assert view_indices(300, 8, 16, 1)[0, 0] == 93  # 187 // 2, not round(93.5) = 94
    np.testing.assert_array_equal(view_indices(300, 8, 16, 3)[:, 0], [0, 94, 187])  # round(93.5) = 94
    np.testing.assert_array_equal(view_indices(302, 8, 16, 3)[:, 0], [0, 94, 189])  # round(94.5) = 94
    assert view_indices(300, 8, 16, 3)[-1, -1] == 299


def test_short_video_test_clip_is_padded_with_the_videos_last_frame():
    """At test time the padding repeats the video's last frame (training repeats the last sampled one)."""
    assert view_indices(50, 8, 16, 1).tolist() == [[0, 16, 32, 48, 49, 49, 49, 49]]
    assert view_indices(40, 4, 16, 2).tolist() == [[0, 16, 32, 39], [0, 16, 32, 39]]
    assert view_indices(1, 4, 16, 3).tolist() == [[0] * 4] * 3
    assert train_indices(50, 8, 16, np.random.default_rng(0)).tolist() == [0, 16, 32, 48, 48, 48, 48, 48]


def test_segment_test_views_are_deterministic_inside_the_training_support_and_spread():
    """The project's own rule (the reference has none): view v takes candidate floor((v + 1/2) * count / V)
    of segment i's candidates [round(seg * i), round(seg * (i + 1))]."""
    for n, frames, views in itertools.product(VIDEO_FRAMES, [1, 2, 3, 8, 16], [1, 2, 3]):
        got = view_indices(n, frames, -1, views)
        assert got.dtype == np.int64 and got.shape == (views, frames)
        np.testing.assert_array_equal(got, view_indices(n, frames, -1, views))
        for i, (low, high) in enumerate(reference_segment_ranges(n, frames)):
            count = high - low + 1
            assert got[:, i].tolist() == [low + (v + 0.5) * count // views for v in range(views)]
            if count >= views:
                assert np.all(np.diff(got[:, i]) > 0)  # distinct frames per view
    assert view_indices(81, 8, -1, 1)[0].tolist() == [5, 15, 25, 35, 45, 55, 65, 75]  # segment centres


@pytest.mark.parametrize("args", [(0, 8, 16), (10, 0, 16), (10, 8, 0)])
def test_invalid_arguments_raise(args):
    with pytest.raises(ValueError):
        train_indices(*args, np.random.default_rng(0))
    with pytest.raises(ValueError):
        view_indices(*args, 1)
    with pytest.raises(ValueError):
        view_indices(10, 8, 16, 0)
