"""evl.storage on local paths and on a real S3-compatible server (moto, through the fault proxy)."""

from __future__ import annotations

import os
import pickle

import pyarrow.fs as pafs
import pytest

from evl import storage


# --------------------------------------------------------------------------------------------------------------
# Names (no I/O)


def test_join_parent_and_basename_keep_the_kind_of_path():
    assert storage.join("s3://b/runs/", "/x/", "decoder.pt") == "s3://b/runs/x/decoder.pt"
    assert storage.join("/data", "a", "b.mp4") == os.path.join("/data", "a", "b.mp4")
    assert storage.join("gs://b", "", "k") == "gs://b/k"
    assert storage.parent("s3://b/runs/x/decoder.pt") == "s3://b/runs/x"
    assert storage.parent("s3://b/top/") == "s3://b"
    assert storage.parent("s3://b") == "s3://b"
    assert storage.parent("rel/file.txt") == os.path.join(os.getcwd(), "rel")
    assert storage.basename("s3://b/a b/c.mp4") == "c.mp4" and storage.basename("/x/y.json") == "y.json"


def test_absolute_anchors_local_paths_only(tmp_path):
    assert storage.absolute("data/x.parquet", str(tmp_path)) == str(tmp_path / "data" / "x.parquet")
    assert storage.absolute("/abs/x", str(tmp_path)) == "/abs/x"
    assert storage.absolute("s3://b/k", str(tmp_path)) == "s3://b/k"
    assert storage.absolute(None) is None and storage.absolute("") == ""
    assert storage.is_absolute("s3://b/k") and storage.is_absolute("/x") and not storage.is_absolute("x/y")
    assert storage.is_uri("file:///x") and storage.is_uri("s3://b") and not storage.is_uri("/x://y")


def test_relative_and_comparable(tmp_path):
    assert storage.relative("s3://b/k400/v/x.mp4", "s3://b/k400/") == "v/x.mp4"
    assert storage.relative(str(tmp_path / "a" / "b.mp4"), str(tmp_path)) == "a/b.mp4"
    for path, root in (("s3://b/other/x.mp4", "s3://b/k400"), ("s3://b/x.mp4", "/local"),
                       (str(tmp_path / "x"), str(tmp_path / "x")), (str(tmp_path), str(tmp_path / "sub"))):
        with pytest.raises(ValueError, match="is not under"):
            storage.relative(path, root)
    assert storage.comparable("file://" + str(tmp_path) + "/") == storage.comparable(str(tmp_path))
    assert storage.comparable("s3://b/x/") == "s3://b/x"


def test_uri_of_is_the_inverse_of_resolve(tmp_path):
    assert storage.uri_of(pafs.LocalFileSystem(), str(tmp_path)) == str(tmp_path)
    fs, inner = storage.resolve("file://" + str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and inner == str(tmp_path)
    assert storage.filesystem_for_ray(str(tmp_path)) == (str(tmp_path), None)


def test_unknown_scheme_is_a_storage_error_naming_the_uri():
    with pytest.raises(storage.StorageError, match=r"^nosuch://b/k: cannot open its filesystem"):
        storage.read_bytes("nosuch://b/k")


def test_storage_errors_pickle_with_path_and_reason():
    err = pickle.loads(pickle.dumps(storage.NotFound("s3://b/k", "does not exist")))
    assert isinstance(err, FileNotFoundError) and (err.path, err.reason) == ("s3://b/k", "does not exist")
    assert str(err) == "s3://b/k: does not exist"


# --------------------------------------------------------------------------------------------------------------
# Local files


def test_local_round_trip_listing_and_errors(tmp_path):
    path = str(tmp_path / "a" / "b" / "c.txt")
    storage.write_text(path, "héllo")
    assert storage.read_text(path) == "héllo" and storage.read_bytes(path) == "héllo".encode()
    assert storage.is_file(path) and storage.is_dir(str(tmp_path / "a")) and not storage.exists(path + "x")
    assert [e.name for e in storage.list_dir(str(tmp_path / "a"))] == ["b"]
    assert [(e.path, e.size) for e in storage.walk(str(tmp_path))] == [(path, len("héllo".encode()))]
    assert storage.list_dir(str(tmp_path / "missing")) == []
    with pytest.raises(storage.NotFound, match="does not exist"):
        storage.read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(storage.StorageError, match="is a folder"):
        storage.read_bytes(str(tmp_path / "a"))
    (tmp_path / "latin1.txt").write_bytes("é".encode("latin-1"))
    with pytest.raises(storage.StorageError, match="not UTF-8"):
        storage.read_text(str(tmp_path / "latin1.txt"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf[1]")
    assert storage.read_text(str(tmp_path / "bom.txt")) == "[1]"


def test_local_writes_are_atomic_and_leave_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.bin"
    storage.write_bytes(str(path), b"old")
    written = []

    def fail_to_publish(src, dst):  # the write went to another name; it fails before taking the real one
        written.append(open(src, "rb").read())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", fail_to_publish)
    with pytest.raises(storage.StorageError, match=r"ckpt.bin: cannot write it: .*No space left"):
        storage.write_bytes(str(path), b"new")
    assert written == [b"new"] and path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["ckpt.bin"]


def test_local_copy_of_a_local_file_is_the_file(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x")
    assert storage.local_copy(str(path)) == str(path)
    assert storage.local_copy("file://" + str(path)) == str(path)
    with pytest.raises(storage.NotFound):
        storage.local_copy(str(tmp_path / "nope.pt"))


# --------------------------------------------------------------------------------------------------------------
# S3 (a real S3-compatible server)


def test_s3_round_trip_listing_and_ranged_reads(s3):
    root = f"{s3.bucket}/unit/round-trip"
    storage.write_bytes(storage.join(root, "a", "x.bin"), bytes(range(256)) * 4)
    storage.write_text(storage.join(root, "b.json"), "[1, 2]")
    assert storage.read_text(f"{root}/b.json") == "[1, 2]"
    assert storage.is_file(f"{root}/a/x.bin") and storage.is_dir(f"{root}/a") and storage.exists(root)
    assert not storage.exists(f"{root}/nope") and not storage.is_dir(f"{root}/b.json")
    assert sorted((e.name, e.is_dir) for e in storage.list_dir(root)) == [("a", True), ("b.json", False)]
    assert [(e.path, e.size) for e in storage.walk(root)] == [(f"{root}/a/x.bin", 1024), (f"{root}/b.json", 6)]
    with storage.open_input(f"{root}/a/x.bin") as f:
        f.seek(300)
        assert f.read(4) == bytes([44, 45, 46, 47]) and f.size() == 1024
    assert s3.keys("unit/round-trip/") == ["unit/round-trip/a/x.bin", "unit/round-trip/b.json"]
    fs, inner = storage.resolve(f"{root}/a")
    assert storage.uri_of(fs, inner) == f"{root}/a"
    assert storage.filesystem_for_ray(root) == ("evl-test/unit/round-trip", fs)  # one filesystem per bucket


def test_s3_errors_name_the_uri(s3):
    with pytest.raises(storage.NotFound, match=r"^s3://evl-test/unit/missing.txt: does not exist$"):
        storage.read_text(f"{s3.bucket}/unit/missing.txt")
    with pytest.raises(storage.NotFound):
        storage.read_bytes("s3://no-such-bucket-here/x")
    storage.write_text(f"{s3.bucket}/unit/folder/file", "x")
    with pytest.raises(storage.StorageError, match="is a folder"):
        storage.read_bytes(f"{s3.bucket}/unit/folder")


def test_s3_upload_and_local_copy_fetch_once_and_refetch_on_change(s3, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "weights.pt"
    source.write_bytes(b"v1" * 1000)
    uri = f"{s3.bucket}/unit/weights/ViT.pt"
    storage.upload_file(str(source), uri)
    storage.write_text(f"{s3.bucket}/unit/weights/open_clip_config.json", "{}")
    first = storage.local_copy(uri)
    assert open(first, "rb").read() == b"v1" * 1000 and first.startswith(str(tmp_path / "cache"))
    before = s3.counters()["forwarded"]
    assert storage.local_copy(uri) == first  # cached: one HEAD, no download
    assert s3.counters()["forwarded"] - before == 1
    neighbour = storage.local_copy(f"{s3.bucket}/unit/weights/open_clip_config.json")
    assert os.path.dirname(neighbour) == os.path.dirname(first)
    storage.write_bytes(uri, b"v2" * 10)
    assert open(storage.local_copy(uri), "rb").read() == b"v2" * 10
    with pytest.raises(storage.NotFound):
        storage.local_copy(f"{s3.bucket}/unit/weights/missing.pt")


def test_s3_reads_and_writes_ride_through_throttling_and_resets(s3):
    root = f"{s3.bucket}/unit/faults"
    s3.faults(slowdown=0.1, reset=0.1, seed=3)
    try:
        for i in range(8):
            storage.write_text(f"{root}/{i}.txt", str(i))
        assert [storage.read_text(f"{root}/{i}.txt") for i in range(8)] == [str(i) for i in range(8)]
        counters = s3.counters()
    finally:
        s3.faults()
    assert counters["slowdowns_503"] > 0 and counters["resets"] > 0  # the faults happened, and were retried


def test_unreachable_store_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(storage, "S3_ATTEMPTS", 1)
    storage._bucket_filesystem.cache_clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    try:
        with pytest.raises(storage.StorageError) as err:
            storage.read_text("s3://evl-test/anything.txt")
    finally:
        storage._bucket_filesystem.cache_clear()
    message = str(err.value)
    assert message.startswith("s3://evl-test/anything.txt: cannot") and "\n" not in message
