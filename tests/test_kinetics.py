"""Kinetics as users have it: CVDF CSVs with flat or per-class folders, list files, manifest round trip."""

import json
import shutil
from pathlib import Path

import pytest

from evl.video import kinetics as K
from tests.data_helpers import write_level_video

K400_FILE = Path("/work/shared/k400_class_mappings.json")

CSV = """label,youtube_id,time_start,time_end,split,is_cc
abseiling,--33Lscn6sk,4,14,train,0
"air drumming",-VtLx-mcPds,14,24,train,0
"air drumming",a_b-c_d-e_f,0,10,train,1
abseiling,--33Lscn6sk,4,14,train,0
"not a kinetics class",zzzzzzzzzzz,1,11,train,0
archery,only,fields
archery,noTimes1234,x,y,train,0
,noLabel1234,1,11,train,0
archery,absentVideo,3,13,train,0
archery,bareIdVideo,30,40,train,0
"""


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_level_video(tmp_path_factory.mktemp("k") / "v.mp4", 4)


def test_kinetics400_classes_is_the_shipped_mapping():
    names = K.kinetics400_classes()
    assert len(names) == 400 and names[0] == "abseiling" and names == sorted(names)
    if K400_FILE.is_file():
        assert names == json.loads(K400_FILE.read_text())


def test_choose_classes_k400_or_sorted_own_list():
    assert K.choose_classes({"abseiling", "archery"}) == K.kinetics400_classes()
    assert K.choose_classes({"b thing", "a thing", "abseiling"}) == ["a thing", "abseiling", "b thing"]


def test_read_cvdf_csv_quoted_labels_is_cc_and_bad_rows(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(CSV)
    rows, skipped = K.read_cvdf_csv(str(path))
    assert [r.stem for r in rows][:3] == ["--33Lscn6sk_000004_000014", "-VtLx-mcPds_000014_000024",
                                          "a_b-c_d-e_f_000000_000010"]
    assert rows[1].label == "air drumming"
    reasons = {s.line: s.reason for s in skipped}
    assert reasons[5] == "duplicate of line 2"
    assert "expected 6 fields" in reasons[7]
    assert "not numbers" in reasons[8]
    assert reasons[9] == "no label"
    assert len(rows) == 6  # well-formed rows; labels and files are checked by cvdf_split


def _dataset(root: Path, video: str, per_class_folders: bool) -> None:
    for label, stem in [("abseiling", "--33Lscn6sk_000004_000014"), ("air drumming", "-VtLx-mcPds_000014_000024"),
                        ("air drumming", "a_b-c_d-e_f_000000_000010"), ("archery", "bareIdVideo")]:
        folder = root / "train" / (label if per_class_folders else "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(video, folder / f"{stem}.mp4")
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "train.csv").write_text(CSV)


@pytest.mark.parametrize("per_class_folders", [False, True])
def test_cvdf_split_finds_videos_flat_or_per_class(tmp_path, video, per_class_folders):
    _dataset(tmp_path, video, per_class_folders)
    csv = str(tmp_path / "annotations" / "train.csv")
    classes = K.kinetics400_classes()
    parsed = K.cvdf_split(csv, K.find_videos(str(tmp_path)), classes)
    assert [(Path(e.path).stem, e.label_name, e.label) for e in parsed.entries] == [
        ("--33Lscn6sk_000004_000014", "abseiling", 0),
        ("-VtLx-mcPds_000014_000024", "air drumming", 1),
        ("a_b-c_d-e_f_000000_000010", "air drumming", 1),
        ("bareIdVideo", "archery", classes.index("archery")),
    ]
    assert all(Path(e.path).is_absolute() for e in parsed.entries)
    assert [(m.line, m.video) for m in parsed.missing] == [(10, "absentVideo_000003_000013.mp4")]
    unknown = [s for s in parsed.skipped if s.line == 6]
    assert unknown and "unknown label 'not a kinetics class'" in unknown[0].reason
    assert [s.line for s in parsed.skipped] == sorted(s.line for s in parsed.skipped)


def test_find_videos_prefers_the_larger_duplicate_and_walks_uris(tmp_path, video):
    (tmp_path / "a").mkdir()
    (tmp_path / "replacement").mkdir()
    (tmp_path / "a" / "x_000001_000011.mp4").write_bytes(b"tiny")
    shutil.copy(video, tmp_path / "replacement" / "x_000001_000011.mp4")
    (tmp_path / "a" / "notes.txt").write_text("not a video")
    found = K.find_videos(str(tmp_path))
    assert found == {"x_000001_000011": str(tmp_path / "replacement" / "x_000001_000011.mp4")}
    via_uri = K.find_videos("file://" + str(tmp_path))
    assert via_uri == {"x_000001_000011": "file://" + str(tmp_path / "replacement" / "x_000001_000011.mp4")}


def test_list_file_paths_with_spaces_bad_lines_and_duplicates(tmp_path):
    lst = tmp_path / "val.txt"
    lst.write_text("\n".join([
        "# comment",
        "abseiling/clip one.mp4 0",
        "archery/clip two.mp4\t5",
        "abseiling/clip one.mp4 0",
        "noLabel.mp4",
        "bad.mp4 seven",
        "big.mp4 400",
        "/abs/path.mp4 3",
        "s3://bucket/key with space.mp4 2",
        "",
    ]))
    parsed = K.list_file_split(str(lst), str(tmp_path / "data"), K.kinetics400_classes())
    assert [(e.path, e.label) for e in parsed.entries] == [
        (str(tmp_path / "data" / "abseiling" / "clip one.mp4"), 0),
        (str(tmp_path / "data" / "archery" / "clip two.mp4"), 5),
        ("/abs/path.mp4", 3),
        ("s3://bucket/key with space.mp4", 2),
    ]
    assert parsed.entries[0].label_name == "abseiling"
    reasons = {s.line: s.reason for s in parsed.skipped}
    assert reasons[4] == "duplicate of line 2"
    assert "expected '<path> <label index>'" in reasons[5]
    assert "not an integer" in reasons[6]
    assert "out of range [0, 400)" in reasons[7]


def test_list_file_under_a_uri_root(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a/b c.mp4 1\n")
    parsed = K.list_file_split(str(lst), "gs://bucket/k400", ["x", "y"])
    assert parsed.entries[0].path == "gs://bucket/k400/a/b c.mp4"


def test_manifest_round_trip_with_classes_beside(tmp_path):
    rows = [{"path": "/v/a.mp4", "label": 1, "label_name": "b", "num_frames": 30, "fps": 30.0, "width": 340,
             "height": 256, "extra": "ignored"}]
    manifest = str(tmp_path / "m" / "train.parquet")
    K.write_manifest(rows, manifest, classes=["a", "b"])
    table = K.read_manifest(manifest)
    assert table.schema == K.MANIFEST_SCHEMA
    assert table.to_pylist() == [{k: v for k, v in rows[0].items() if k != "extra"}]
    assert K.read_classes(manifest) == ["a", "b"]
    assert K.read_classes(str(tmp_path / "m" / "classes.json")) == ["a", "b"]
    uri_manifest = "file://" + str(tmp_path / "u" / "val.parquet")
    K.write_manifest(table, uri_manifest, classes=["a", "b"])
    assert K.read_manifest(uri_manifest).equals(table)
    assert K.read_classes(uri_manifest) == ["a", "b"]


def test_read_manifest_names_missing_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="label"):
        K.read_manifest(str(tmp_path / "bad.parquet"))


def test_not_a_kinetics_csv_is_a_clear_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="not a Kinetics annotation CSV"):
        K.read_cvdf_csv(str(path))
