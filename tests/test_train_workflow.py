"""`evl train` end to end on a real local Ray: Ray Data decoding real h264 files, two Ray Train workers with
DeepSpeed (gloo), checkpoints through Ray Train, a real MLflow SQLite store; then `evl eval` and `evl predict`
on the result, and a second run of the same config, the same numbers until a killed worker stops it, resumed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray.train
from mlflow.tracking import MlflowClient

from evl.checkpoint import load_checkpoint
from evl.config import ConfigError, load_config
from workflows.cli import main
from workflows.train import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tiny_dataset, local_ray):
    return tiny_dataset


# The first run's settings beyond tiny_config's; its rerun (the killed-worker test) uses them too.
FIRST_RUN = ("data.decode_workers=2", "train.num_steps=12", "train.eval_every=2", "train.checkpoint_every=2",
             "train.keep_checkpoints=2")


def tiny_config(dataset: Path, tmp_path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"data.train_manifest={dataset / 'manifests' / 'train.parquet'}",
        f"data.val_manifest={dataset / 'manifests' / 'val.parquet'}",
        "model.backbone=EVL-Tiny", "model.num_frames=4", "model.num_classes=3", "model.decoder_num_layers=2",
        "data.sampling_rate=2", "data.decode_workers=1", "train.batch_size=4", "train.micro_batch_size=2",
        "train.num_steps=6", "train.log_every=3", "train.eval_every=3", "train.checkpoint_every=3",
        f"scaling.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides])


@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory):
    """One run of the tiny config, two decode actors racing to feed two trainers; six evaluations and
    checkpoints, the best two kept (and the latest, which a restart needs)."""
    tmp_path = tmp_path_factory.mktemp("first")
    cfg = tiny_config(dataset, tmp_path, *FIRST_RUN)
    return cfg, train(cfg), tmp_path


def test_train_logs_to_mlflow_and_checkpoints(dataset, first_run, capsys):
    cfg, result, tmp_path = first_run
    assert 0.0 <= result.metrics["val_top1"] <= 1.0 and result.metrics["step"] == 12

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.num_frames"] == "4" and run.data.params["model.decoder_num_layers"] == "2"
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["model.backbone"] == "EVL-Tiny"
    # each metric once per measurement: train metrics every log step (3), validation every evaluation (2)
    for key in ("loss", "lr", "train_top1", "system/clips_per_s", "system/data_wait_frac", "system/decode_failures"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [3, 6, 9, 12], key
    for key in ("val_top1", "val_top5"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4, 6, 8, 10, 12], key
    assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's system metrics from rank 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion_matrix.png", "per_class_accuracy.csv", "skipped_videos.tsv",
            "checkpoint"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/decoder.pt"]

    # keep_checkpoints=2 of the six: the best two by validation top-1, and Ray Train keeps the latest too (a restart
    # resumes from it) when it is not one of them; the one returned is the best.
    val_top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top1")}
    kept = {load_checkpoint(d / "decoder.pt").extra["step"]: d for d in Path(result.run_dir).glob("checkpoint_*/")}
    best_two = set(kept) - {12} if len(kept) == 3 else set(kept)
    assert 12 in kept and len(best_two) == 2, sorted(kept)
    assert all(val_top1[step] >= val_top1[other] for step in best_two for other in set(val_top1) - best_two)
    best = load_checkpoint(Path(result.checkpoint_dir) / "decoder.pt")
    assert best.extra["val_top1"] == max(val_top1.values()) and best.extra["step"] in kept

    ckpt = load_checkpoint(Path(result.checkpoint_dir) / "decoder.pt")
    assert ckpt.model.num_frames == 4 and ckpt.class_names == sorted(["moving left", "moving right", "growing"])  # own sorted list
    assert not any("visual" in k for k in ckpt.state_dict)

    capsys.readouterr()
    assert main(["eval", "--checkpoint", result.checkpoint_dir,
                 "--manifest", str(dataset / "manifests" / "val.parquet"), "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "6 videos  top-1" in out and (tmp_path / "eval" / "per_class_accuracy.csv").is_file()

    video = next((dataset / "videos").glob("*.mp4"))
    assert main(["predict", str(video), str(tmp_path / "missing.mp4"), "--checkpoint", result.checkpoint_dir]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == str(video) and len(lines) == 4  # the video, then its top classes (3 classes here)
    assert "missing.mp4: skipped" in captured.err


def _kill_a_worker_at_new_checkpoints(run_dir_root: Path, times: int, done: threading.Event, killed: list,
                                      pattern: str = "*/checkpoint_*", from_step: int = 0) -> None:
    """Each time a checkpoint lands in storage (`pattern` under run_dir_root) that was not there at the last
    kill, SIGKILL one Ray Train worker process as soon as Ray Train's controller has registered that checkpoint
    (one of step `from_step` or later); `times` times. Appends (pid, step of the latest checkpoint registered when
    it killed) to `killed`. (A worker killed after its checkpoint is written but before the controller registers it
    loses it, and the restart rightly begins from the one before: that would be no test of resuming.)"""
    seen: set[Path] = set()
    deadline = time.time() + 300
    while time.time() < deadline and not done.is_set() and len(killed) < times:
        fresh = {p for p in run_dir_root.glob(pattern) if p.is_dir()} - seen  # not checkpoint_manager_snapshot.json
        pids = _train_worker_pids()
        registered = [step for step in map(_registered_step, fresh) if step is not None and step >= from_step]
        if pids and registered:
            os.kill(pids[0], signal.SIGKILL)
            killed.append((pids[0], max(registered)))
            seen |= set(run_dir_root.glob(pattern))
        time.sleep(0.2)


def _registered_step(checkpoint: Path) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered, once it has registered this one
    (the snapshot it writes beside its run's checkpoints, after each one it accepts, names it); else None."""
    try:
        snapshot = json.loads((checkpoint.parent / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or being rewritten
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    names = {latest.get("checkpoint_dir_name"),
             *(result["checkpoint_dir_name"] for result in snapshot.get("checkpoint_results", []))}
    return int(latest["metrics"]["step"]) if checkpoint.name in names else None


def assert_each_restart_continues_from_its_checkpoint(client: MlflowClient, run_id: str, killed_at: list[int],
                                                      log_every: int, checkpoint_every: int, last: int) -> None:
    """The run's logged steps, cut into attempts where `system/resumed_from_step` was logged: each attempt after
    the first resumed from a checkpoint at least as late as the one Ray Train had registered when its worker was
    killed (`killed_at`, one per restart), never from 0, and trains on from there without a gap, so no step up to
    that checkpoint is trained twice. (The steps an attempt trained after its last registered checkpoint are
    trained again by the next one: that is what a restart from a checkpoint means.)"""
    def in_time(key: str) -> list:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))

    resumes, losses = in_time("system/resumed_from_step"), in_time("loss")
    assert len(resumes) == len(killed_at), (resumes, killed_at)
    begins = [0, *(int(r.step) for r in resumes)]
    edges = [0, *(r.timestamp for r in resumes), float("inf")]  # an attempt logs its resume before it trains
    for i, (begin, killed) in enumerate(zip(begins, [0, *killed_at])):
        steps = [m.step for m in losses if edges[i] <= m.timestamp < edges[i + 1]]
        assert begin >= killed and begin % checkpoint_every == 0, (begin, killed)
        end = steps[-1] if steps else begin
        assert steps == [s for s in range(begin + 1, end + 1) if s % log_every == 0], (begin, steps)
    assert end == last, end


def _train_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("ray::RayTrainWorker"):
                pids.append(int(entry.name))
    return sorted(pids)


def test_a_rerun_logs_the_same_numbers_until_a_killed_worker_stops_it_then_resume_finishes_it(dataset, first_run,
                                                                                             tmp_path):
    """The first run's config again, allowed no failure (max_failures=0). On CPU a second run of one config sees the
    same clips on the same ranks in the same order, however the decode actors race, so every number it logs is the
    first run's, until a worker is killed once the checkpoint of step 6 (or later) is registered: that stops the run
    (FAILED). `--resume` then finishes it from that checkpoint: one MLflow run throughout, no step trained twice.
    (A worker group that restarts by itself, max_failures=1, is the packed sweep's test in tests/test_sweep.py: a
    plain run is a pack of one, through the same checkpoints and train loop.)"""
    _, first, _ = first_run
    cfg = tiny_config(dataset, tmp_path, *FIRST_RUN, "scaling.max_failures=0")
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_at_new_checkpoints,
                              args=(Path(cfg.scaling.storage_path), 1, done, killed), kwargs={"from_step": 6})
    killer.start()
    try:
        with pytest.raises(ray.train.TrainingFailedError):  # one failure is one more than allowed
            train(cfg)
    finally:
        done.set()
        killer.join()
    assert len(killed) == 1, killed
    run_dir = next(Path(cfg.scaling.storage_path).iterdir())
    run_id = (run_dir / "mlflow_run_id").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"
    assert not client.get_metric_history(run_id, "system/resumed_from_step")  # nothing restarted by itself

    # Everything the stopped run logged, at least up to its registered checkpoint, is what the first run logged.
    stopped_at, first_client = killed[0][1], MlflowClient(first.tracking_uri)
    for key in ("loss", "train_top1", "val_top1", "val_top5"):
        before = [(m.step, m.value) for m in first_client.get_metric_history(first.mlflow_run_id, key)]
        again = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        reached = [step for step, _ in before if step <= stopped_at]
        assert again == before[:len(again)] and len(again) >= len(reached), (key, again, before)

    other = tiny_config(dataset, tmp_path, *FIRST_RUN, "model.num_frames=8")
    with pytest.raises(ConfigError, match="num_frames: run has 4, config has 8"):
        train(other, resume=run_dir.name)

    result = train(cfg, resume="latest")
    assert result.mlflow_run_id == run_id and result.metrics["step"] == 12
    assert client.get_run(run_id).info.status == "FINISHED"
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # a single MLflow run
    # --resume began from (at least) the checkpoint registered when the worker died, and trained on from there.
    assert_each_restart_continues_from_its_checkpoint(client, run_id, [step for _, step in killed],
                                                      log_every=3, checkpoint_every=2, last=12)


def test_a_started_pass_yields_every_batch_in_order_and_raises_what_its_fetch_raised():
    from workflows.train import _started

    assert list(_started(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert list(_started(iter(()))) == []  # an empty pass stays empty: fit() reports "no batches"

    def broken():
        raise OSError("manifest gone")
        yield  # a generator

    with pytest.raises(OSError, match="manifest gone"):
        next(_started(broken()))


def test_bad_config_fails_before_ray_starts(tmp_path, capsys):
    code = main(["train", "--config", str(ROOT / "configs" / "demo.yaml"), "--set", "model.num_frame=8"])
    assert code == 2 and "unknown key model.num_frame" in capsys.readouterr().err
    code = main(["train", "--config", str(ROOT / "configs" / "demo.yaml"),
                 "--set", f"data.train_manifest={tmp_path / 'nope.parquet'}"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_relative_paths_are_anchored_where_the_command_runs(tmp_path, monkeypatch):
    from workflows.train import anchor_paths

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "weights.pt").write_bytes(b"")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        "data.train_manifest=data/train.parquet", "data.val_manifest=s3://bucket/val.parquet",
        "model.pretrained=weights.pt", "scaling.storage_path=runs"])
    anchored = anchor_paths(cfg, tmp_path)
    assert anchored.data.train_manifest == str(tmp_path / "data" / "train.parquet")
    assert anchored.data.val_manifest == "s3://bucket/val.parquet"
    assert anchored.model.pretrained == str(tmp_path / "weights.pt")
    assert anchored.scaling.storage_path == str(tmp_path / "runs")
    assert anchored.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert anchor_paths(anchored, "/elsewhere") == anchored  # idempotent: absolute paths stay
    tagged = anchor_paths(load_config(ROOT / "configs" / "vit_b16_8f.yaml"), tmp_path)
    assert tagged.model.pretrained == "openai"  # an open_clip tag, not a file
    http = load_config(ROOT / "configs" / "demo.yaml", ["tracking.tracking_uri=http://127.0.0.1:5000"])
    assert anchor_paths(http, tmp_path).tracking.tracking_uri == "http://127.0.0.1:5000"


def test_reference_checkpoint_with_local_weights_through_evl_eval(dataset, tmp_path, capsys):
    """A released-format checkpoint (written here, EVL-Tiny sized) evaluated with a local weights file: the
    backbone is QuickGELU OpenAI-style CLIP whatever the file is called, the views are the reference's, and a
    broken video in the manifest is skipped and reported."""
    import json

    import open_clip
    import torch

    from evl.checkpoint import load_into
    from evl.config import ModelConfig
    from evl.metrics import ViewAccumulator
    from evl.model import build_model
    from evl.video.kinetics import read_manifest, write_manifest
    from evl.video.views import video_test_views
    from tests.data_helpers import write_bad_videos
    from tests.test_checkpoint import reference_layout_state_dict

    torch.manual_seed(3)
    weights = tmp_path / "clip_weights.pt"  # a local file: nothing in its name says QuickGELU
    torch.save(open_clip.create_model("EVL-Tiny", pretrained=None).state_dict(), weights)
    reference = tmp_path / "k400_tiny_4f.pth"
    torch.save({"model": reference_layout_state_dict(width=64, frames=4, classes=3, layers=2, rows=49)}, reference)
    rows = read_manifest(str(dataset / "manifests" / "val.parquet")).to_pylist()
    broken = write_bad_videos(tmp_path / "bad")["truncated"]
    manifest = tmp_path / "val_with_a_broken_video.parquet"
    write_manifest(rows + [{**rows[0], "path": broken}], str(manifest))

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(reference), "--manifest", str(manifest), "--pretrained", str(weights),
                 "--set", "model.backbone=EVL-Tiny", "--set", "data.sampling_rate=2",
                 "--set", "data.num_temporal_views=2", "--set", "data.num_spatial_views=3",
                 "--out", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("6 videos  top-1")
    assert "1 videos could not be decoded" in captured.err and "truncated.mp4" in captured.err
    confusion = json.loads((tmp_path / "eval" / "confusion.json").read_text())["matrix"]

    # The same views through an explicitly QuickGELU model in this process.
    model = build_model(ModelConfig(backbone="EVL-Tiny", pretrained=str(weights), quick_gelu=True, num_frames=4,
                                    num_classes=3, decoder_num_layers=2, decoder_num_heads=1)).eval()
    from evl.checkpoint import load_checkpoint

    load_into(model.classifier, load_checkpoint(reference, given={"backbone": "EVL-Tiny"}), backbone_weights=None)
    views = ViewAccumulator(3)
    with torch.inference_mode():
        for video, row in enumerate(rows):
            clips = video_test_views(row["path"], 4, 2, 2, 3, 32)
            views.add(model(clips), torch.full((len(clips),), row["label"]), torch.full((len(clips),), video))
    assert views.result().confusion.tolist() == confusion
