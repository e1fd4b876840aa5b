"""Training-ready copies: evl.video.transcode on one video, and `evl prepare --transcode` on a real local Ray."""

import argparse
import json
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from evl.video.decode import VideoError, probe, read_frames
from evl.video.kinetics import read_classes, read_manifest
from evl.video.synth import SynthParams, write_synth_dataset
from evl.video.transcode import (
    PART_SUFFIX,
    TranscodeSettings,
    check_copy,
    output_path,
    transcode_or_keep,
    transcode_video,
    transcoded_size,
)
from tests.data_helpers import frame_index, level_frames, write_bad_videos, write_level_video
from workflows import prepare


def keyframes(path) -> list[int]:
    """Presentation-order frame numbers of the keyframes."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    order = {pts: i for i, pts in enumerate(sorted(p.pts for p in packets))}
    return sorted(order[p.pts] for p in packets if p.is_keyframe)


def test_sizes_keep_aspect_are_even_and_never_upscale():
    assert transcoded_size(1280, 720, 320) == (568, 320)
    assert transcoded_size(720, 1280, 320) == (320, 568)
    assert transcoded_size(340, 256, 320) == (340, 256)  # smaller than asked: kept
    assert transcoded_size(47, 33, 320) == (46, 32)  # odd sizes made even (yuv420p)
    with pytest.raises(ValueError, match="even"):
        TranscodeSettings(short_side=321).validate()


def test_output_path_keeps_the_layout(tmp_path):
    root = tmp_path / "k400"
    assert output_path(str(root / "train" / "a b.mkv"), str(root), "/dest") == "/dest/train/a b.mp4"
    assert output_path("s3://b/k400/v/x.mp4", "s3://b/k400/", "gs://c/k320") == "gs://c/k320/v/x.mp4"
    with pytest.raises(ValueError, match="not under"):
        output_path(str(tmp_path / "elsewhere.mp4"), str(root), "/dest")


def test_one_video_keeps_every_frame_and_the_rate(tmp_path):
    src = tmp_path / "in.mp4"
    with av.open(str(src), "w") as container:  # 64x40 video (grey level = frame index) plus an audio stream
        video = container.add_stream("libx264", rate=15)
        video.width, video.height, video.pix_fmt = 64, 40, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for frame in level_frames(30, 40, 64):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate, samples.pts = 16000, 0
        container.mux(audio.encode(samples))
        container.mux(audio.encode())
    dst = tmp_path / "out" / "copy.mp4"
    result = transcode_video(str(src), str(dst), TranscodeSettings(short_side=32, keyint=8))
    assert (result.status, result.num_frames, result.width, result.height) == ("encoded", 30, 52, 32)
    assert result.fps == pytest.approx(15) and probe(str(dst)).fps == pytest.approx(15)
    frames = read_frames(str(dst), np.arange(30))
    assert frames.shape == (30, 32, 52, 3)
    assert [frame_index(f, 30) for f in frames] == list(range(30))  # frame i of the copy is frame i
    assert all(b - a <= 8 for a, b in zip(keyframes(dst), keyframes(dst)[1:] + [30]))
    with av.open(str(dst)) as container:
        assert [s.type for s in container.streams] == ["video"]  # audio dropped
    assert sorted(os.listdir(dst.parent)) == ["copy.mp4"]  # no temporary file left


def test_broken_input_fails_and_leaves_nothing(tmp_path):
    bad = write_bad_videos(tmp_path / "bad")
    for name in ("zero_bytes", "truncated", "text", "audio_only", "missing"):
        dst = tmp_path / "out" / f"{name}.mp4"
        with pytest.raises(VideoError) as caught:
            transcode_video(bad[name], str(dst), TranscodeSettings(short_side=32))
        assert caught.value.path == bad[name] and caught.value.reason
        assert not dst.exists() and not Path(str(dst) + PART_SUFFIX).exists()


def test_frame_count_must_match_the_manifest(tmp_path):
    src = write_level_video(tmp_path / "in.mp4", 12)
    with pytest.raises(VideoError, match="decoded 12 frames where the probe counted 13"):
        transcode_video(src, str(tmp_path / "copy.mp4"), TranscodeSettings(short_side=32), expected_frames=13)
    assert not (tmp_path / "copy.mp4").exists()


def test_complete_copies_are_kept_broken_ones_redone(tmp_path):
    src = write_level_video(tmp_path / "in.mp4", 20)
    dst = tmp_path / "copy.mp4"
    settings = TranscodeSettings(short_side=32)
    first = transcode_or_keep(src, str(dst), settings, 20, 64, 40)
    mtime = dst.stat().st_mtime_ns
    assert first.status == "encoded" and check_copy(str(dst), 20, 52, 32).num_frames == 20
    assert transcode_or_keep(src, str(dst), settings, 20, 64, 40).status == "kept"
    assert dst.stat().st_mtime_ns == mtime
    with pytest.raises(VideoError, match="frames"):
        check_copy(str(dst), 21, 52, 32)
    dst.write_bytes(dst.read_bytes()[:300])  # a copy cut short (as by a copy outside this code)
    with pytest.raises(VideoError):
        check_copy(str(dst), 20, 52, 32)
    assert transcode_or_keep(src, str(dst), settings, 20, 64, 40).status == "encoded"
    os.utime(src, ns=(dst.stat().st_mtime_ns + 10**9,) * 2)  # the original replaced after the copy was made
    assert transcode_or_keep(src, str(dst), settings, 20, 64, 40).status == "encoded"


def test_writes_to_a_uri_destination(tmp_path):
    src = write_level_video(tmp_path / "in.mp4", 10)
    uri = "file://" + str(tmp_path / "dest" / "sub" / "copy.mp4")
    result = transcode_video(src, uri, TranscodeSettings(short_side=32))
    assert result.path == uri and probe(uri).num_frames == 10


def test_object_store_destination_gets_only_the_checked_file(tmp_path, monkeypatch, s3):
    """An S3 destination receives one upload of the finished copy under its final key, nothing else, and no
    local temporary file is left; the copy transcodes again from s3 to s3."""
    from evl.video import transcode

    monkeypatch.setattr(transcode.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    src = write_level_video(tmp_path / "in.mp4", 10)
    transcode_video(src, f"{s3.bucket}/k320/a/b.mp4", TranscodeSettings(short_side=32))
    assert s3.keys("k320/") == ["k320/a/b.mp4"]
    assert probe(f"{s3.bucket}/k320/a/b.mp4").num_frames == 10
    assert list((tmp_path / "tmp").iterdir()) == []
    again = transcode_video(f"{s3.bucket}/k320/a/b.mp4", f"{s3.bucket}/k160/b.mp4", TranscodeSettings(short_side=16))
    assert again.status == "encoded" and probe(again.path).num_frames == 10 and s3.keys("k160/") == ["k160/b.mp4"]


# --------------------------------------------------------------------------------------------------------------
# evl prepare --transcode


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """CVDF set of 6 good 96x64 videos (20 frames at 12 fps) plus 2 broken files; a list file with two inputs
    that want the same copy name and one outside the root."""
    root = tmp_path_factory.mktemp("transcode_set")
    write_synth_dataset(root, SynthParams(num_classes=2, train_per_class=2, val_per_class=1, width=96, height=64,
                                          frames=20, fps=12))
    bad = write_bad_videos(tmp_path_factory.mktemp("bad"))
    with open(root / "annotations" / "train.csv", "a") as csv:
        for i, name in enumerate(("truncated", "text")):
            shutil.copy(bad[name], root / "videos" / f"broken{i:05d}_000000_000010.mp4")
            csv.write(f"moving left,broken{i:05d},0,10,train\n")
    clips = root / "clips"
    clips.mkdir()
    one = next((root / "videos").glob("*.mp4"))
    shutil.copy(one, clips / "same.mp4")
    shutil.copy(one, clips / "same.mkv")
    (root / "extra.txt").write_text(f"clips/same.mp4 0\nclips/same.mkv 1\n{bad['ok_good']} 0\n")
    return root


def parse(argv):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return parser.parse_args(argv)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_prepare_transcode_copies_lists_failures_and_resumes(data_ray, dataset, tmp_path, capsys):
    dest, out = tmp_path / "copies", tmp_path / "manifests"
    argv = ["--dataset", str(dataset), "--out", str(out), "--transcode", str(dest), "--short-side", "32",
            "--keyint", "4", "--annotations", str(dataset / "annotations" / "train.csv"),
            str(dataset / "annotations" / "val.csv"), str(dataset / "extra.txt"), "--splits", "train", "val", "extra"]
    assert prepare.run(parse(argv)) == 0
    summary = json.loads((out / "summary.json").read_text())
    t = summary["transcode"]
    assert (t["videos"], t["encoded"], t["kept"], t["failed"]) == (9, 7, 0, 2)
    failures = {Path(f["path"]).name: f["reason"] for f in t["failures"]}
    assert sorted(failures) == ["ok_good.mp4", "same.mkv"] and "same name" in failures["same.mkv"]
    assert "not under the dataset root" in failures["ok_good.mp4"]
    unreadable = sorted(Path(u["path"]).name for u in summary["unreadable"])
    assert unreadable == ["broken00000_000000_000010.mp4", "broken00001_000000_000010.mp4"]
    assert summary["splits"]["train"]["copies"] == 4 and summary["splits"]["extra"]["copy_failed"] == 2
    printed = capsys.readouterr().out
    assert "7 encoded, 0 kept" in printed and "same.mkv" in printed and "broken00000" in printed

    originals = read_manifest(str(out / "originals" / "train.parquet")).to_pylist()
    copies = read_manifest(str(out / "train.parquet")).to_pylist()
    assert read_classes(str(out / "train.parquet")) == read_classes(str(out / "originals" / "train.parquet"))
    assert [c["label"] for c in copies] == [o["label"] for o in originals]
    for original, copy in zip(originals, copies):
        rel = Path(original["path"]).relative_to(dataset)
        assert copy["path"] == str(dest / rel) and Path(copy["path"]).is_file()
        assert (original["width"], original["height"]) == (96, 64)
        assert (copy["width"], copy["height"], copy["num_frames"]) == (48, 32, 20)
        assert copy["fps"] == pytest.approx(original["fps"])
        assert read_frames(copy["path"], [0, 9, 19]).shape == (3, 32, 48, 3)
        assert keyframes(copy["path"])[:3] == [0, 4, 8]
    extra = read_manifest(str(out / "extra.parquet")).to_pylist()
    assert [Path(r["path"]).relative_to(dest).as_posix() for r in extra] == ["clips/same.mp4"]

    before = mtimes(dest)
    assert prepare.run(parse(argv)) == 0  # resumed: every copy is complete, nothing is redone
    again = json.loads((out / "summary.json").read_text())["transcode"]
    assert (again["encoded"], again["kept"], again["failed"]) == (0, 7, 2)
    assert mtimes(dest) == before
    assert read_manifest(str(out / "train.parquet")).to_pylist() == copies


@pytest.mark.parametrize("where", ["root", "inside", "holds"])
def test_destination_overlapping_the_dataset_is_refused(dataset, tmp_path, capsys, where):
    dest = {"root": dataset, "inside": dataset / "videos" / "small", "holds": dataset.parent}[where]
    before = mtimes(dataset)
    code = prepare.run(parse(["--dataset", str(dataset), "--out", str(tmp_path), "--transcode", str(dest)]))
    assert code == 2 and "--transcode" in capsys.readouterr().err
    assert mtimes(dataset) == before and not (tmp_path / "summary.json").exists()


def test_transcode_flags_need_transcode(tmp_path, capsys):
    assert prepare.run(parse(["--dataset", str(tmp_path), "--out", str(tmp_path), "--short-side", "320"])) == 2
    assert "--short-side needs --transcode" in capsys.readouterr().err
