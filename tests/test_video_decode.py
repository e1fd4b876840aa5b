"""Decoding returns exactly the frames asked for, from local paths and URIs, with either decoder."""

import numpy as np
import pytest

from evl.video import decode
from evl.video.decode import VideoError, probe, read_frames, resized_size
from tests.data_helpers import frame_index, write_level_video

NUM_FRAMES = 40


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """40 flat frames whose grey level gives their index, 64x40, keyframe every 12 frames."""
    path = tmp_path_factory.mktemp("decode") / "levels.mp4"
    return write_level_video(path, NUM_FRAMES, options={"g": "12", "crf": "10"})


def decoded_indices(frames: np.ndarray) -> list[int]:
    return [frame_index(f, NUM_FRAMES) for f in frames]


def test_read_frames_returns_the_requested_frames(video):
    indices = [0, 3, 17, 17, 39, 5]  # unsorted, repeated, across keyframes
    frames = read_frames(video, indices)
    assert frames.shape == (6, 40, 64, 3) and frames.dtype == np.uint8
    assert decoded_indices(frames) == indices


def test_indices_past_the_end_repeat_the_last_frame(video):
    frames = read_frames(video, [38, 39, 60])
    assert decoded_indices(frames) == [38, 39, 39]


def test_short_side_resize_while_decoding(video):
    frames = read_frames(video, [1, 2], short_side=20)
    assert frames.shape == (2, 20, 32, 3)
    assert decoded_indices(frames) == [1, 2]
    # a known size skips the header read and gives the same result
    np.testing.assert_array_equal(read_frames(video, [1, 2], short_side=20, size=(64, 40)), frames)


def test_resized_size_keeps_aspect_for_landscape_and_portrait():
    assert resized_size(340, 256, 224) == (298, 224)
    assert resized_size(256, 340, 224) == (224, 298)
    assert resized_size(340, 256, None) == (340, 256)
    assert resized_size(47, 33, 16) == (23, 16)


@pytest.fixture(scope="module")
def moving(tmp_path_factory):
    """60 frames of real motion, x264 with B-frames (pyramid) and a keyframe every 20 frames."""
    from evl.video.synth import encode_video, render_video

    frames = render_video("moving right", np.random.default_rng(0), 64, 48, 60)
    path = tmp_path_factory.mktemp("moving") / "moving.mp4"
    encode_video(path, frames, options={"g": "20", "bf": "3", "preset": "medium"})
    return str(path)


def test_selective_reader_is_exact_despite_skipping_frames(moving):
    """Skipping unwanted non-reference frames must not change any wanted frame."""
    every = decode._pyav_read(moving, np.arange(60), None)  # decodes every frame, in order
    rng = np.random.default_rng(0)
    for _ in range(10):
        indices = np.sort(rng.choice(60, 6, replace=False)) if rng.random() < 0.5 else rng.integers(0, 60, 6)
        np.testing.assert_array_equal(decode._pyav_seek_read(moving, indices, None), every[indices])
    np.testing.assert_array_equal(decode._decord_read(moving, np.array([5, 41, 59]), None, 1), every[[5, 41, 59]])
    np.testing.assert_array_equal(decode._pyav_seek_read(moving, np.array([58, 70]), None), every[[58, 59]])


def test_pyav_fallback_gives_the_same_frames_as_decord(video):
    indices = np.array([0, 11, 12, 25, 39, 39])
    via_decord = decode._decord_read(video, indices, None, 1)
    via_pyav = decode._pyav_read(video, indices, None)
    assert decoded_indices(via_pyav) == indices.tolist()
    assert np.abs(via_decord.astype(int) - via_pyav.astype(int)).max() <= 2  # same decoder library
    resized = decode._pyav_read(video, indices, (32, 20))
    assert resized.shape == (6, 20, 32, 3)


def test_widths_decord_mishandles_fall_back_to_pyav(tmp_path):
    """decord2 fails on a few small widths (48 here); read_frames must still return the right frames."""
    path = write_level_video(tmp_path / "w48.mp4", 10, height=32, width=48)
    with pytest.raises(Exception):
        decode._decord_read(path, np.array([0, 1]), None, 1)
    frames = read_frames(path, [2, 7, 7])
    assert frames.shape == (3, 32, 48, 3)
    assert [frame_index(f, 10) for f in frames] == [2, 7, 7]
    assert probe(path).num_frames == 10


def test_pyav_pads_when_the_video_is_shorter_than_asked(video):
    frames = decode._pyav_read(video, np.array([38, 45, 50]), None)
    assert decoded_indices(frames) == [38, 39, 39]


def test_probe_reads_count_rate_and_size(video):
    info = probe(video)
    assert (info.num_frames, info.width, info.height) == (NUM_FRAMES, 64, 40)
    assert info.fps == pytest.approx(24.0)
    assert decode._pyav_probe(video) == info  # the fallback counts frames by decoding and agrees


def test_file_uris_and_s3_objects_decode_as_the_local_file(video, s3):
    from evl import storage

    uri = f"{s3.bucket}/decode/levels.mp4"
    storage.upload_file(video, uri)
    for path in ("file://" + video, uri):
        assert decoded_indices(read_frames(path, [4, 30], short_side=20)) == [4, 30]
        assert probe(path) == probe(video)
    for missing in (f"{s3.bucket}/decode/missing.mp4", "s3://no-such-bucket-here/x.mp4"):
        with pytest.raises(VideoError, match="file not found"):
            read_frames(missing, [0])
    storage.write_bytes(f"{s3.bucket}/decode/empty.mp4", b"")
    with pytest.raises(VideoError, match="empty file"):
        probe(f"{s3.bucket}/decode/empty.mp4")


def test_missing_files_raise_video_error(tmp_path):
    for path in (str(tmp_path / "nope.mp4"), "file://" + str(tmp_path / "nope.mp4")):
        with pytest.raises(VideoError) as err:
            read_frames(path, [0])
        assert err.value.path == path and "not found" in err.value.reason
        with pytest.raises(VideoError):
            probe(path)


def test_video_error_pickles_with_path_and_reason():
    import pickle

    err = pickle.loads(pickle.dumps(VideoError("/a b.mp4", "empty file")))
    assert (err.path, err.reason, str(err)) == ("/a b.mp4", "empty file", "/a b.mp4: empty file")


def test_bad_indices_raise_value_error(video):
    with pytest.raises(ValueError):
        read_frames(video, [])
    with pytest.raises(ValueError):
        read_frames(video, [-1])
