"""Broken and awkward inputs: each is reported with a reason, the rest still flows, nothing crashes."""

import shutil

import numpy as np
import pytest

from evl.video.decode import VideoError, probe, read_frames
from evl.video.kinetics import read_manifest
from evl.video.sampling import train_indices
from tests.data_helpers import frame_index, write_bad_videos
from workflows.prepare import format_summary, prepare_dataset

EXPECTED_REASON = {
    "zero_bytes": "empty file",
    "truncated": "moov atom not found|Invalid data",
    "text": "Invalid data",
    "audio_only": "no video stream",
    "missing": "not found",
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return write_bad_videos(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", sorted(EXPECTED_REASON))
def test_unusable_files_raise_one_video_error_with_a_reason(bad, name):
    import re

    for call in (lambda p: probe(p), lambda p: read_frames(p, [0, 1])):
        with pytest.raises(VideoError) as err:
            call(bad[name])
        assert err.value.path == bad[name]
        assert re.search(EXPECTED_REASON[name], err.value.reason), err.value.reason


@pytest.mark.parametrize("name,shape", [("ok_good", (30, 40, 64)), ("ok_one_frame", (1, 40, 64)),
                                        ("ok_short", (5, 40, 64)), ("ok_odd_width", (12, 33, 47)),
                                        ("ok_portrait", (12, 64, 32)), ("ok_spaces", (30, 40, 64))])
def test_awkward_but_valid_videos_probe_and_decode(bad, name, shape):
    info = probe(bad[name])
    assert (info.num_frames, info.height, info.width) == shape
    frames = read_frames(bad[name], [0, info.num_frames - 1], short_side=16)
    assert frames.shape[0] == 2 and min(frames.shape[1:3]) == 16


def test_clip_longer_than_the_video_is_padded_with_the_last_frame(bad):
    indices = train_indices(5, 8, 2, np.random.default_rng(0))  # span 15 > 5 frames
    frames = read_frames(bad["ok_short"], indices)
    assert frames.shape == (8, 40, 64, 3)
    assert [frame_index(f, 5) for f in frames] == [0, 2, 4, 4, 4, 4, 4, 4]
    one = read_frames(bad["ok_one_frame"], [0, 0, 0, 0])
    assert one.shape == (4, 40, 64, 3)


@pytest.fixture(scope="module")
def messy_dataset(bad, tmp_path_factory):
    """A CVDF dataset whose rows point at every bad file, plus bad CSV lines and a list file with spaces."""
    root = tmp_path_factory.mktemp("messy")
    (root / "videos").mkdir()
    (root / "annotations").mkdir()
    names = ["ok_good", "ok_one_frame", "ok_short", "ok_odd_width", "ok_portrait", "zero_bytes", "truncated",
             "text", "audio_only"]
    lines = ["label,youtube_id,time_start,time_end,split"]
    for i, name in enumerate(names):
        youtube_id = f"id{i:09d}"
        shutil.copy(bad[name], root / "videos" / f"{youtube_id}_000000_000010.mp4")
        lines.append(f"{'good' if name.startswith('ok_') else 'bad'},{youtube_id},0,10,train")
    lines += [
        "good,absentVideo,0,10,train",  # missing file
        "good,id000000000,0,10,train",  # duplicate row
        "sideways,idUnknown01,0,10,train",  # unknown label (classes are forced below)
        "good,tooFewFields",  # malformed
    ]
    (root / "annotations" / "train.csv").write_text("\n".join(lines) + "\n")
    spaced = root / "clips with spaces"
    spaced.mkdir()
    shutil.copy(bad["ok_spaces"], spaced / "a clip.mp4")
    (root / "extra list.txt").write_text("clips with spaces/a clip.mp4 0\nclips with spaces/gone.mp4 1\n")
    (root / "classes.json").write_text('["good", "bad"]')
    return root


def test_prepare_lists_every_bad_file_and_keeps_only_good_ones(data_ray, messy_dataset, tmp_path):
    root = messy_dataset
    summary = prepare_dataset(str(root), str(tmp_path), splits=["train", "extra"],
                              annotations=[str(root / "annotations" / "train.csv"), str(root / "extra list.txt")],
                              classes=str(root / "classes.json"))
    unreadable = {u["path"].rsplit("/", 1)[-1]: u["reason"] for u in summary["unreadable"]}
    by_id = {f"id{i:09d}_000000_000010.mp4": name for i, name in enumerate(
        ["ok_good", "ok_one_frame", "ok_short", "ok_odd_width", "ok_portrait", "zero_bytes", "truncated", "text",
         "audio_only"])}
    import re

    named = {by_id.get(k, k): v for k, v in unreadable.items()}
    for name in ("zero_bytes", "truncated", "text", "audio_only"):
        assert re.search(EXPECTED_REASON[name], named[name]), (name, named[name])
    assert "not found" in named["gone.mp4"]
    assert [m["video"] for m in summary["missing"]] == ["absentVideo_000000_000010.mp4"]
    skipped = {s["line"]: s["reason"] for s in summary["skipped_lines"]}
    assert skipped == {12: "duplicate of line 2", 13: "unknown label 'sideways'", 14: "expected 5 fields, got 2"}

    train = read_manifest(str(tmp_path / "train.parquet")).to_pylist()
    assert sorted(by_id[r["path"].rsplit("/", 1)[-1]] for r in train) == [
        "ok_good", "ok_odd_width", "ok_one_frame", "ok_portrait", "ok_short"]
    extra = read_manifest(str(tmp_path / "extra.parquet")).to_pylist()
    assert [r["path"] for r in extra] == [str(root / "clips with spaces" / "a clip.mp4")]
    assert summary["splits"]["train"] == {**summary["splits"]["train"], "annotated": 13, "usable": 5, "missing": 1,
                                          "unreadable": 4, "skipped_lines": 3}

    text = format_summary(summary)
    for name in ("zero_bytes", "truncated", "text", "audio_only"):
        assert any(k in text for k, v in by_id.items() if v == name)
    assert "absentVideo_000000_000010.mp4" in text and "unknown label 'sideways'" in text
