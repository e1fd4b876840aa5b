"""`evl prepare`: annotations + videos -> probed Parquet manifests, on a real local Ray."""

import argparse
import json

import pytest

from evl.video.kinetics import read_classes, read_manifest
from evl.video.synth import SYNTH_CLASSES
from tests.data_helpers import small_synth
from workflows import prepare
from workflows.prepare import prepare_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_prepare")
    small_synth(root, classes=3, train=3, val=2, frames=20, size=40)
    return root


def parse(argv):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return parser.parse_args(argv)


def test_prepare_cvdf_dataset_writes_manifests_classes_and_summary(data_ray, synth, tmp_path):
    summary = prepare_dataset(str(synth), str(tmp_path))
    classes = sorted(SYNTH_CLASSES[:3])  # not Kinetics labels: own sorted list
    assert read_classes(str(tmp_path / "classes.json")) == classes
    assert summary["class_source"] == "sorted labels"
    assert {k: (v["annotated"], v["usable"]) for k, v in summary["splits"].items()} == {"train": (9, 9),
                                                                                        "val": (6, 6)}
    train = read_manifest(str(tmp_path / "train.parquet")).to_pylist()
    assert len(train) == 9
    for row in train:
        assert (row["num_frames"], row["width"], row["height"], row["fps"]) == (20, 40, 40, 12.0)
        assert classes[row["label"]] == row["label_name"]
        assert row["path"].startswith(str(synth))
    assert summary["splits"]["val"]["per_class"] == {name: 2 for name in classes}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["splits"] == summary["splits"] and not on_disk["unreadable"] and not on_disk["missing"]
    assert "transcode" not in on_disk and not (tmp_path / "originals").exists()  # only with --transcode


def test_cli_one_split_prints_summary(data_ray, synth, tmp_path, capsys):
    assert prepare.run(parse(["--dataset", str(synth), "--out", str(tmp_path), "--splits", "val"])) == 0
    out = capsys.readouterr().out
    assert "val" in out and "usable videos per class" in out and "summary.json" in out
    assert (tmp_path / "val.parquet").is_file() and not (tmp_path / "train.parquet").exists()


def test_list_file_with_data_root_and_class_file(data_ray, synth, tmp_path):
    videos = sorted((synth / "videos").glob("*.mp4"))[:4]
    (tmp_path / "list.txt").write_text("".join(f"{v.name} {i % 2}\n" for i, v in enumerate(videos)) + "x.mp4 9\n")
    (tmp_path / "names.json").write_text(json.dumps(["even", "odd"]))
    summary = prepare_dataset(None, str(tmp_path / "out"), splits=["mine"], list_files=[str(tmp_path / "list.txt")],
                              data_root=str(synth / "videos"), classes=str(tmp_path / "names.json"))
    rows = read_manifest(str(tmp_path / "out" / "mine.parquet")).to_pylist()
    assert [(r["label"], r["label_name"]) for r in rows] == [(0, "even"), (1, "odd"), (0, "even"), (1, "odd")]
    assert summary["skipped_lines"][0]["reason"] == "label index 9 out of range [0, 2)"
    assert read_classes(str(tmp_path / "out" / "classes.json")) == ["even", "odd"]


def test_dataset_given_as_uri(data_ray, synth, tmp_path):
    uri = "file://" + str(synth)
    prepare_dataset(uri, "file://" + str(tmp_path), splits=["val"])
    rows = read_manifest(str(tmp_path / "val.parquet")).to_pylist()
    assert len(rows) == 6 and all(r["path"].startswith(uri + "/videos/") for r in rows)


def test_missing_annotations_is_a_clean_error(data_ray, tmp_path, capsys):
    assert prepare.run(parse(["--dataset", str(tmp_path), "--out", str(tmp_path / "o")])) == 2
    assert "evl prepare:" in capsys.readouterr().err


def test_bad_decode_resources_are_refused_before_ray_starts(tmp_path, capsys):
    assert prepare.run(parse(["--dataset", str(tmp_path), "--out", str(tmp_path), "--decode-resources", "[1]"])) == 2
    assert "--decode-resources must be a JSON object" in capsys.readouterr().err
