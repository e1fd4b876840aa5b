"""The cluster's data path on a real S3-compatible server (moto behind the fault proxy, tests/s3_helpers.py), every
command typed as a user types it: prepare and transcode from and to s3, train with s3 manifests (their class list
beside them) and s3 storage while the store throttles and drops connections, the printed best checkpoint
evaluated and predicted from s3, `--resume` from s3, and a packed sweep with s3 storage; MLflow is a tracking
server whose artifacts go to s3."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from evl import storage
from evl.checkpoint import load_checkpoint
from tests.s3_helpers import upload_tree
from workflows.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory):
    """An `mlflow server` proxying artifacts to s3://evl-test/mlartifacts."""
    from tests.mlflow_helpers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-s3"), artifacts=f"{s3.bucket}/mlartifacts") as url:
        yield url


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`evl ARGS` in this process: (exit code, what it printed on stdout, on stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def prepared(s3, tiny_dataset, local_ray):
    """The tiny synthetic set uploaded as a user keeps it (CVDF layout), then `evl prepare` from s3 to s3 with
    training-ready copies in s3."""
    dataset = f"{s3.bucket}/tiny"
    upload_tree(tiny_dataset / "videos", f"{dataset}/videos")
    upload_tree(tiny_dataset / "annotations", f"{dataset}/annotations")
    return run_cli(["prepare", "--dataset", dataset, "--out", f"{s3.bucket}/manifests",
                    "--transcode", f"{s3.bucket}/tiny-copies", "--short-side", "32"])


TINY_RUN = ("name=tiny-s3", "model.backbone=EVL-Tiny", "model.num_frames=4", "model.num_classes=3",
            "model.decoder_num_layers=2", "data.sampling_rate=2", "data.decode_workers=1", "train.batch_size=4",
            "train.micro_batch_size=2", "train.num_steps=6", "train.log_every=3", "train.eval_every=3",
            "train.checkpoint_every=3", "scaling.num_workers=1")


def train_args(s3, tracking: str, *extra: str) -> list[str]:
    """`evl train` of the demo config shrunk to the tiny set, its manifests and storage in s3."""
    settings = (f"data.train_manifest={s3.bucket}/manifests/train.parquet",
                f"data.val_manifest={s3.bucket}/manifests/val.parquet", f"scaling.storage_path={s3.bucket}/runs",
                f"tracking.tracking_uri={tracking}", *TINY_RUN, *extra)
    return ["train", "--config", str(ROOT / "configs" / "demo.yaml"), *[a for s in settings for a in ("--set", s)]]


@pytest.fixture(scope="module")
def trained(s3, prepared, tracking):
    """`evl train` on the s3 manifests into s3 storage, while the store answers 3 % of requests with 503 SlowDown
    and resets 1 % of connections (every client retries: pyarrow, Ray Train's uploads, MLflow's boto3).
    (exit code, stdout, stderr, the proxy's counters)."""
    assert prepared[0] == 0, prepared[2]
    s3.faults(slowdown=0.03, reset=0.01, seed=7)
    try:
        result = run_cli(train_args(s3, tracking))
        faults = s3.counters()
    finally:
        s3.faults()
    return (*result, faults)


def best_checkpoint(trained) -> str:
    return re.search(r"best checkpoint: (\S+)", trained[1]).group(1)


def test_prepare_reads_and_writes_s3(s3, prepared):
    code, out, err = prepared
    assert code == 0, err
    assert "summary: s3://evl-test/manifests/summary.json" in out  # pasteable
    summary = json.loads(storage.read_text(f"{s3.bucket}/manifests/summary.json"))
    assert [summary["splits"][split]["usable"] for split in ("train", "val")] == [12, 6]
    assert len(json.loads(storage.read_text(f"{s3.bucket}/manifests/classes.json"))) == 3
    from evl.video.kinetics import read_manifest

    paths = read_manifest(f"{s3.bucket}/manifests/train.parquet").column("path").to_pylist()
    assert len(paths) == 12 and all(p.startswith("s3://evl-test/tiny-copies/videos/") for p in paths)
    assert all(storage.is_file(p) for p in paths)
    originals = read_manifest(f"{s3.bucket}/manifests/originals/train.parquet").column("path").to_pylist()
    assert all(p.startswith("s3://evl-test/tiny/videos/") for p in originals)


def test_train_on_s3_through_faults_reports_only_readable_checkpoints(s3, trained, tracking):
    code, out, err, faults = trained
    assert code == 0, err
    assert faults["slowdowns_503"] > 0 and faults["resets"] > 0, faults  # the run met the faults
    best = best_checkpoint(trained)
    assert best.startswith("s3://evl-test/runs/tiny-s3-") and storage.is_file(storage.join(best, "decoder.pt"))

    run_dir = storage.parent(best)
    kept = [e.path for e in storage.list_dir(run_dir) if e.is_dir and e.name.startswith("checkpoint_")]
    assert kept
    steps = sorted(load_checkpoint(path).extra["step"] for path in kept)  # each readable, whole
    assert steps == [3, 6]
    run_id = storage.read_text(storage.join(run_dir, "mlflow_run_id")).strip()
    client = MlflowClient(tracking)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3, 6]
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [3, 6]
    # The artifacts went through the tracking server to s3.
    keys = s3.keys("mlartifacts/")
    assert any(k.endswith(f"{run_id}/artifacts/checkpoint/decoder.pt") for k in keys), keys
    assert any(k.endswith(f"{run_id}/artifacts/per_class_accuracy.csv") for k in keys)


def test_the_printed_checkpoint_is_evaluated_and_predicted_from_s3(s3, prepared, trained, capsys):
    best = best_checkpoint(trained)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", best, "--manifest", f"{s3.bucket}/manifests/val.parquet",
                 "--out", f"{s3.bucket}/eval/tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 videos  top-1")
    assert "wrote s3://evl-test/eval/tiny/per_class_accuracy.csv and s3://evl-test/eval/tiny/confusion.json" in out
    confusion = json.loads(storage.read_text(f"{s3.bucket}/eval/tiny/confusion.json"))
    assert sum(map(sum, confusion["matrix"])) == 6 and len(confusion["classes"]) == 3

    from evl.video.kinetics import read_manifest

    video = read_manifest(f"{s3.bucket}/manifests/val.parquet").column("path")[0].as_py()
    missing = f"{s3.bucket}/tiny-copies/videos/missing.mp4"
    assert main(["predict", video, missing, "--checkpoint", storage.join(best, "decoder.pt")]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == video and len(captured.out.splitlines()) == 1 + 3  # top-3 of 3 classes
    assert f"{missing}: skipped" in captured.err and "file not found" in captured.err


def test_resume_finds_the_run_in_s3_and_continues_it(s3, trained, tracking, capsys):
    best = best_checkpoint(trained)
    run_id = storage.read_text(storage.join(storage.parent(best), "mlflow_run_id")).strip()
    capsys.readouterr()
    assert main([*train_args(s3, tracking, "train.num_steps=9"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"run {storage.basename(storage.parent(best))} finished" in out
    client = MlflowClient(tracking)
    assert [m.value for m in client.get_metric_history(run_id, "system/resumed_from_step")] == [6.0]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3, 6, 9]  # nothing trained twice


def test_packed_sweep_with_s3_storage(s3, prepared, tracking, tmp_path, capsys):
    """Two heads in one pack, its Tune state, trials, checkpoints, summary and heatmap in s3; the best head's
    checkpoint loads from there; --resume restores the sweep from s3 and trains nothing again."""
    import yaml

    base = {"name": "tiny", "model": {"backbone": "EVL-Tiny", "pretrained": None, "num_classes": 3},
            "data": {"train_manifest": f"{s3.bucket}/manifests/train.parquet",
                     "val_manifest": f"{s3.bucket}/manifests/val.parquet", "num_temporal_views": 1,
                     "num_spatial_views": 1, "rand_augment": None, "decode_workers": 1},
            "train": {"batch_size": 4, "micro_batch_size": 2, "num_steps": 2, "log_every": 2, "eval_every": 2,
                      "checkpoint_every": 2, "precision": "fp32"},
            "scaling": {"num_workers": 1, "use_gpu": False, "max_failures": 0},
            "tracking": {"tracking_uri": tracking, "experiment": "sweep-s3"}}
    storage.write_text(f"{s3.bucket}/configs/base.yaml", yaml.safe_dump(base))
    spec = {"base": "base.yaml", "name": "grid", "num_frames": [4], "decoder_num_layers": [1, 2],
            "stride_for_frames": {4: 2}, "storage_path": f"{s3.bucket}/sweeps"}
    storage.write_text(f"{s3.bucket}/configs/sweep.yaml", yaml.safe_dump(spec))  # base: beside it, in s3

    capsys.readouterr()
    assert main(["sweep", "--config", f"{s3.bucket}/configs/sweep.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished") >= 2
    summary = re.search(r"summary: (\S+)", out).group(1)
    assert summary.startswith("s3://evl-test/sweeps/grid-") and summary.endswith("/summary.csv")
    assert storage.read_text(summary).count("\n") == 3
    assert storage.info(storage.join(storage.parent(summary), "heatmap.png")).size > 0
    decoders = [e.path for e in storage.walk(storage.join(storage.parent(summary), "trials"))
                if e.name == "decoder.pt"]
    assert len(decoders) == 2  # one per head, in the pack's checkpoint
    assert sorted(load_checkpoint(d).model.decoder_num_layers for d in decoders) == [1, 2]

    assert main(["sweep", "--config", f"{s3.bucket}/configs/sweep.yaml", "--resume"]) == 0
    assert capsys.readouterr().out.count("finished") >= 2


def test_class_list_in_s3_beside_the_manifest_or_named(s3, prepared, tmp_path):
    """The dataset's class names come from s3 as from a local folder: data.class_names when set, else the
    classes.json beside the train manifest; a count that does not match is refused naming the list."""
    from evl.config import ConfigError, load_config
    from workflows.train import class_names

    def cfg(*extra: str):
        return load_config(ROOT / "configs" / "demo.yaml", [
            f"data.train_manifest={s3.bucket}/manifests/train.parquet", "model.num_classes=3", *extra])

    beside = json.loads(storage.read_text(f"{s3.bucket}/manifests/classes.json"))
    assert class_names(cfg()) == beside
    storage.write_text(f"{s3.bucket}/classes/three.json", json.dumps(["a", "b", "c"]))
    assert class_names(cfg(f"data.class_names={s3.bucket}/classes/three.json")) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"data.class_names: s3://evl-test/classes/none.json: does not exist"):
        class_names(cfg(f"data.class_names={s3.bucket}/classes/none.json"))
    with pytest.raises(ConfigError, match=r"model.num_classes=4 but the dataset has 3 classes \(s3://evl-test/"
                                          r"manifests/classes.json\)"):
        class_names(cfg("model.num_classes=4"))
    no_list = cfg(f"data.train_manifest={s3.bucket}/elsewhere/train.parquet", "model.num_classes=4")
    with pytest.raises(ConfigError, match="has 400 classes \\(Kinetics-400, as no classes.json is beside"):
        class_names(no_list)
