"""The per-worker training step and loop.

The frozen backbone stays outside DeepSpeed: it runs without autograd in bf16 (GPU) or fp32 (CPU) and only
its features enter the engines. A Trainer trains one or more heads on them (a pack, `evl.packing`): each head is
a decoder + classification head in its own DeepSpeed engine, with its own optimizer (AdamW, cosine per step),
gradient clipping, loss scaling and dropout random stream, so a head in a pack trains exactly as it would alone;
an unpacked run is a pack of one. Nothing here imports Ray: a workflow passes batches in and receives metrics and
checkpoint requests through callbacks, and the same code runs under torchrun or in one plain process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from evl import storage
from evl.backbone import BlockFeatures, FrozenCLIPBackbone
from evl.config import Config, ConfigError, ModelConfig, TrainConfig
from evl.metrics import ViewAccumulator, topk_correct
from evl.model import EVL, EVLClassifier, backbone_dtype, resolve_model_config
from evl.packing import check_packable


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
    path = cfg.deepspeed_config
    try:
        extra = json.loads(storage.read_text(path))
    except storage.StorageError as e:
        raise ConfigError(f"train.deepspeed_config {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config {path}: {e}") from None
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


def skip_cpu_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op, which training never calls.

    On a CPU, DeepSpeed's communication backend builds that C++ op with the first engine of a process: about a
    minute of compiling on a fresh machine (a new user's first `evl demo`, a clean CI box), then a ninja check
    in every process. It serves only `inference_all_reduce` (tensor-parallel inference); the gradient reductions of
    training go through torch.distributed (gloo) either way. DeepSpeed asks its registry of buildable ops
    (`deepspeed.ops.__compatible_ops__`, probed once per process) before building it: mark the op unbuildable
    there. On a GPU the op does not exist and nothing is probed."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@dataclass
class RngState:
    """A torch random stream: the CPU generator's state and, on a GPU, the device generator's."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @classmethod
    def current(cls, device: torch.device) -> RngState:
        return cls(torch.random.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def restore(self, device: torch.device) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(self.cuda, device)


class Head:
    """One decoder + head of a Trainer, with everything an unpacked run has apart from the backbone and the data.

    `engine` (DeepSpeed) holds `classifier` (an EVLClassifier), its AdamW `optimizer` (fp16: with its own loss
    scaler), gradient clipping and the cosine `scheduler`; `rng` is the head's dropout stream, swapped in around
    its forward and backward. `model` is an EVL of this classifier on the trainer's shared backbone; that backbone
    returns the pack's deepest features, so a shallower head reads `features[-depth:]` (`Trainer.logits`).
    """

    def __init__(self, index: int, tag: str, cfg: Config, model: EVL, engine: Any, optimizer: Any, scheduler: Any,
                 rng: RngState):
        self.index, self.tag, self.cfg, self.model = index, tag, cfg, model
        self.engine, self.optimizer, self.scheduler, self.rng = engine, optimizer, scheduler, rng

    @property
    def classifier(self) -> EVLClassifier:
        return self.engine.module

    @property
    def config(self) -> ModelConfig:
        """The model config as resolved against the backbone (what a decoder checkpoint records)."""
        return self.classifier.config

    @property
    def depth(self) -> int:
        return self.config.decoder_num_layers

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.classifier.parameters() if p.requires_grad)


class Trainer:
    """One data-parallel worker: the frozen backbone plus one DeepSpeed engine per head.

    `cfgs` is one Config (one head, an unpacked run) or a list of them (a pack; `evl.packing.check_packable` must
    accept it). The backbone is built once, for the deepest head; every head is built as an unpacked Trainer
    builds its model: the torch seed set to `train.seed + rank`, then the classifier initialised from it, and the
    stream left after that (and after its engine is built) becomes the head's dropout stream. Building leaves the
    caller's random state as it found it.
    """

    def __init__(self, cfgs: Config | Sequence[Config], device: torch.device | str = "cpu",
                 deepspeed_overrides: dict[str, Any] | None = None):
        cfgs = [cfgs] if isinstance(cfgs, Config) else list(cfgs)
        check_packable(cfgs)
        self.cfgs: list[Config] = cfgs
        self.device = torch.device(device)
        init_distributed(self.device)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        resolved = [resolve_model_config(cfg.model)[0] for cfg in cfgs]  # each head checked against the backbone
        deepest = max(resolved, key=lambda m: m.decoder_num_layers)
        outer = RngState.current(self.device)
        try:
            # The backbone seeds its own random init (with the CPU stream forked; open_clip's seeding reseeds the
            # GPU stream, which each head's seeding below resets anyway).
            self.backbone = FrozenCLIPBackbone(deepest.backbone, deepest.pretrained, deepest.decoder_num_layers,
                                               seed=deepest.backbone_seed, quick_gelu=deepest.quick_gelu)
            self.backbone.to(device=self.device, dtype=backbone_dtype(deepest.backbone_precision, self.device))
            single = len(cfgs) == 1
            self.heads: list[Head] = [self._build_head(i, "state" if single else f"state-{i}", cfg,
                                                       deepspeed_overrides) for i, cfg in enumerate(cfgs)]
        finally:
            outer.restore(self.device)

    def _build_head(self, index: int, tag: str, cfg: Config, deepspeed_overrides: dict[str, Any] | None) -> Head:
        import deepspeed  # heavy import, only where an engine is built

        skip_cpu_shared_memory_op()

        torch.manual_seed(cfg.train.seed + self.rank)
        model = EVL(cfg.model, backbone=self.backbone)  # initialises the classifier; the backbone is shared
        classifier = model.classifier.to(self.device)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                      weight_decay=cfg.train.weight_decay, fused=self.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.train))
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=classifier, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg.train, self.world_size, self.device, deepspeed_overrides))
        return Head(index, tag, cfg, model, engine, optimizer, scheduler, RngState.current(self.device))

    def close(self) -> None:
        """Free the engines (decoders, optimizer state, buffers): needed when one process builds several."""
        for head in self.heads:
            head.engine.destroy()

    # ---- one head: today's single-model attributes --------------------------------------------------------

    def _single(self, what: str) -> Head:
        if len(self.heads) != 1:
            raise AttributeError(f"Trainer.{what} exists for one head only; this pack has {len(self.heads)}: use "
                                 f"trainer.heads[i].{what}")
        return self.heads[0]

    @property
    def cfg(self) -> Config:
        """The config of a one-head trainer (a pack: `cfgs`, or `heads[i].cfg`)."""
        return self._single("cfg").cfg

    @property
    def model(self) -> EVL:
        return self._single("model").model

    @property
    def engine(self) -> Any:
        return self._single("engine").engine

    @property
    def optimizer(self) -> Any:
        return self._single("optimizer").optimizer

    @property
    def scheduler(self) -> Any:
        return self._single("scheduler").scheduler

    # ---- training and evaluation ---------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken (micro-batches / accumulation steps); every head steps in lockstep."""
        return self.heads[0].engine.global_steps

    def features(self, clips: torch.Tensor) -> list[BlockFeatures]:
        """The backbone's features of the deepest head's blocks, without autograd; clips [B, T, 3, H, W] (uint8
        pixels or normalised floats) on the trainer's device."""
        return self.heads[0].model.features(clips)

    def train_micro_batch(self, clips: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One backbone forward, then per head forward and backward (its engine steps its optimizer at
        accumulation boundaries) with the head's own random stream. Returns (loss, correct) per head, in head
        order, as device tensors, so no host sync happens here."""
        clips = clips.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        features = self.features(clips)
        out = []
        outer = RngState.current(self.device)
        try:
            for head in self.heads:
                head.rng.restore(self.device)
                head.engine.train()
                logits = head.engine(features[-head.depth:])
                loss = F.cross_entropy(logits.float(), labels)
                head.engine.backward(loss)
                head.engine.step()
                head.rng = RngState.current(self.device)
                out.append((loss.detach(), topk_correct(logits.detach(), labels)))
        finally:
            outer.restore(self.device)
        return out

    @torch.no_grad()
    def logits(self, clips: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits for clips, in eval mode (no dropout), from one backbone pass."""
        features = self.features(clips.to(self.device, non_blocking=True))
        out = []
        for head in self.heads:
            head.engine.eval()
            out.append(head.engine(features[-head.depth:]))
            head.engine.train()
        return out

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> list[ViewAccumulator]:
        """Softmax scores per video over all its views, one accumulator per head (one backbone pass per batch),
        for this worker's share of the evaluation set."""
        views = [ViewAccumulator(head.config.num_classes) for head in self.heads]
        for head in self.heads:
            head.engine.eval()
        try:
            for batch in batches:
                features = self.features(batch["clip"].to(self.device, non_blocking=True))
                for head, acc in zip(self.heads, views):
                    acc.add(head.engine(features[-head.depth:]), batch["label"], batch["video"])
        finally:
            for head in self.heads:
                head.engine.train()
        return views

    def gather_views(self, views: Sequence[ViewAccumulator]) -> list[ViewAccumulator]:
        """Merge every worker's per-video scores, per head (the views of one video may be spread over workers).
        A collective (one all_gather for all heads): every rank calls it and gets the merged accumulators."""
        views = list(views)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return views
        states: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(states, [v.state() for v in views])
        merged = [ViewAccumulator(v.num_classes) for v in views]
        for rank_states in states:
            for acc, state in zip(merged, rank_states):
                acc.merge(state)
        return merged

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def rng_file(self, directory: str | Path) -> Path:
        return Path(directory) / f"rng-rank{self.rank}.pt"

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Every head's DeepSpeed checkpoint (decoder, head, optimizer, loss scaler, scheduler; every rank writes
        its shard) in `directory`, under tag `state` for one head (and `latest` naming it), `state-<i>` per head
        of a pack; plus `rng-rank<r>.pt`: this rank's dropout stream of every head."""
        directory = Path(directory)
        single = len(self.heads) == 1
        for head in self.heads:
            head.engine.save_checkpoint(str(directory), tag=head.tag, save_latest=single,
                                        client_state={"extra": extra or {}, "heads": len(self.heads),
                                                      "head": head.index})
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"heads": len(self.heads), "cpu": [h.rng.cpu for h in self.heads],
                    "cuda": [h.rng.cuda for h in self.heads]}, self.rng_file(directory))

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore what `save` wrote (every head's weights, optimizer and scheduler state, step count, and this
        rank's dropout streams when its file is there: checkpoints from before packing lack it). Returns the
        `extra` passed to save."""
        directory = Path(directory)
        missing = [h.tag for h in self.heads if not (directory / h.tag).is_dir()]
        if missing:
            found = sorted(p.name for p in directory.glob("state*") if p.is_dir()) if directory.is_dir() else []
            raise FileNotFoundError(f"no DeepSpeed checkpoint {', '.join(missing)} in {directory} (a trainer of "
                                    f"{len(self.heads)} head(s); found: {', '.join(found) or 'nothing'})")
        extra: dict[str, Any] = {}
        for head in self.heads:
            path, client = head.engine.load_checkpoint(str(directory), tag=head.tag)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint {head.tag} in {directory}")
            client = client or {}
            if client.get("heads", 1) != len(self.heads):
                raise ConfigError(f"{directory} holds a pack of {client.get('heads', 1)} heads; this trainer has "
                                  f"{len(self.heads)}")
            if head.index == 0:
                extra = client.get("extra", {})
        rng_file = self.rng_file(directory)
        if rng_file.is_file():
            saved = torch.load(rng_file, weights_only=True)
            if saved["heads"] == len(self.heads):
                for head, cpu, cuda in zip(self.heads, saved["cpu"], saved["cuda"]):
                    head.rng = RngState(cpu, cuda if cuda is not None else head.rng.cuda)
        return extra


def fit(trainer: Trainer, train_batches: Callable[[int], Iterable[dict[str, torch.Tensor]]], *,
        evaluate: Callable[[], list[dict[str, float]]] | None = None,
        on_log: Callable[[int, list[dict[str, float]]], None] = lambda step, metrics: None,
        on_checkpoint: Callable[[int, list[dict[str, float]]], None] = lambda step, metrics: None,
        extra_metrics: Callable[[], dict[str, float]] = dict) -> list[dict[str, float]]:
    """Train every head until `train.num_steps` optimizer steps, top to bottom.

    train_batches(data_pass) yields {"clip": uint8 [B, T, 3, H, W], "label": int64 [B]} micro-batches.
    Callbacks get one metrics dict per head, in a list in head order. on_log gets each metric when it is
    measured, never a stale copy: every `log_every` steps the training window (each head's loss, lr and top-1 on
    the batches; the shared clips/s, data wait, ETA, data pass and `extra_metrics()`), every `eval_every` steps
    (and at the end) what `evaluate()` returns (a list of one dict per head). Every `checkpoint_every` steps (and
    at the end) on_checkpoint is called on every rank with the latest of both per head, so it can save. Returns
    the latest of both per head.
    """
    cfg = trainer.cfgs[0].train  # the schedule's length and cadence are shared by every head of a pack
    heads = len(trainer.heads)
    metrics: list[dict[str, float]] = [{} for _ in range(heads)]  # the last training window's
    latest_eval: list[dict[str, float]] = [{} for _ in range(heads)]
    first_step, start = trainer.step, time.perf_counter()
    window = _Window(trainer.device, heads, trainer.world_size)

    def latest() -> list[dict[str, float]]:
        return [{**m, **e} for m, e in zip(metrics, latest_eval)]

    data_pass = 0  # one pass over the train dataset: an epoch, or several for small datasets
    while trainer.step < cfg.num_steps:
        batches = 0
        for batch in _timed(train_batches(data_pass), window):
            batches += 1
            before = trainer.step
            window.add(trainer.train_micro_batch(batch["clip"], batch["label"]), len(batch["label"]))
            step = trainer.step
            if step == before:
                continue  # inside an accumulation window
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                rate = (step - first_step) / (time.perf_counter() - start)
                shared = {"data_pass": float(data_pass),
                          "eta_s": (cfg.num_steps - step) / rate if rate > 0 else float("nan"), **extra_metrics()}
                metrics = [{**m, "lr": head.lr, **shared} for m, head in zip(window.flush(), trainer.heads)]
                on_log(step, metrics)
            final = step >= cfg.num_steps
            if evaluate is not None and (step % cfg.eval_every == 0 or final):
                latest_eval = _per_head(evaluate(), heads)
                on_log(step, latest_eval)
            if step % cfg.checkpoint_every == 0 or final:
                on_checkpoint(step, latest())
            if final:
                return latest()
        if batches == 0:
            raise RuntimeError("the training data yielded no batches: is the manifest empty, or every video broken?")
        data_pass += 1
    return latest()


def _per_head(result: Any, heads: int) -> list[dict[str, float]]:
    if not isinstance(result, (list, tuple)) or len(result) != heads or not all(isinstance(r, dict) for r in result):
        raise TypeError(f"evaluate() must return a list of {heads} metric dict(s), one per head, got {result!r:.200}")
    return [dict(r) for r in result]


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
    """Running sums over one logging interval, per head; synced to the host only when flushed. Every worker
    takes the same steps, so clips/s counts all of them: this worker's clips times the world size."""

    def __init__(self, device: torch.device, heads: int = 1, world_size: int = 1):
        self.device = device
        self.heads = heads
        self.world_size = world_size
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros(self.heads, device=self.device)
        self.correct = torch.zeros(self.heads, device=self.device, dtype=torch.long)
        self.micro_batches = 0
        self.clips = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, results: Sequence[tuple[torch.Tensor, torch.Tensor]], clips: int) -> None:
        """results: (loss, correct) per head, as `Trainer.train_micro_batch` returns them."""
        self.loss += torch.stack([loss for loss, _ in results])
        self.correct += torch.stack([correct for _, correct in results])
        self.micro_batches += 1
        self.clips += clips

    def flush(self) -> list[dict[str, float]]:
        elapsed = time.perf_counter() - self.started
        shared = {"clips_per_s": self.clips * self.world_size / elapsed if elapsed > 0 else 0.0,
                  "data_wait_s": self.data_wait, "data_wait_frac": self.data_wait / elapsed if elapsed > 0 else 0.0}
        losses = (self.loss / max(1, self.micro_batches)).tolist()
        corrects = self.correct.tolist()
        out = [{"loss": loss, "train_top1": correct / max(1, self.clips), **shared}
               for loss, correct in zip(losses, corrects)]
        self._reset()
        return out
