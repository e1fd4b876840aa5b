"""`evl sweep` on a real local Ray against a real MLflow tracking server (started here) and a SQLite store:
2 frame counts x 2 decoder depths of a tiny model on synthetic videos, then a resume that reruns nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from evl.config import ConfigError
from workflows.sweep import sweep, trial_points

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tiny_dataset, local_ray):
    return tiny_dataset


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with one worker, as users run it."""
    home = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


def write_sweep(tmp_path: Path, dataset: Path, tracking_uri: str | None, frames, depths,
                storage: str | None = None) -> Path:
    base = {
        "name": "tiny",
        "model": {"backbone": "EVL-Tiny", "pretrained": None, "num_classes": 3, "cls_dropout": 0.0},
        "data": {"train_manifest": str(dataset / "manifests" / "train.parquet"),
                 "val_manifest": str(dataset / "manifests" / "val.parquet"),
                 "num_temporal_views": 1, "num_spatial_views": 1, "rand_augment": None, "decode_workers": 1},
        "train": {"batch_size": 4, "micro_batch_size": 2, "num_steps": 4, "log_every": 2, "eval_every": 4,
                  "checkpoint_every": 4, "precision": "fp32"},
        "scaling": {"num_workers": 2, "use_gpu": False, "max_failures": 0},
        "tracking": {"tracking_uri": tracking_uri, "experiment": "sweep-test"},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": "base.yaml", "name": "grid", "num_frames": frames, "decoder_num_layers": depths,
            "stride_for_frames": {2: 4, 4: 2}, "storage_path": storage or str(tmp_path / "sweeps")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def children(client: MlflowClient, parent_run_id: str):
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_grid_sweep_against_a_tracking_server_then_resume(dataset, mlflow_server, tmp_path, capsys):
    path = write_sweep(tmp_path, dataset, mlflow_server, frames=[2, 4], depths=[1, 2])
    result = sweep(path)

    assert [(r["num_frames"], r["decoder_num_layers"], r["status"]) for r in result.rows] == [
        (2, 1, "finished"), (2, 2, "finished"), (4, 1, "finished"), (4, 2, "finished")]
    assert all(0.0 <= r["val_top1"] <= 1.0 and r["trainable_params"] > 0 for r in result.rows)
    assert result.rows[0]["trainable_params"] < result.rows[1]["trainable_params"]  # deeper decoder, more params

    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} >= {"summary.csv", "heatmap.png",
                                                                          "summary.txt"}
    runs = children(client, result.parent_run_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    trials = sorted((int(r.data.params["trial.num_frames"]), int(r.data.params["trial.decoder_num_layers"]))
                    for r in runs)
    assert trials == [(2, 1), (2, 2), (4, 1), (4, 2)]
    for r in runs:
        assert r.data.params["model.num_frames"] == r.data.params["trial.num_frames"]
        assert r.data.params["data.sampling_rate"] == {"2": "4", "4": "2"}[r.data.params["model.num_frames"]]
        assert "val_top1" in r.data.metrics and "loss" in r.data.metrics

    table = result.table_text()
    assert table.count("finished") == 4 and "top-1" in table and result.best_text().startswith("best:")
    assert Path(result.csv_path).read_text().count("\n") == 5 and Path(result.heatmap_path).stat().st_size > 0

    resumed = sweep(path, resume="latest")
    assert len(children(client, result.parent_run_id)) == 4  # nothing was trained again
    assert resumed.parent_run_id == result.parent_run_id
    assert [r["status"] for r in resumed.rows] == ["finished"] * 4


def test_sweep_against_a_sqlite_store_with_relative_paths_twice(dataset, tmp_path, monkeypatch):
    """As users type it: run from the project folder, manifests and storage relative, the default ./mlflow.db.
    Tune runs each trial in its own folder, so every relative path must be anchored where the sweep started.
    Then the same command again: a second sweep of its own, leaving the first as it was."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    relative = Path(os.path.relpath(dataset, tmp_path))
    path = write_sweep(tmp_path, relative, None, frames=[4], depths=[1], storage="sweeps")
    result = sweep(Path("sweep.yaml"))
    assert [r["status"] for r in result.rows] == ["finished"]
    assert result.name.startswith("grid-") and path.exists()
    assert Path(result.csv_path) == tmp_path / "sweeps" / result.name / "summary.csv"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store beside the sweep, no other
    [run] = children(client, result.parent_run_id)
    assert run.info.run_name.startswith("f4-d1")  # frames and depth first: the UI cuts long names
    assert run.data.params["trial.num_frames"] == "4" and "val_top1" in run.data.metrics
    assert run.data.params["data.train_manifest"] == str((dataset / "manifests" / "train.parquet").resolve())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("mlflow.db")) == [Path("mlflow.db")]
    experiment = client.get_experiment_by_name("sweep-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    time.sleep(1)  # sweep folders are named to the second
    again = sweep(Path("sweep.yaml"))
    assert again.name != result.name and again.parent_run_id != result.parent_run_id
    assert [r["status"] for r in again.rows] == ["finished"]
    for sweep_result in (result, again):  # each parent FINISHED with its own one child; no run left RUNNING
        assert client.get_run(sweep_result.parent_run_id).info.status == "FINISHED"
        [child] = children(client, sweep_result.parent_run_id)
        assert child.info.status == "FINISHED"
        stored = (tmp_path / "sweeps" / sweep_result.name / "mlflow_parent_run_id").read_text()
        assert stored == sweep_result.parent_run_id
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and not [r for r in runs if r.info.status == "RUNNING"]
    with pytest.raises(ConfigError, match="no sweep 'nope' to resume"):
        sweep(Path("sweep.yaml"), resume="nope")


def test_failing_trials_end_their_runs_and_the_sweep_failed(dataset, tmp_path):
    """Every video of the train manifest is broken: each trial fails; MLflow keeps no run RUNNING."""
    from evl.video.kinetics import read_manifest, write_manifest
    from tests.data_helpers import write_bad_videos

    bad = write_bad_videos(tmp_path / "bad")
    table = read_manifest(str(dataset / "manifests" / "train.parquet")).to_pylist()
    rows = [{**row, "path": bad[("truncated", "text", "zero_bytes")[i % 3]]} for i, row in enumerate(table)]
    broken = tmp_path / "broken"
    broken.mkdir()
    write_manifest(rows, str(broken / "train.parquet"),
                   classes=json.loads((dataset / "manifests" / "classes.json").read_text()))
    path = write_sweep(tmp_path, dataset, f"sqlite:///{tmp_path / 'mlflow.db'}", frames=[4], depths=[1])
    spec = yaml.safe_load(path.read_text())
    spec["overrides"] = [f"data.train_manifest={broken / 'train.parquet'}"]
    path.write_text(yaml.safe_dump(spec))
    result = sweep(path)
    assert [r["status"] for r in result.rows] == ["failed"] and result.best() is None
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(result.parent_run_id).info.status == "FAILED"
    assert [r.info.status for r in children(client, result.parent_run_id)] == ["FAILED"]


def test_grid_covers_every_combination():
    from evl.config import SweepConfig

    points = trial_points(SweepConfig(num_frames=[8, 16, 32], decoder_num_layers=[1, 2, 3, 4], lr=[1e-4, 4e-4]))
    assert len(points) == 24 and len({tuple(p.items()) for p in points}) == 24
    switches = trial_points(SweepConfig(num_frames=[8], decoder_num_layers=[4], temporal_switches=True))
    assert len(switches) == 8
