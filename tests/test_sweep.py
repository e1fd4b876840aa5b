"""`evl sweep` on a real local Ray against a real MLflow tracking server (started here) and a SQLite store:
a packed grid of a tiny model on synthetic videos, a resume that reruns nothing, a rerun, failing trials,
random search and ASHA."""

from __future__ import annotations

import json
import os
import time
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
    from tests.mlflow_helpers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


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


def test_packed_grid_sweep_against_a_tracking_server_with_a_killed_worker_then_resume(dataset, mlflow_server,
                                                                                      tmp_path, capsys):
    """4 frames x 2 depths: one pack of two heads (how grids split into packs: tests/test_packing.py), each head
    a full citizen: its own FINISHED child run with its params and metrics, its checkpoint that `evl eval`
    loads, its row. A worker killed mid-run restarts the pack with every head from its own checkpoint (the
    suite's test of Ray Train restarting a worker group by itself, max_failures=1);
    --resume trains nothing again."""
    import threading

    from tests.test_train_workflow import (_kill_a_worker_at_new_checkpoints,
                                           assert_each_restart_continues_from_its_checkpoint)
    from workflows.cli import main

    path = write_sweep(tmp_path, dataset, mlflow_server, frames=[4], depths=[1, 2])
    spec = yaml.safe_load(path.read_text())
    spec["overrides"] = ["train.num_steps=6", "train.eval_every=2", "train.checkpoint_every=2",
                         "scaling.max_failures=1"]
    path.write_text(yaml.safe_dump(spec))
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_at_new_checkpoints,
                              args=(tmp_path / "sweeps", 1, done, killed), kwargs={"pattern": "*/trials/*/checkpoint_*"})
    killer.start()
    try:
        result = sweep(path)
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was killed"

    assert [(r["num_frames"], r["decoder_num_layers"], r["status"]) for r in result.rows] == [
        (4, 1, "finished"), (4, 2, "finished")]
    assert all(0.0 <= r["val_top1"] <= 1.0 and r["trainable_params"] > 0 for r in result.rows)
    assert result.rows[0]["trainable_params"] < result.rows[1]["trainable_params"]  # deeper decoder, more params

    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} >= {"summary.csv", "heatmap.png",
                                                                          "summary.txt"}
    runs = children(client, result.parent_run_id)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.params["trial.decoder_num_layers"]) for r in runs) == [1, 2]
    for r in runs:
        assert r.data.params["model.num_frames"] == r.data.params["trial.num_frames"] == "4"
        assert r.data.params["data.sampling_rate"] == "2"  # the frame count's stride
        assert {"val_top1", "loss", "system/cpu_utilization_percentage"} <= set(r.data.metrics)
        assert {"checkpoint", "confusion_matrix.png", "per_class_accuracy.csv"} <= \
            {a.path for a in client.list_artifacts(r.info.run_id)}
        # every head of the pack restarted from its own checkpoint, the one registered when the worker died
        assert_each_restart_continues_from_its_checkpoint(client, r.info.run_id, [step for _, step in killed],
                                                          log_every=2, checkpoint_every=2, last=6)
    assert len({r.data.tags["evl.pack"] for r in runs}) == 1 == len({r["pack"] for r in result.rows})

    # Each head's own checkpoint, in the project's format, through `evl eval`.
    row = result.rows[1]  # depth 2
    decoders = sorted((Path(result.csv_path).parent / "trials" / row["pack"]).glob("checkpoint_*/f4-d2-grid/decoder.pt"))
    assert len(decoders) == 2  # keep_checkpoints
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(decoders[-1].parent), "--manifest",
                 str(dataset / "manifests" / "val.parquet")]) == 0
    assert capsys.readouterr().out.startswith("6 videos  top-1")

    table = result.table_text()
    assert table.count("finished") == 2 and "top-1" in table and result.best_text().startswith("best:")
    assert Path(result.csv_path).read_text().count("\n") == 3 and Path(result.heatmap_path).stat().st_size > 0

    resumed = sweep(path, resume="latest")
    assert len(children(client, result.parent_run_id)) == 2  # nothing was trained again
    assert resumed.parent_run_id == result.parent_run_id
    assert [r["status"] for r in resumed.rows] == ["finished"] * 2


def test_failing_trials_end_their_runs_and_the_sweep_failed_twice(dataset, tmp_path):
    """Every video of the train manifest is broken: each trial fails; MLflow keeps no run RUNNING. The sweep
    searches at random: one trial drawn from the four points of the space. Then the same command again, in the
    same storage: a second sweep of its own (not Tune restoring the first one's trials), leaving the first as
    it was."""
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
    # One trainer per trial here and in the ASHA test: what they test is the sweep, not the ranks (the packed
    # sweep keeps two), and each trainer process costs ~17 CPU-s of imports and set-up.
    spec.update(overrides=[f"data.train_manifest={broken / 'train.parquet'}", "scaling.num_workers=1"],
                num_frames=[2, 4], decoder_num_layers=[1, 2], search="random", num_samples=1)
    path.write_text(yaml.safe_dump(spec))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    results = []
    for _ in range(2):
        result = sweep(path)
        [row] = result.rows
        assert (row["num_frames"], row["decoder_num_layers"]) in {(2, 1), (2, 2), (4, 1), (4, 2)}
        assert row["status"] == "failed" and result.best() is None
        assert client.get_run(result.parent_run_id).info.status == "FAILED"
        assert [r.info.status for r in children(client, result.parent_run_id)] == ["FAILED"]
        results.append(result)
        time.sleep(1)  # sweep folders are named to the second
    first, again = results
    assert again.name != first.name and again.parent_run_id != first.parent_run_id
    for result in results:
        assert (Path(result.csv_path).parent / "mlflow_parent_run_id").read_text() == result.parent_run_id
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    assert len(runs) == 4 and not [r for r in runs if r.info.status == "RUNNING"]


def test_asha_stops_the_weak_trial_of_a_sweep_typed_with_relative_paths(dataset, tmp_path, monkeypatch):
    """Two trials one after the other with the same seed (so the same initial decoder), a learning one (lr 1e-2)
    then one that cannot learn (lr 1e-9), validated on the training videos, where learning shows within a few
    steps: at the first rung (step 3) the second is still at the initial accuracy, below the first, so ASHA
    stops it and its MLflow run ends KILLED; the first runs to the end and ends FINISHED.

    Typed as users type it: run from the project folder, manifests and storage relative, the default ./mlflow.db.
    Tune runs each trial in its own folder, so every relative path must be anchored where the sweep started."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    relative = Path(os.path.relpath(dataset, tmp_path))
    path = write_sweep(tmp_path, relative, None, frames=[4], depths=[1], storage="sweeps")
    spec = yaml.safe_load(path.read_text())
    spec.update(lr=[1e-2, 1e-9], asha=True, asha_grace_period=1,
                overrides=["train.num_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
                           "scaling.num_workers=1", f"data.val_manifest={relative / 'manifests' / 'train.parquet'}"])
    path.write_text(yaml.safe_dump(spec))
    result = sweep(Path("sweep.yaml"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store beside the sweep, no other
    runs = {float(r.data.params["train.lr"]): r for r in children(client, result.parent_run_id)}
    accuracy = {lr: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val_top1")]
                for lr, r in runs.items()}
    assert accuracy[1e-2][0][1] > accuracy[1e-9][0][1], accuracy  # the rung's comparison, as ASHA saw it
    assert [(r["lr"], r["status"]) for r in result.rows] == [(1e-9, "stopped"), (1e-2, "finished")], result.rows
    assert {lr: r.info.status for lr, r in runs.items()} == {1e-2: "FINISHED", 1e-9: "KILLED"}
    assert [step for step, _ in accuracy[1e-9]] == [3] and [step for step, _ in accuracy[1e-2]] == [3, 6]
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"

    # Every path anchored where the sweep started: one store, the sweep's folder under ./sweeps.
    assert result.name.startswith("grid-") and path.exists()
    assert Path(result.csv_path) == tmp_path / "sweeps" / result.name / "summary.csv"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("mlflow.db")) == [Path("mlflow.db")]
    assert (tmp_path / "sweeps" / result.name / "mlflow_parent_run_id").read_text() == result.parent_run_id
    for run in runs.values():
        assert run.info.run_name.startswith("f4-d1")  # frames and depth first: the UI cuts long names
        assert run.data.params["trial.num_frames"] == "4" and "val_top1" in run.data.metrics
        assert run.data.params["data.train_manifest"] == str((dataset / "manifests" / "train.parquet").resolve())
    experiment = client.get_experiment_by_name("sweep-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    with pytest.raises(ConfigError, match="no sweep 'nope' to resume"):
        sweep(Path("sweep.yaml"), resume="nope")


def test_bad_sweep_configs_fail_before_anything_starts(dataset, tmp_path):
    from evl.config import SweepConfig, from_dict
    from workflows.sweep import load_sweep

    path = write_sweep(tmp_path, dataset, None, frames=[4], depths=[1])
    spec = yaml.safe_load(path.read_text())
    bad = {"search": ("bayes", "search must be grid or random"),
           "num_frames": ([], "must each list at least one value"),
           "stride_for_frames": ({2: 4}, "no stride for num_frames \\[4\\]"),
           "num_samples": (0, "num_samples must be positive"),
           "max_concurrent_trials": (0, "max_concurrent_trials must be positive"),
           "decoder_num_layer": ([1], "unknown key decoder_num_layer"),
           "lr": (["fast"], "lr\\[0\\] must be a number")}
    for key, (value, message) in bad.items():
        path.write_text(yaml.safe_dump({**spec, key: value}))
        with pytest.raises(ConfigError, match=message):
            load_sweep(path)
    path.write_text(yaml.safe_dump({**spec, "asha": True}))  # eval_every 4 = num_steps: one evaluation only
    with pytest.raises(ConfigError, match="ASHA needs several evaluations"):
        sweep(path)
    path.write_text(yaml.safe_dump({**spec, "decoder_num_layers": [1, 9]}))  # EVL-Tiny has 3 blocks
    with pytest.raises(ConfigError, match="decoder_num_layers=9"):
        sweep(path)
    assert from_dict(SweepConfig, {"num_frames": [8]}).validate().search == "grid"


def test_grid_covers_every_combination():
    from evl.config import SweepConfig

    points = trial_points(SweepConfig(num_frames=[8, 16, 32], decoder_num_layers=[1, 2, 3, 4], lr=[1e-4, 4e-4]))
    assert len(points) == 24 and len({tuple(p.items()) for p in points}) == 24
    switches = trial_points(SweepConfig(num_frames=[8], decoder_num_layers=[4], temporal_switches=True))
    assert len(switches) == 8
