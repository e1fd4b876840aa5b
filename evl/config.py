"""Typed configuration: the one source of defaults.

Every option lives in a dataclass below with the reference implementation's default. Experiments are YAML
files that override some of them (`configs/*.yaml`); the command line overrides further with dotted
`section.key=value` pairs. Unknown keys and ill-typed values fail with the offending key named, before any
work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the key."""


@dataclass
class ModelConfig:
    """The EVL model: frozen open_clip backbone, temporal decoder, classification head."""

    backbone: str = "ViT-B-16"  # open_clip model name (custom configs registered with add_model_config work)
    pretrained: str | None = "openai"  # open_clip tag, a local .pt/.safetensors file, or null for random weights
    backbone_seed: int = 0  # seeds the random backbone when pretrained is null, so every process builds the same one
    quick_gelu: bool | None = None  # CLIP's activation; null: as the weights say (tag, -quickgelu name), else GELU
    num_frames: int = 8
    num_classes: int = 400
    decoder_num_layers: int = 4
    decoder_qkv_dim: int | None = None  # null: the backbone width (768 for B/16, 1024 for L/14)
    decoder_num_heads: int | None = None  # null: the backbone's head count (12 for B/16, 16 for L/14)
    decoder_mlp_factor: float = 4.0
    decoder_mlp_dropout: float = 0.5
    cls_dropout: float = 0.5
    temporal_conv: bool = True
    temporal_pos_embed: bool = True
    temporal_cross_attention: bool = True
    backbone_precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or fp32 / bf16 / fp16

    def validate(self) -> None:
        _positive(self, "num_frames", "num_classes", "decoder_num_layers", "decoder_mlp_factor")
        _positive_or_none(self, "decoder_qkv_dim", "decoder_num_heads")
        for name in ("decoder_mlp_dropout", "cls_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        _one_of(self, "backbone_precision", ("auto", "fp32", "bf16", "fp16"))


@dataclass
class DataConfig:
    """Where the videos are and how clips are drawn from them (reference data pipeline)."""

    train_manifest: str | None = None  # Parquet manifest written by `evl prepare`
    val_manifest: str | None = None
    class_names: str | None = None  # JSON list of class names; null: Kinetics-400's
    sampling_rate: int = 16  # frames between sampled frames; negative: segment (TSN) sampling
    num_temporal_views: int = 3  # test-time views evenly spaced in time
    num_spatial_views: int = 1  # test-time crops: 1 (center) or 3 (along the long side)
    decode_short_side: int | None = None  # resize the short side while decoding; null: keep the video's size
    rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1"  # timm RandAugment spec, same ops on every frame
    min_scale: float = 0.08  # RandomResizedCrop scale range
    max_scale: float = 1.0
    decode_workers: int | None = None  # a fixed pool of this many decode actors; null: an elastic pool that
    # starts with one actor per CPU the trainers leave free and grows onto CPUs (and nodes) that join
    max_decode_workers: int | None = None  # the elastic pool's cap; null: as many as keep the trainers fed
    decode_batch_size: int = 4  # videos per decode call
    decode_resources: dict[str, float] = field(default_factory=dict)  # e.g. {"decode_node": 0.001}
    max_train_videos: int | None = None  # subset for quick runs
    passes_per_epoch: int = 1  # manifest passes (each reshuffled) per Ray Data epoch; >1 keeps the decode
    # actors alive across passes instead of restarting them (seconds each) -- worth it for small datasets
    deterministic: bool = True  # clips reach the trainers in the seeded order (same seed, same data on every
    # rank); false: whichever decode actor finishes first goes first (clips themselves stay seeded)

    def validate(self) -> None:
        if self.sampling_rate == 0:
            raise ConfigError("data.sampling_rate must be non-zero (negative selects segment sampling)")
        _positive(self, "num_temporal_views", "decode_batch_size", "passes_per_epoch")
        _positive_or_none(self, "decode_short_side", "decode_workers", "max_decode_workers", "max_train_videos")
        if self.decode_workers and self.max_decode_workers:
            raise ConfigError("data.decode_workers sets a fixed pool, data.max_decode_workers caps an elastic one: "
                              "set one of them")
        if self.num_spatial_views not in (1, 3):
            raise ConfigError(f"data.num_spatial_views must be 1 or 3, got {self.num_spatial_views}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ConfigError(f"data.min_scale/max_scale must satisfy 0 < min <= max <= 1, "
                              f"got {self.min_scale}, {self.max_scale}")


@dataclass
class TrainConfig:
    """The recipe (reference defaults) and the engine around it."""

    lr: float = 4e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 256  # global batch in clips, whatever the number of workers
    micro_batch_size: int = 32  # clips per worker per forward; accumulation fills the global batch
    num_steps: int = 50_000  # optimizer steps; cosine decay to zero over them
    warmup_steps: int = 0
    grad_clip: float | None = None
    precision: str = "auto"  # decoder: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 (loss scaling), fp32
    zero_stage: int = 1
    deepspeed_config: str | None = None  # JSON file whose keys are merged over the generated DeepSpeed config
    log_every: int = 10
    eval_every: int = 5_000
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 2  # kept top-k by validation top-1
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "lr", "batch_size", "micro_batch_size", "num_steps", "log_every", "eval_every",
                  "checkpoint_every", "keep_checkpoints")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.num_steps:
            raise ConfigError(f"train.warmup_steps must be in [0, num_steps), got {self.warmup_steps}")
        _one_of(self, "precision", ("auto", "fp32", "bf16", "fp16"))
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}")


@dataclass
class ScalingConfig:
    """How many Ray Train workers and what each holds."""

    num_workers: int = 8
    use_gpu: bool = True
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # e.g. {"trainer_node": 0.001}
    max_failures: int = 3  # group restarts from the last checkpoint
    storage_path: str = "./runs"  # local path or s3:// / gs:// URI for checkpoints and results

    def validate(self) -> None:
        _positive(self, "num_workers", "cpus_per_worker")
        if self.max_failures < -1:
            raise ConfigError(f"scaling.max_failures must be >= -1, got {self.max_failures}")


@dataclass
class TrackingConfig:
    """MLflow: where runs go and what they are called."""

    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "evl"
    run_name: str | None = None

    def validate(self) -> None:
        pass


@dataclass
class Config:
    name: str = "evl"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        for section in (self.model, self.data, self.train, self.scaling, self.tracking):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, e.g. for logging every resolved value as an MLflow param."""
        out = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out


@dataclass
class SweepConfig:
    """A sweep: a base training config and a search space over frame count and decoder depth (and optionally
    lr and the temporal-module switches). Each frame count runs with its reference stride."""

    base: str = "demo.yaml"  # training config; relative paths are relative to the sweep file
    name: str = "sweep"
    overrides: list[str] = field(default_factory=list)  # `section.key=value` applied to the base for every trial
    num_frames: list[int] = field(default_factory=lambda: [8, 16, 32])
    decoder_num_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    stride_for_frames: dict[int, int] = field(default_factory=lambda: {8: 16, 16: 16, 32: 8})
    lr: list[float] | None = None  # also sweep the learning rate
    temporal_switches: bool = False  # also sweep each temporal module on and off
    search: str = "grid"  # grid: every combination; random: num_samples distinct points drawn from the grid
    num_samples: int = 1  # grid: repeats of the grid (repeat k with train.seed + k); random: points drawn
    asha: bool = False  # stop weak trials early on validation top-1 (needs several evaluations per trial)
    asha_grace_period: int = 1  # evaluations before a trial may be stopped
    max_concurrent_trials: int | None = None  # null: from the cluster's GPUs (1 on a CPU-only cluster)
    pack: bool = True  # points that share data and backbone train as one trial: one decode, one backbone pass
    max_heads_per_trial: int | None = None  # bound a pack's size (memory: one decoder + optimizer per head)
    storage_path: str | None = None  # null: the base config's scaling.storage_path

    def validate(self) -> SweepConfig:
        if self.search not in ("grid", "random"):
            raise ConfigError(f"sweep search must be grid or random, got {self.search!r}")
        if not self.num_frames or not self.decoder_num_layers:
            raise ConfigError("sweep num_frames and decoder_num_layers must each list at least one value")
        missing = sorted(set(self.num_frames) - set(self.stride_for_frames))
        if missing:
            raise ConfigError(f"sweep stride_for_frames has no stride for num_frames {missing}")
        if self.num_samples < 1:
            raise ConfigError(f"sweep num_samples must be positive, got {self.num_samples}")
        _positive_or_none(self, "max_concurrent_trials", "max_heads_per_trial")
        return self


# --------------------------------------------------------------------------------------------------------------
# Loading: dict/YAML -> dataclasses with type checks, and dotted overrides.


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and ill-typed values."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
                          f"known keys under {where or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, where + name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(kt, k, f"{key} key") if kt is not str else str(k): _coerce(vt, v, f"{key}.{k}")
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (vt,) = typing.get_args(tp)
        return [_coerce(vt, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def _deepcopy(d: Any) -> Any:
    return {k: _deepcopy(v) for k, v in d.items()} if isinstance(d, dict) else d


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (a local path or a URI)."""
    from evl import storage

    path = str(path)
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except storage.NotFound:
        raise ConfigError(f"config file {path} does not exist") from None
    except storage.StorageError as e:
        raise ConfigError(f"config file {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, validated."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data).validate()


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# Small validators shared by the sections.


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{_section(obj)}.{name} must be positive, got {value}")


def _positive_or_none(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{_section(obj)}.{name} must be positive or null, got {value}")


def _one_of(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{_section(obj)}.{name} must be one of {', '.join(choices)}, got {value!r}")


def _section(obj: Any) -> str:
    return type(obj).__name__.removesuffix("Config").lower()
