"""`evl sweep`: a Ray Tune sweep over frame count and decoder depth, tracked in MLflow.

Each trial is a Tune function that builds and fits the training workflow's TorchTrainer (Ray 2.60's pattern),
with Tune's report callback passing validation metrics up for ASHA and the final table. MLflow gets one
parent run per sweep and a nested child run per trial, so the MLflow UI's compare view shows the sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evl import storage
from evl.config import Config, ConfigError, SweepConfig, apply_overrides, dump_yaml, from_dict, read_yaml
from workflows import console
from workflows.run_dirs import latest_run, ray_storage, read_marker, timestamped

PARENT_RUN_FILE = "mlflow_parent_run_id"
TABLE_COLUMNS = ("num_frames", "decoder_num_layers", "lr", "temporal", "status", "val_top1", "val_top5",
                 "clips_per_s", "trainable_params", "mlflow_run", "pack")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="sweep YAML (configs/sweep_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the base training config for every trial")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP",
                        help="continue a stopped sweep (default: the latest of this config); finished trials are kept")
    parser.add_argument("--address", default=None)


def run(args: argparse.Namespace) -> int:
    result = sweep(args.config, overrides=args.overrides, resume=args.resume, address=args.address, progress=True)
    console.say(result.table_text())
    console.say(result.best_text())
    console.say(result.where_text())
    return 0


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, Config]:
    """The sweep config and its base training config (with the sweep's and the command line's overrides)."""
    scfg = from_dict(SweepConfig, read_yaml(path)).validate()
    base_path = scfg.base if storage.is_absolute(scfg.base) else storage.join(storage.parent(str(path)), scfg.base)
    base = from_dict(Config, apply_overrides(read_yaml(base_path), scfg.overrides + list(overrides or [])))
    base.validate()
    return scfg, base


def trial_points(scfg: SweepConfig) -> list[dict[str, Any]]:
    """Every point of the grid, as `section.key -> value` overrides."""
    axes: dict[str, list[Any]] = {"model.num_frames": scfg.num_frames,
                                  "model.decoder_num_layers": scfg.decoder_num_layers}
    if scfg.lr:
        axes["train.lr"] = scfg.lr
    if scfg.temporal_switches:
        for name in ("temporal_conv", "temporal_pos_embed", "temporal_cross_attention"):
            axes[f"model.{name}"] = [True, False]
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def trial_config(base: dict[str, Any], point: dict[str, Any], scfg: SweepConfig, trials_root: str) -> Config:
    frames, depth = point["model.num_frames"], point["model.decoder_num_layers"]
    # Frames and depth first: MLflow cuts long run names short.
    name = f"f{frames}-d{depth}" + "".join(
        f"-{k.split('.')[-1]}={v}" for k, v in point.items() if k not in ("model.num_frames",
                                                                         "model.decoder_num_layers")) + f"-{scfg.name}"
    overrides = [f"{k}={v}" for k, v in point.items()] + [
        f"data.sampling_rate={scfg.stride_for_frames[frames]}", f"name={name}", f"tracking.run_name={name}",
        f"scaling.storage_path={trials_root}"]
    return from_dict(Config, apply_overrides(base, overrides)).validate()


def sweep_points(scfg: SweepConfig, base: Config) -> list[dict[str, Any]]:
    """The points the sweep trains: the whole grid (repeated num_samples times, each repeat with the next seed),
    or for `search: random` num_samples distinct points of it drawn with the base config's seed."""
    points = trial_points(scfg)
    if scfg.search == "random":
        return random.Random(base.train.seed).sample(points, min(scfg.num_samples, len(points)))
    return [p if k == 0 else {**p, "train.seed": base.train.seed + k} for k in range(scfg.num_samples) for p in points]


def trial_packs(scfg: SweepConfig, points: list[dict[str, Any]], base: dict[str, Any],
                trials_root: str) -> list[dict[str, Any]]:
    """The sweep's Tune trials, each {"name": folder, "points": [...]}: the points that share everything on the
    data and backbone side (`evl.packing.pack_key`) go into one pack, at most max_heads_per_trial each; one point
    per trial with `pack: false` or with ASHA, which stops trials one by one."""
    from evl.packing import group_packable

    if not scfg.pack or scfg.asha:
        groups = [[i] for i in range(len(points))]
    else:
        size = scfg.max_heads_per_trial or len(points)
        groups = [group[j:j + size] for group in group_packable([trial_config(base, p, scfg, trials_root)
                                                                  for p in points])
                  for j in range(0, len(group), size)]
    packs = []
    for k, group in enumerate(groups):
        names = [trial_config(base, points[i], scfg, trials_root).name for i in group]
        packs.append({"name": names[0] if len(group) == 1 else f"pack{k}-{len(group)}heads-{names[0]}",
                      "points": [points[i] for i in group]})
    return packs


def run_trial(pack: dict[str, Any], base: dict[str, Any], scfg: dict[str, Any], trials_root: str,
              parent_run_id: str) -> None:
    """One Tune trial: a whole training run of one pack of heads, reporting to Tune through Ray Train's callback.
    Run again (a resumed sweep's errored trial), it continues the pack's run from its last checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows.train import RUN_ID_FILE, train_pack

    sweep_cfg = from_dict(SweepConfig, scfg)
    cfgs = [trial_config(base, point, sweep_cfg, trials_root) for point in pack["points"]]
    started = read_marker(storage.join(trials_root, pack["name"], RUN_ID_FILE)) is not None
    train_pack(cfgs, resume=pack["name"] if started else None, pack_name=pack["name"], parent_run_id=parent_run_id,
               callbacks=[TuneReportCallback()],
               extra_params=[{"trial.num_frames": c.model.num_frames, "trial.decoder_num_layers":
                              c.model.decoder_num_layers} for c in cfgs],
               tags={"evl.pack": pack["name"]} if len(cfgs) > 1 else None)


@dataclass
class SweepResult:
    name: str
    rows: list[dict[str, Any]]
    csv_path: str
    heatmap_path: str
    parent_run_id: str
    tracking_uri: str
    experiment: str

    def table_text(self) -> str:
        header = f"{'frames':>6} {'depth':>5} {'lr':>8} {'temporal':>8} {'status':>10} {'top-1':>6} {'top-5':>6} " \
                 f"{'clips/s':>8} {'trainable':>11}"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            lines.append(f"{r['num_frames']:>6} {r['decoder_num_layers']:>5} {r['lr']:>8.1e} {r['temporal']:>8} "
                         f"{r['status']:>10} {_fmt(r['val_top1'])} {_fmt(r['val_top5'])} "
                         f"{_fmt(r['clips_per_s'], 8, 1)} {r['trainable_params'] or '':>11}")
        return "\n".join(lines)

    def best(self) -> dict[str, Any] | None:
        done = [r for r in self.rows if r["val_top1"] is not None]
        return max(done, key=lambda r: r["val_top1"]) if done else None

    def best_text(self) -> str:
        b = self.best()
        if b is None:
            return "best: no trial finished"
        return (f"best: {b['num_frames']} frames, {b['decoder_num_layers']} decoder layers, lr {b['lr']:.1e}, "
                f"temporal {b['temporal']}: top-1 {b['val_top1']:.3f}")

    def where_text(self) -> str:
        from workflows.tracking import ui_lines

        lines = [f"sweep {self.name}",
                 f"  summary: {self.csv_path}",
                 f"  heatmap: {self.heatmap_path}",
                 f"  MLflow: parent run {self.parent_run_id} (experiment {self.experiment}) in {self.tracking_uri}, "
                 f"one child run per trial",
                 *ui_lines(self.tracking_uri, self.parent_run_id, experiment_page=True),
                 f"  library logs: {console.log_path()}" if console.log_path() else ""]
        return "\n".join(line for line in lines if line)


def _fmt(value: Any, width: int = 6, digits: int = 3) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def sweep(path: str | Path, overrides: list[str] | None = None, resume: str | None = None,
          address: str | None = None, progress: bool = False) -> SweepResult:
    """Run a sweep, or continue one (`resume`: its folder name, or "latest" for the newest of this config);
    `progress` prints a line per finished trial (and, on a terminal, the running ones) while it runs.

    Every new sweep gets a folder and an MLflow parent run of its own (`<name>-<date>-<time>`), so running the
    same config again starts afresh and never touches an earlier sweep. Whatever stops a sweep, its MLflow runs
    end FAILED (or KILLED on Ctrl-C), never RUNNING.
    """
    import ray
    from ray import tune

    from evl.model import resolve_model_config
    from workflows import tracking
    from workflows.data import cpus_needed
    from workflows.runtime import ensure_ray
    from workflows.train import anchor_paths, preflight

    scfg, base = load_sweep(path, overrides)
    base = anchor_paths(base)  # trials run in Tune's trial folders, not here
    storage_root = scfg.storage_path or base.scaling.storage_path
    storage_root = storage.absolute(storage_root)
    base_dict = base.to_dict()
    points = sweep_points(scfg, base)
    for point in points:  # every trial's config is checked before anything starts
        cfg = trial_config(base_dict, point, scfg, storage_root)
        resolve_model_config(cfg.model)
        preflight(cfg)

    if scfg.asha and scfg.asha_grace_period * base.train.eval_every >= base.train.num_steps:
        raise ConfigError(f"ASHA needs several evaluations per trial: it may stop a trial after "
                          f"asha_grace_period x train.eval_every = {scfg.asha_grace_period * base.train.eval_every} "
                          f"steps, but trials train {base.train.num_steps}; lower eval_every (and checkpoint_every, "
                          f"when Tune hears of the evaluations)")

    uri = base.tracking.tracking_uri
    if resume:
        name = latest_run(storage_root, f"{scfg.name}-", PARENT_RUN_FILE) if resume == "latest" else resume
        sweep_dir = storage.join(storage_root, name)
        parent_run_id = (read_marker(storage.join(sweep_dir, PARENT_RUN_FILE)) or "").strip() if name else ""
        if not parent_run_id or not tune.Tuner.can_restore(*storage.filesystem_for_ray(sweep_dir)):
            raise ConfigError(f"--resume: no sweep {'of ' + repr(scfg.name) if resume == 'latest' else repr(resume)} "
                              f"to resume under {storage_root}")
    else:
        name = timestamped(scfg.name)
        sweep_dir = storage.join(storage_root, name)  # local path or URI: Tune state, trials, summary
        params = {f"sweep.{k}": v for k, v in scfg.__dict__.items()}
        parent_run_id = tracking.start_run(uri, base.tracking.experiment, name, params, dump_yaml(base),
                                           tags={"evl.sweep": scfg.name, "evl.sweep_dir": sweep_dir})
        storage.write_text(storage.join(sweep_dir, PARENT_RUN_FILE), parent_run_id)
    trials_root = storage.join(sweep_dir, "trials")
    packs = trial_packs(scfg, points, base_dict, trials_root)

    try:
        ensure_ray(address, min_cpus=(scfg.max_concurrent_trials or 1) * cpus_needed(base))
        trainable = tune.with_parameters(_trial_entry, base=base_dict, scfg=scfg.__dict__, trials_root=trials_root,
                                         parent_run_id=parent_run_id)
        # The trial function only waits on its TorchTrainer; the trainer's workers and decode actors hold the
        # CPUs/GPUs.
        trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 64 * 1024 * 1024})
        concurrency = scfg.max_concurrent_trials or _concurrency(base, ray)
        if resume:
            path, fs = storage.filesystem_for_ray(sweep_dir)
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=fs)
        else:
            space = {"pack": tune.grid_search(packs)}
            scheduler = None
            if scfg.asha:
                # stop_last_trials=False: a trial that reaches max_t ends as any run does (its MLflow run
                # FINISHED, its workers' placement group released) instead of being killed at its last report.
                scheduler = tune.schedulers.ASHAScheduler(time_attr="step", grace_period=max(
                    1, scfg.asha_grace_period * base.train.eval_every), max_t=base.train.num_steps,
                    stop_last_trials=False)
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(
                    metric="val_top1", mode="max", scheduler=scheduler, max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name=name, verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                                          **ray_storage(storage_root)))
        if progress:
            packed = f" in {len(packs)} packs sharing clips and backbone" if len(packs) < len(points) else ""
            console.say(f"sweep {name}: {len(points)} trials{packed}, {base.train.num_steps} steps each, "
                        f"{concurrency} at a time")
        watch = console.SweepProgress(uri, parent_run_id, len(points), base.train.num_steps) if progress \
            else contextlib.nullcontext()
        with watch:
            grid = tuner.fit()

        rows = [row for r in grid for row in _rows(r, base)]
        rows.sort(key=lambda r: (r["num_frames"], r["decoder_num_layers"], r["lr"], r["temporal"]))
        result = SweepResult(name, rows, storage.join(sweep_dir, "summary.csv"),
                             storage.join(sweep_dir, "heatmap.png"), parent_run_id, uri, base.tracking.experiment)
        _write_summary(result, scfg, uri)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        tracking.end_open_children(uri, parent_run_id, status)
        tracking.end_run(uri, parent_run_id, status)
        raise
    # A trial ASHA stopped ends KILLED, whichever way the stop reached it: killed before its run ended (still
    # RUNNING), or its own code ending the run FAILED on the way out. Trials lost without a word stay RUNNING too.
    for row in rows:
        if row["status"] == "stopped" and row["mlflow_run"]:
            tracking.end_run(uri, row["mlflow_run"], "KILLED")
    tracking.end_open_children(uri, parent_run_id, "KILLED")
    any_ok = any(r["status"] == "finished" for r in rows)
    tracking.end_run(uri, parent_run_id, "FINISHED" if any_ok else "FAILED")
    return result


def _trial_entry(config: dict[str, Any], base: dict[str, Any], scfg: dict[str, Any], trials_root: str,
                 parent_run_id: str) -> None:
    run_trial(config["pack"], base, scfg, trials_root, parent_run_id)


def _concurrency(base: Config, ray) -> int:
    if not base.scaling.use_gpu:
        return 1
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return max(1, gpus // base.scaling.num_workers)


def _rows(result, base: Config) -> list[dict[str, Any]]:
    """The table rows of one Tune trial: one per head of its pack."""
    from workflows.train import head_metrics

    points = result.config["pack"]["points"]
    rows = []
    for i, point in enumerate(points):
        metrics = head_metrics(result.metrics or {}, i, len(points))
        temporal = "".join(("c" if point.get("model.temporal_conv", base.model.temporal_conv) else "-",
                            "p" if point.get("model.temporal_pos_embed", base.model.temporal_pos_embed) else "-",
                            "x" if point.get("model.temporal_cross_attention",
                                             base.model.temporal_cross_attention) else "-"))
        finished = result.error is None and "val_top1" in metrics and metrics.get("step") == base.train.num_steps
        status = "finished" if finished else ("failed" if result.error is not None else "stopped")
        rows.append({"num_frames": point["model.num_frames"], "decoder_num_layers": point["model.decoder_num_layers"],
                     "lr": point.get("train.lr", base.train.lr), "temporal": temporal, "status": status,
                     "val_top1": metrics.get("val_top1") if "val_top1" in metrics else None,
                     "val_top5": metrics.get("val_top5"), "clips_per_s": metrics.get("clips_per_s"),
                     "trainable_params": metrics.get("trainable_params"),
                     "mlflow_run": metrics.get("mlflow_run_id", ""), "pack": result.config["pack"]["name"]})
    return rows


def _write_summary(result: SweepResult, scfg: SweepConfig, uri: str) -> None:
    from mlflow.tracking import MlflowClient

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS)
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: row.get(k) for k in TABLE_COLUMNS})
    png = _heatmap(result, scfg)
    storage.write_text(result.csv_path, out.getvalue())
    storage.write_bytes(result.heatmap_path, png)
    client = MlflowClient(uri)
    client.log_text(result.parent_run_id, out.getvalue(), "summary.csv")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "heatmap.png").write_bytes(png)
        client.log_artifact(result.parent_run_id, str(Path(tmp) / "heatmap.png"))
    client.log_text(result.parent_run_id, result.table_text() + "\n" + result.best_text() + "\n", "summary.txt")
    best = result.best()
    if best is not None:
        client.log_metric(result.parent_run_id, "best_val_top1", best["val_top1"])
        client.set_tag(result.parent_run_id, "best_trial", f"f{best['num_frames']}-d{best['decoder_num_layers']}")


def _heatmap(result: SweepResult, scfg: SweepConfig) -> bytes:
    """frames x depth -> best validation top-1, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    frames, depths = sorted(set(scfg.num_frames)), sorted(set(scfg.decoder_num_layers))
    grid = np.full((len(frames), len(depths)), np.nan)
    for r in result.rows:  # best top-1 per (frames, depth) over the other axes
        if r["val_top1"] is not None:
            i, j = frames.index(r["num_frames"]), depths.index(r["decoder_num_layers"])
            grid[i, j] = np.nanmax([grid[i, j], r["val_top1"]])
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2, 1.0 * len(frames) + 1.5))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_yticks(range(len(frames)), [str(f) for f in frames])
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("frames")
    ax.set_title(f"{scfg.name}: validation top-1")
    for i in range(len(frames)):
        for j in range(len(depths)):
            ax.text(j, i, "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.3f}", ha="center", va="center",
                    color="w")
    fig.colorbar(image)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
