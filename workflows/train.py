"""`evl train`: EVL on a Ray cluster.

Ray Data decodes clips on CPU actors and streams equal shards to a Ray Train TorchTrainer; each worker runs
`evl.training` (frozen backbone + DeepSpeed engine around decoder and head). Checkpoints go through
`ray.train.report`, kept top-k by validation top-1; a failed worker group restarts from the last one. The
driver owns the MLflow run; rank 0 writes metrics and artifacts to it.

A run may train a pack of heads (`train_pack`, what a packed sweep trial does): one decoded stream and one
backbone pass per step feed several decoders + heads, each with its own MLflow run, metrics, artifacts and
decoder checkpoint (`<checkpoint>/<head name>/decoder.pt`), as if it had trained alone. A plain run is a pack
of one, with its decoder at `<checkpoint>/decoder.pt`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evl import storage
from evl.config import Config, ConfigError, dump_yaml, from_dict, load_config
from workflows.run_dirs import latest_run, ray_storage, read_marker, timestamped

RUN_ID_FILE = "mlflow_run_id"
log = logging.getLogger("evl.train")  # in workers, Ray Train routes logging to the driver's console once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.num_frames=16 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_NAME",
                        help="continue a stopped run (default: the latest run of this config)")
    parser.add_argument("--address", default=None, help="Ray address (default: local Ray or RAY_ADDRESS)")


def run(args: argparse.Namespace) -> int:
    from workflows import console

    cfg = load_config(args.config, args.overrides)
    console.say(f"training {cfg.name}: {describe(cfg)}")
    result = train(cfg, resume=args.resume, address=args.address, progress=True)
    console.say(result.summary())
    return 0


def describe(cfg: Config) -> str:
    """One line on what a run trains and where."""
    device = "GPU" if cfg.scaling.use_gpu else "CPU"
    return (f"{cfg.model.backbone} EVL, {cfg.model.num_frames} frames, {cfg.model.decoder_num_layers} decoder layers, "
            f"{cfg.train.num_steps} steps of {cfg.train.batch_size} clips on {cfg.scaling.num_workers} {device} "
            f"workers (DeepSpeed)")


@dataclass
class TrainResult:
    run_name: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_dir: str | None
    wall_s: float

    def summary(self) -> str:
        from workflows import console
        from workflows.tracking import ui_lines

        top1 = self.metrics.get("val_top1")
        lines = [f"run {self.run_name} finished in {console.duration(self.wall_s)}",
                 f"  validation top-1 {top1:.3f}, top-5 {self.metrics.get('val_top5', float('nan')):.3f}"
                 if top1 is not None else "  no validation set",
                 f"  best checkpoint: {self.checkpoint_dir}",
                 f"  MLflow run {self.mlflow_run_id} in {self.tracking_uri}",
                 *ui_lines(self.tracking_uri, self.mlflow_run_id),
                 f"  library logs: {console.log_path()}" if console.log_path() else ""]
        return "\n".join(line for line in lines if line)


# ------------------------------------------------------------------------------------------------------------
# Before Ray: everything that can be checked is checked here, so a bad config fails in seconds.


def anchor_paths(cfg: Config, root: str | Path | None = None) -> Config:
    """A copy with every relative local path made absolute against `root` (default: the current directory).

    Ray runs trial functions and workers in directories of their own (Tune moves each trial into its trial
    folder), so a config that says `data/synth/...` must be anchored where the user typed the command.
    URIs (s3://, sqlite:////, http://) and open_clip tags are left alone; `model.pretrained` is anchored only
    when it names an existing file.
    """
    from dataclasses import replace

    from workflows.tracking import resolve_tracking_uri

    root = str(root or Path.cwd())

    def local(path: str | None) -> str | None:
        return storage.absolute(path, root)

    pretrained = cfg.model.pretrained
    if pretrained and not storage.is_uri(pretrained) and os.path.isfile(os.path.join(root, pretrained)):
        pretrained = local(pretrained)
    tracking_uri = cfg.tracking.tracking_uri
    if tracking_uri is None or tracking_uri.startswith("sqlite:///"):
        tracking_uri = resolve_tracking_uri(tracking_uri, root)
    return replace(
        cfg,
        model=replace(cfg.model, pretrained=pretrained),
        data=replace(cfg.data, train_manifest=local(cfg.data.train_manifest),
                     val_manifest=local(cfg.data.val_manifest), class_names=local(cfg.data.class_names)),
        train=replace(cfg.train, deepspeed_config=local(cfg.train.deepspeed_config)),
        scaling=replace(cfg.scaling, storage_path=local(cfg.scaling.storage_path)),
        tracking=replace(cfg.tracking, tracking_uri=tracking_uri))


def preflight(cfg: Config, offline: bool = False) -> None:
    """Everything about `cfg` that can be checked before Ray starts; `offline` leaves out what needs the data's
    store (that the manifests exist), for validating cluster configs away from their bucket."""
    from evl.checkpoint import CheckpointError  # noqa: F401  (import check of the model stack)
    from evl.model import resolve_model_config
    from evl.training import gradient_accumulation_steps, read_deepspeed_overrides

    resolve_model_config(cfg.model)
    gradient_accumulation_steps(cfg.train, cfg.scaling.num_workers)
    if not cfg.data.train_manifest:
        raise ConfigError("data.train_manifest is not set: run `evl prepare` and point it at the train manifest")
    for key in ("train_manifest", "val_manifest") if not offline else ():
        path = getattr(cfg.data, key)
        try:
            found = not path or storage.is_file(path)
        except storage.StorageError as e:
            raise ConfigError(f"data.{key}: {e}") from None
        if not found:
            raise ConfigError(f"data.{key}: {path} does not exist")
    read_deepspeed_overrides(cfg.train)


def class_names(cfg: Config) -> list[str]:
    """The dataset's class list: data.class_names, else classes.json beside the train manifest, else K400's."""
    from evl.video.kinetics import CLASSES_FILE, kinetics400_classes, read_classes

    path = cfg.data.class_names
    try:
        if not path and cfg.data.train_manifest:
            beside = storage.join(storage.parent(cfg.data.train_manifest), CLASSES_FILE)
            path = beside if storage.exists(beside) else None
        names = read_classes(path) if path else kinetics400_classes()
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.class_names: {e}") from None
    if len(names) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the dataset has {len(names)} classes"
                          f" ({path or 'Kinetics-400, as no classes.json is beside the train manifest'})")
    return names


def _run_name(cfg: Config, resume: str | None) -> str:
    """The run's folder name under scaling.storage_path (cfg has anchored paths)."""
    if resume and resume != "latest":
        return resume
    if resume == "latest":
        name = latest_run(cfg.scaling.storage_path, f"{cfg.name}-", RUN_ID_FILE)
        if name is None:
            raise ConfigError(f"--resume: no earlier run of {cfg.name!r} under {cfg.scaling.storage_path}")
        return name
    return cfg.tracking.run_name or timestamped(cfg.name)


# ------------------------------------------------------------------------------------------------------------
# The driver.


def train(cfg: Config, resume: str | None = None, address: str | None = None,
          parent_run_id: str | None = None, extra_params: dict[str, Any] | None = None,
          callbacks: list | None = None, progress: bool = False) -> TrainResult:
    """Run one training job and return where everything went. `parent_run_id` nests the MLflow run (sweeps);
    `callbacks` are Ray Train callbacks (a sweep passes Tune's report callback); `progress` prints the run's
    progress (read back from MLflow) while it trains."""
    return train_pack([cfg], resume=resume, address=address, parent_run_id=parent_run_id,
                      extra_params=[extra_params or {}], callbacks=callbacks, progress=progress)[0]


def train_pack(cfgs: list[Config], resume: str | None = None, address: str | None = None,
               parent_run_id: str | None = None, extra_params: list[dict[str, Any]] | None = None,
               callbacks: list | None = None, progress: bool = False, pack_name: str | None = None,
               tags: dict[str, str] | None = None) -> list[TrainResult]:
    """Train the heads `cfgs` (`evl.packing.check_packable` must accept them) in one Ray Train run, one MLflow
    run each; returns one TrainResult per head. The run's folder is `pack_name` (default: the first head's run
    name) under the heads' shared storage."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from evl.backbone import backbone_spec
    from evl.packing import check_packable
    from evl.training import read_deepspeed_overrides
    from workflows import console, tracking
    from workflows.data import cpus_needed, eval_dataset, ingest_options, train_dataset
    from workflows.decode_stats import decode_stats
    from workflows.runtime import ensure_ray

    start = time.perf_counter()
    cfgs = [anchor_paths(cfg) for cfg in cfgs]
    for cfg in cfgs:
        preflight(cfg)
    check_packable(cfgs)
    cfg = cfgs[0]  # what the heads share: data, backbone, schedule, workers
    names = class_names(cfg)
    image_size = backbone_spec(cfg.model.backbone).image_size
    extra_params = extra_params or [{} for _ in cfgs]

    uri = cfg.tracking.tracking_uri  # anchor_paths resolved it
    root, run_name = cfg.scaling.storage_path, pack_name or _run_name(cfg, resume)
    run_dir = storage.join(root, run_name)
    head_names = [c.tracking.run_name or c.name for c in cfgs] if len(cfgs) > 1 else [run_name]
    if resume:
        run_ids = (read_marker(storage.join(run_dir, RUN_ID_FILE)) or "").split()
        if len(run_ids) != len(cfgs):
            raise ConfigError(f"--resume {run_name}: no run of {len(cfgs)} head(s) in {run_dir}")
        _check_resumable(cfgs, run_dir)
    else:
        run_ids = [tracking.start_run(uri, c.tracking.experiment, head, {**c.flat(), **params}, dump_yaml(c),
                                      tags={"evl.run_dir": run_dir, **(tags or {})}, parent_run_id=parent_run_id)
                   for c, head, params in zip(cfgs, head_names, extra_params)]
        storage.write_text(storage.join(run_dir, RUN_ID_FILE), "\n".join(run_ids))
        storage.write_text(storage.join(run_dir, "config.yaml"),
                           dump_yaml(cfg) if len(cfgs) == 1 else dump_yaml([c.to_dict() for c in cfgs]))

    ensure_ray(address, min_cpus=cpus_needed(cfg))
    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop reports progress itself
    watch = console.RunProgress(uri, run_ids[0], cfg.train.num_steps) if progress else contextlib.nullcontext()
    try:
        with decode_stats() as stats, watch:  # the run's own count of the videos its decoders drop
            datasets = {"train": train_dataset(cfg, image_size, stats)}
            if cfg.data.val_manifest:
                datasets["val"] = eval_dataset(cfg, image_size, cfg.data.val_manifest, stats)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"configs": [c.to_dict() for c in cfgs], "heads": head_names, "run_ids": run_ids,
                                   "tracking_uri": uri, "class_names": names, "decode_stats": stats,
                                   "deepspeed_overrides": read_deepspeed_overrides(cfg.train)},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                    resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}),
                run_config=ray.train.RunConfig(
                    name=run_name, **ray_storage(root),
                    checkpoint_config=ray.train.CheckpointConfig(
                        num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="val_top1",
                        checkpoint_score_order="max"),
                    failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                    callbacks=callbacks),
                datasets=datasets,
                # Train shards are equal so every worker takes the same number of steps; the validation set is
                # not split (an equal split would drop views), rank 0 reads all of it.
                dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                                    execution_options=ingest_options(cfg)),
            )
            result = trainer.fit()
    except BaseException as e:
        for run_id in run_ids:
            tracking.end_run(uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    for run_id in run_ids:
        tracking.end_run(uri, run_id, "FINISHED")
    wall = time.perf_counter() - start
    return [TrainResult(run_name=head, run_dir=run_dir, mlflow_run_id=run_id, tracking_uri=uri,
                        metrics=head_metrics(result.metrics or {}, i, len(cfgs)),
                        checkpoint_dir=_best_checkpoint(result, i, len(cfgs), head), wall_s=wall)
            for i, (head, run_id) in enumerate(zip(head_names, run_ids))]


def head_metrics(report: dict[str, Any], index: int, heads: int) -> dict[str, Any]:
    """One head's metrics from a run's report: a pack reports each head's under `h<i>/`."""
    if heads == 1:
        return dict(report)
    prefix = f"h{index}/"
    return {"step": report.get("step"), **{k[len(prefix):]: v for k, v in report.items() if k.startswith(prefix)}}


def _best_checkpoint(result, index: int, heads: int, head: str) -> str | None:
    """The kept checkpoint where this head's validation top-1 was highest (a pack's: its head's folder)."""
    def score(metrics: dict[str, Any]) -> float:
        return head_metrics(metrics, index, heads).get("val_top1", 0.0)

    if result.best_checkpoints:
        checkpoint = max(result.best_checkpoints, key=lambda cm: score(cm[1]))[0]
    elif result.checkpoint:
        checkpoint = result.checkpoint
    else:
        return None
    path = storage.uri_of(checkpoint.filesystem, checkpoint.path)  # Ray's path has no scheme
    return path if heads == 1 else storage.join(path, head)


def _check_resumable(cfgs: list[Config], run_dir: str) -> None:
    """Refuse to resume a run with another model configuration before any worker starts."""
    import yaml

    from evl.checkpoint import STRUCTURAL_FIELDS

    text = read_marker(storage.join(run_dir, "config.yaml"))
    if text is None:
        return
    saved = yaml.safe_load(text)
    saved = saved if isinstance(saved, list) else [saved]
    if len(saved) != len(cfgs):
        raise ConfigError(f"cannot resume {run_dir}: it trained {len(saved)} head(s), not {len(cfgs)}")
    diffs = []
    for old, cfg in zip(saved, cfgs):
        model = anchor_paths(from_dict(Config, old)).model
        diffs += [f"{k}: run has {getattr(model, k)!r}, config has {getattr(cfg.model, k)!r}"
                  for k in (*STRUCTURAL_FIELDS, "pretrained", "backbone_seed")
                  if getattr(model, k) != getattr(cfg.model, k)]
    if diffs:
        raise ConfigError(f"cannot resume {run_dir} with another model configuration:\n  " + "\n  ".join(diffs))


# ------------------------------------------------------------------------------------------------------------
# Each worker.


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfgs = [from_dict(Config, c) for c in loop_cfg["configs"]]
    cfg, packed = cfgs[0], len(cfgs) > 1
    micro = cfg.train.micro_batch_size
    train_shard = ray.train.get_dataset_shard("train")

    def pass_of_batches():
        return train_shard.iter_torch_batches(batch_size=micro, drop_last=True, prefetch_batches=2)

    # The data pipeline first: Ray Data starts the decode actors and they decode the first clips while this
    # worker imports the model's libraries (seconds) and builds the model.
    first_pass = [_started(pass_of_batches())]

    from mlflow.tracking import MlflowClient

    from evl.checkpoint import save_checkpoint
    from evl.training import Trainer, fit
    from workflows import tracking
    from workflows.decode_stats import decode_failures, decoders_in_use

    heads, run_ids = loop_cfg["heads"], loop_cfg["run_ids"]
    uri, names, stats = loop_cfg["tracking_uri"], loop_cfg["class_names"], loop_cfg["decode_stats"]
    rank = ray.train.get_context().get_world_rank()
    trainer = Trainer(cfgs, ray.train.torch.get_device(), loop_cfg["deepspeed_overrides"])
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            trainer.load(directory)
    client, monitors = None, []
    if rank == 0:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        client = MlflowClient(uri)
        for run_id in run_ids:  # CPU/GPU/memory of this node, every 10 s, on every head's run
            monitors.append(SystemMetricsMonitor(run_id, resume_logging=bool(restored), tracking_uri=uri))
            monitors[-1].start()
            if restored:  # a restarted worker group (or --resume): the step it continues from, on the charts
                tracking.log_metrics(client, run_id, trainer.step, {"resumed_from_step": float(trainer.step)})
    val_shard = ray.train.get_dataset_shard("val") if cfg.data.val_manifest else None
    last_eval: dict[str, Any] = {}
    test_views = {"sampling_rate": cfg.data.sampling_rate, "num_temporal_views": cfg.data.num_temporal_views,
                  "num_spatial_views": cfg.data.num_spatial_views}  # so `evl predict` views clips as eval did

    def train_batches(data_pass: int):
        return first_pass.pop() if first_pass else pass_of_batches()

    def evaluate() -> list[dict[str, float]]:
        batches = val_shard.iter_torch_batches(batch_size=micro) if rank == 0 else []
        results = [views.result() for views in trainer.gather_views(trainer.evaluate(batches))]
        last_eval["results"] = results
        return [r.metrics() for r in results]

    def on_log(step: int, per_head: list[dict[str, float]]) -> None:
        if rank != 0:
            return
        for run_id, metrics in zip(run_ids, per_head):
            tracking.log_metrics(client, run_id, step, metrics)
        for head, metrics in zip(heads, per_head):
            if "loss" in metrics:
                log.info(f"{head} step {step}/{cfg.train.num_steps} loss {metrics['loss']:.4f} "
                         f"top1 {metrics['train_top1']:.3f} lr {metrics['lr']:.2e} "
                         f"{metrics['clips_per_s']:.1f} clips/s data wait {metrics['data_wait_frac']:.0%} "
                         f"ETA {metrics['eta_s']:.0f} s")
            else:
                log.info(f"{head} step {step} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def extra_metrics() -> dict[str, float]:
        if rank != 0:
            return {}
        fleet = decoders_in_use(stats)  # {node: decode actors that delivered lately}
        return {"decode_failures": float(decode_failures(stats)["total"]), "decode_actors": float(sum(fleet.values())),
                "decode_nodes": float(len(fleet))}

    def on_checkpoint(step: int, per_head: list[dict[str, float]]) -> None:
        final = step >= cfg.train.num_steps
        report: dict[str, Any] = {"step": step}
        with tempfile.TemporaryDirectory() as directory:
            trainer.save(directory, extra={"step": step})
            for i, (head, run_id, metrics) in enumerate(zip(heads, run_ids, per_head)):
                folder = Path(directory) / head if packed else Path(directory)
                if rank == 0:
                    save_checkpoint(folder / "decoder.pt", trainer.heads[i].classifier, trainer.heads[i].config,
                                    trainer.backbone.weights_id, class_names=names,
                                    extra={"step": step, "test_views": test_views,
                                           **{k: v for k, v in metrics.items() if k.startswith("val_")}})
                    if final:
                        results = last_eval.get("results")
                        _log_final_artifacts(client, run_id, folder / "decoder.pt",
                                             results[i] if results else None, names, stats)
                own = {"val_top1": metrics.get("val_top1", 0.0), **metrics,
                       "trainable_params": trainer.heads[i].trainable_parameters(), "mlflow_run_id": run_id}
                report.update({f"h{i}/{k}": v for k, v in own.items()} if packed else own)
            if packed:  # the run's score (which checkpoints Ray keeps): its best head's
                report["val_top1"] = max(report[f"h{i}/val_top1"] for i in range(len(heads)))
            try:  # the upload to scaling.storage_path happens here, before Ray Train registers the checkpoint
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))
            except OSError as e:
                raise storage.StorageError(cfg.scaling.storage_path, f"the checkpoint of step {step} could not be "
                                           f"uploaded: {' '.join(str(e).split())[:300]}") from None

    fit(trainer, train_batches, evaluate=evaluate if val_shard is not None else None,
        on_log=on_log, on_checkpoint=on_checkpoint, extra_metrics=extra_metrics)
    for monitor in monitors:
        monitor.finish()  # the driver sets the runs' final status


_DONE = object()  # _started's end of the data


def _started(batches: Iterable[Any]) -> Iterator[Any]:
    """`batches`, its first item fetched by a thread from now on: a worker starts its data pipeline (Ray Data
    starts the decode actors and they decode the first clips) while it builds the model, not after."""
    items = iter(batches)
    first: queue.Queue = queue.Queue(maxsize=1)

    def fetch() -> None:
        try:
            first.put((next(items, _DONE), None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            first.put((_DONE, e))

    threading.Thread(target=fetch, name="evl-first-batch", daemon=True).start()

    def chained() -> Iterator[Any]:
        item, error = first.get()
        if error is not None:
            raise error
        if item is not _DONE:
            yield item
            yield from items

    return chained()


def _log_final_artifacts(client, run_id: str, decoder_path: Path, result, names: list[str], stats: str) -> None:
    from workflows import tracking
    from workflows.decode_stats import decode_failures

    client.log_artifact(run_id, str(decoder_path), "checkpoint")
    failures = decode_failures(stats)
    client.log_text(run_id, "\n".join(f"{path}\t{reason}" for path, reason in failures["files"].items()) + "\n",
                    "skipped_videos.tsv")
    if result is not None:
        tracking.log_confusion_matrix(client, run_id, result.confusion, names)
        client.log_text(run_id, tracking.per_class_csv(result.per_class_accuracy, result.confusion, names),
                        "per_class_accuracy.csv")
