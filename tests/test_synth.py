"""The synthetic dataset: real h264 files in the CVDF layout, deterministic, with motion-only classes."""

import argparse
import csv

import numpy as np
import pytest

from evl.video.decode import probe
from evl.video.kinetics import cvdf_split, find_videos
from evl.video.synth import (
    APPEARANCE_CLASSES,
    MOTION_CLASSES,
    SYNTH_CLASSES,
    SynthParams,
    is_generated,
    render_video,
    write_synth_dataset,
)

PARAMS = SynthParams(num_classes=3, train_per_class=2, val_per_class=1, width=40, height=32, frames=12, fps=12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    rows = write_synth_dataset(root, PARAMS)
    return root, rows


def test_layout_csvs_and_real_videos(dataset):
    root, rows = dataset
    assert len(rows) == 3 * 3
    with open(root / "annotations" / "train.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["label", "youtube_id", "time_start", "time_end", "split"]
    assert len(lines) == 1 + 3 * 2
    assert '"moving left",' in (root / "annotations" / "train.csv").read_text()  # labels with spaces quoted
    for row in rows:
        path = root / "videos" / row.filename
        assert path.read_bytes()[4:8] == b"ftyp"
        info = probe(str(path))
        assert (info.num_frames, info.width, info.height, info.fps) == (12, 40, 32, 12.0)
        assert len(row.youtube_id) == 11


def test_cvdf_reader_finds_every_synthetic_video(dataset):
    root, rows = dataset
    classes = sorted(SYNTH_CLASSES[:3])
    parsed = cvdf_split(str(root / "annotations" / "val.csv"), find_videos(str(root)), classes)
    assert len(parsed.entries) == 3 and not parsed.missing and not parsed.skipped


def test_deterministic_and_cached(dataset, tmp_path):
    root, rows = dataset
    assert is_generated(root, PARAMS)
    assert not is_generated(root, SynthParams(**{**PARAMS.__dict__, "seed": 1}))
    again = write_synth_dataset(tmp_path, PARAMS, workers=2)
    assert again == rows
    for row in rows:  # same seed, same bytes, whatever the number of worker processes
        assert (root / "videos" / row.filename).read_bytes() == (tmp_path / "videos" / row.filename).read_bytes()


def test_classes_split_into_motion_and_appearance():
    assert set(SYNTH_CLASSES) == MOTION_CLASSES | APPEARANCE_CLASSES
    assert sum(c in MOTION_CLASSES for c in SYNTH_CLASSES[:8]) == 6
    assert len(SYNTH_CLASSES) >= 8


@pytest.mark.parametrize("seed", range(5))
def test_direction_classes_move_the_object_across_the_frame(seed):
    from evl.video.synth import _background, _track

    def centre_path(name):
        rng = np.random.default_rng(seed)
        background = _background(rng, 48, 64)
        track = _track(name, rng, 48, 64, 16, background)
        return track.cx[-1] - track.cx[0], track.cy[-1] - track.cy[0]

    assert centre_path("moving left")[0] < -0.3 * 64
    assert centre_path("moving right")[0] > 0.3 * 64
    assert centre_path("moving up")[1] < -0.3 * 48
    assert centre_path("moving down")[1] > 0.3 * 48
    frames = render_video("moving left", np.random.default_rng(seed), 64, 48, 16)
    assert frames.shape == (16, 48, 64, 3) and frames.dtype == np.uint8


def test_growing_vs_shrinking_and_colour_order():
    grow = render_video("growing", np.random.default_rng(0), 64, 64, 16)
    shrink = render_video("shrinking", np.random.default_rng(0), 64, 64, 16)

    def area(frames):
        diff = np.abs(frames.astype(float) - np.median(frames, axis=0)).sum(-1)
        return (diff > 60).sum((1, 2))

    assert area(grow)[-1] > area(grow)[0] and area(shrink)[-1] < area(shrink)[0]
    red_first = render_video("red then blue", np.random.default_rng(0), 64, 64, 20)
    red = red_first[..., 0].astype(int) - red_first[..., 2]
    assert red[0].max() > 100 and red[-1].min() < -100  # red blob first, blue blob last


def test_cli_writes_then_reports_cached(tmp_path, capsys):
    from workflows import synth

    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--classes", "2", "--train-per-class", "1",
                              "--val-per-class", "1", "--size", "40", "32", "--frames", "8", "--workers", "1"])
    assert synth.run(args) == 0
    assert "wrote 4 videos" in capsys.readouterr().out
    assert synth.run(args) == 0
    assert "already generated" in capsys.readouterr().out
    bad = parser.parse_args(["--out", str(tmp_path), "--size", "41"])
    assert synth.run(bad) == 2


def test_invalid_params_rejected():
    with pytest.raises(ValueError):
        SynthParams(width=41).validate()
    with pytest.raises(ValueError):
        SynthParams(num_classes=99).validate()
