"""The per-worker training step and loop.

The frozen backbone stays outside DeepSpeed: it runs without autograd in bf16 (GPU) or fp32 (CPU) and only
its features enter the engine, which holds the decoder and head, their optimizer (AdamW, cosine per step) and
gradient accumulation. Nothing here imports Ray: a workflow passes batches in and receives metrics and
checkpoint requests through callbacks, and the same code runs under torchrun or in one plain process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from evl.config import Config, ConfigError, TrainConfig
from evl.metrics import ViewAccumulator, gather_views, topk_correct
from evl.model import EVL, build_model


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """The global batch stays `cfg.batch_size` whatever the number of workers: accumulation fills the gap."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is not a multiple of micro_batch_size x workers "
                          f"= {cfg.micro_batch_size} x {world_size}")
    return cfg.batch_size // per_step


def decoder_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def read_deepspeed_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The JSON file `train.deepspeed_config` names, read once by the driver (workers may run elsewhere)."""
    if not cfg.deepspeed_config:
        return {}
    path = Path(cfg.deepspeed_config)
    try:
        extra = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed_config {path}: {e}") from e
    if not isinstance(extra, dict):
        raise ConfigError(f"train.deepspeed_config {path} must hold a JSON object")
    return extra


def deepspeed_config(cfg: TrainConfig, world_size: int, device: torch.device,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed's config from the recipe; `overrides` (default: the `train.deepspeed_config` file) win."""
    precision = decoder_precision(cfg, device)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, world_size),
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 30,  # progress is reported by the loop, not by DeepSpeed
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip:
        ds["gradient_clipping"] = cfg.grad_clip
    return _merge(ds, read_deepspeed_overrides(cfg) if overrides is None else overrides)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def cosine_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup, then cosine decay to zero at `num_steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def init_distributed(device: torch.device) -> None:
    """Make sure a process group exists (Ray Train and torchrun create one; a plain process gets world size 1)."""
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class Trainer:
    """One data-parallel worker: the frozen backbone plus a DeepSpeed engine around decoder and head."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu",
                 deepspeed_overrides: dict[str, Any] | None = None):
        import deepspeed  # heavy import, only where an engine is built

        self.cfg = cfg
        self.device = torch.device(device)
        init_distributed(self.device)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        torch.manual_seed(cfg.train.seed + self.rank)
        self.model: EVL = build_model(cfg.model, self.device)
        classifier = self.model.classifier
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                      weight_decay=cfg.train.weight_decay, fused=self.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.train))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=classifier, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg.train, self.world_size, self.device, deepspeed_overrides))

    def close(self) -> None:
        """Free the engine (decoder, optimizer state, buffers): needed when one process builds several."""
        self.engine.destroy()

    @property
    def step(self) -> int:
        """Optimizer steps taken (micro-batches / accumulation steps)."""
        return self.engine.global_steps

    def train_micro_batch(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward one micro-batch; the engine steps the optimizer at accumulation boundaries.
        Returns (loss, correct) as device tensors, so no host sync happens here."""
        clips = clips.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.engine.train()
        logits = self.engine(self.model.features(clips))
        loss = F.cross_entropy(logits.float(), labels)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach(), topk_correct(logits.detach(), labels)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> ViewAccumulator:
        """Softmax scores per video over all its views, for this worker's share of the evaluation set."""
        self.engine.eval()
        views = ViewAccumulator(self.cfg.model.num_classes)
        for batch in batches:
            logits = self.engine(self.model.features(batch["clip"].to(self.device, non_blocking=True)))
            views.add(logits, batch["label"], batch["video"])
        self.engine.train()
        return views

    def gather_views(self, views: ViewAccumulator) -> ViewAccumulator:
        """Merge every worker's per-video scores (the views of one video may be spread over workers)."""
        return gather_views(views)

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """DeepSpeed checkpoint (decoder, head, optimizer, scheduler; every rank writes its shard)."""
        self.engine.save_checkpoint(str(directory), tag="state", client_state={"extra": extra or {}})

    def load(self, directory: str | Path) -> dict[str, Any]:
        path, client = self.engine.load_checkpoint(str(directory), tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        return (client or {}).get("extra", {})


def fit(trainer: Trainer, train_batches: Callable[[int], Iterable[dict[str, torch.Tensor]]], *,
        evaluate: Callable[[], dict[str, float]] | None = None,
        on_log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
        on_checkpoint: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
        extra_metrics: Callable[[], dict[str, float]] = dict) -> dict[str, float]:
    """Train until `train.num_steps` optimizer steps, top to bottom.

    train_batches(data_pass) yields {"clip": uint8 [B, T, 3, H, W], "label": int64 [B]} micro-batches.
    on_log gets each metric when it is measured, never a stale copy: every `log_every` steps the training
    window (loss, lr, top-1 on the batches, clips/s, data wait, ETA), every `eval_every` steps (and at the end)
    what `evaluate()` returns. Every `checkpoint_every` steps (and at the end) on_checkpoint is called on every
    rank with the latest of both, so it can save. Returns the latest of both.
    """
    cfg = trainer.cfg.train
    metrics: dict[str, float] = {}  # the last training window's
    latest_eval: dict[str, float] = {}
    first_step, start = trainer.step, time.perf_counter()
    window = _Window(trainer.device, trainer.world_size)
    data_pass = 0  # one pass over the train dataset: an epoch, or several for small datasets
    while trainer.step < cfg.num_steps:
        batches = 0
        for batch in _timed(train_batches(data_pass), window):
            batches += 1
            before = trainer.step
            loss, correct = trainer.train_micro_batch(batch["clip"], batch["label"])
            window.add(loss, correct, len(batch["label"]))
            step = trainer.step
            if step == before:
                continue  # inside an accumulation window
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                metrics = window.flush()
                rate = (step - first_step) / (time.perf_counter() - start)
                metrics.update(lr=trainer.scheduler.get_last_lr()[0], data_pass=float(data_pass),
                               eta_s=(cfg.num_steps - step) / rate if rate > 0 else float("nan"),
                               **extra_metrics())
                on_log(step, metrics)
            final = step >= cfg.num_steps
            if evaluate is not None and (step % cfg.eval_every == 0 or final):
                latest_eval = evaluate()
                on_log(step, latest_eval)
            if step % cfg.checkpoint_every == 0 or final:
                on_checkpoint(step, {**metrics, **latest_eval})
            if final:
                return {**metrics, **latest_eval}
        if batches == 0:
            raise RuntimeError("the training data yielded no batches: is the manifest empty, or every video broken?")
        data_pass += 1
    return {**metrics, **latest_eval}


def _timed(batches: Iterable[Any], window: _Window) -> Iterator[Any]:
    """Yield batches, adding the time spent waiting for each to the window's data-wait counter."""
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        window.data_wait += time.perf_counter() - t0
        yield batch


class _Window:
    """Running sums over one logging interval; synced to the host only when flushed. Every worker takes the
    same steps, so clips/s counts all of them: this worker's clips times the world size."""

    def __init__(self, device: torch.device, world_size: int = 1):
        self.device = device
        self.world_size = world_size
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.micro_batches = 0
        self.clips = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, clips: int) -> None:
        self.loss += loss
        self.correct += correct
        self.micro_batches += 1
        self.clips += clips

    def flush(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        out = {"loss": (self.loss / max(1, self.micro_batches)).item(),
               "train_top1": self.correct.item() / max(1, self.clips),
               "clips_per_s": self.clips * self.world_size / elapsed if elapsed > 0 else 0.0,
               "data_wait_s": self.data_wait, "data_wait_frac": self.data_wait / elapsed if elapsed > 0 else 0.0}
        self._reset()
        return out
