"""Frame sampling follows the reference rules and is reproducible from a seed."""

import numpy as np
import pytest

from evl.video import sampling
from evl.video.sampling import clip_span, train_indices

view_indices = sampling.test_indices  # not imported by its name: pytest would collect it as a test


def test_strided_train_clip_is_contiguous_stride_inside_video():
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = train_indices(300, 8, 16, rng)
        assert idx.shape == (8,) and idx.dtype == np.int64
        assert np.all(np.diff(idx) == 16)
        assert idx[0] >= 0 and idx[-1] < 300


def test_strided_train_start_covers_every_possible_start():
    rng = np.random.default_rng(1)
    starts = {int(train_indices(20, 2, 4, rng)[0]) for _ in range(500)}
    assert starts == set(range(20 - clip_span(2, 4) + 1))  # 0..15


def test_short_video_repeats_last_frame():
    idx = train_indices(50, 8, 16, np.random.default_rng(0))
    assert idx.tolist() == [0, 16, 32, 48, 49, 49, 49, 49]
    assert train_indices(1, 4, 16, np.random.default_rng(0)).tolist() == [0, 0, 0, 0]


def test_same_seed_same_clip_different_seed_differs():
    a = [train_indices(1000, 8, 8, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    others = {tuple(train_indices(1000, 8, 8, np.random.default_rng(s))) for s in range(10)}
    assert len(others) > 1


def test_segment_sampling_takes_one_frame_per_segment():
    rng = np.random.default_rng(0)
    for _ in range(100):
        idx = train_indices(80, 8, -1, rng)
        assert np.all((idx >= np.arange(8) * 10) & (idx < np.arange(1, 9) * 10))
    assert train_indices(3, 8, -1, rng).max() <= 2  # fewer frames than segments: still valid


def test_test_views_evenly_spaced_and_padded():
    views = view_indices(300, 8, 16, 3)
    assert views.shape == (3, 8)
    np.testing.assert_array_equal(views[:, 0], [0, 94, 187])  # first, middle, last possible start
    assert views[-1, -1] == 299
    np.testing.assert_array_equal(view_indices(300, 8, 16, 1)[0, 0], 94)  # one view: centred
    short = view_indices(40, 4, 16, 2)
    assert short.tolist() == [[0, 16, 32, 39], [0, 16, 32, 39]]


def test_segment_test_views_are_deterministic_and_distinct():
    views = view_indices(80, 8, -1, 2)
    np.testing.assert_array_equal(views, view_indices(80, 8, -1, 2))
    assert np.all((views >= np.arange(8) * 10) & (views < np.arange(1, 9) * 10))
    assert np.all(views[0] < views[1])


@pytest.mark.parametrize("args", [(0, 8, 16), (10, 0, 16), (10, 8, 0)])
def test_invalid_arguments_raise(args):
    with pytest.raises(ValueError):
        train_indices(*args, np.random.default_rng(0))
