"""Packing: the grid points of a sweep that see the same clips through the same frozen backbone train as one trial.

The backbone is frozen, so two trials that decode the same clips the same way and feed them to the same backbone
run the same backbone forward again and again. A pack runs it once per step, for its deepest decoder (a depth-d
decoder reads the last d blocks, a subset), and trains one decoder + head per grid point on those features
(`evl.training.Trainer` with a list of configs). What may differ between the heads of a pack is listed in
`PACK_MAY_DIFFER`; every other field (`PACK_MUST_MATCH`) must be equal. Nothing here needs torch, so a sweep's
driver can group its grid with `pack_key` / `group_packable` before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Sequence
from typing import Any

from evl.config import Config, ConfigError, to_dict

# The fields that may differ between the heads of a pack: each head's decoder and head shape, dropouts, temporal
# modules and optimizer recipe; and what is not part of training at all (names, tracking, where runs are stored).
PACK_MAY_DIFFER: tuple[str, ...] = (
    "name",
    "model.decoder_num_layers", "model.decoder_qkv_dim", "model.decoder_num_heads", "model.decoder_mlp_factor",
    "model.decoder_mlp_dropout", "model.cls_dropout",
    "model.temporal_conv", "model.temporal_pos_embed", "model.temporal_cross_attention",
    "train.lr", "train.weight_decay", "train.betas", "train.warmup_steps", "train.grad_clip",
    "scaling.storage_path",
    "tracking.tracking_uri", "tracking.experiment", "tracking.run_name",
)


def config_fields(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every leaf field of a config dataclass as a dotted name, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return tuple(out)


# Everything else: backbone and its weights, frames, classes, data and augmentation, batch sizes, steps, seed,
# precision, engine, logging/eval/checkpoint cadence, workers. A field added to the config later lands here.
PACK_MUST_MATCH: tuple[str, ...] = tuple(f for f in config_fields() if f not in PACK_MAY_DIFFER)


def field_value(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_packable(cfgs: Sequence[Config]) -> None:
    """Raise ConfigError naming the first must-match field (`PACK_MUST_MATCH` order) on which a config differs
    from the first one; an empty sequence is refused too."""
    if not cfgs:
        raise ConfigError("a pack needs at least one config")
    first = cfgs[0]
    for i, cfg in enumerate(cfgs[1:], start=1):
        for name in PACK_MUST_MATCH:
            a, b = field_value(first, name), field_value(cfg, name)
            if a != b:
                raise ConfigError(
                    f"cannot pack these configs: {name} differs ({a!r} in head 0, {b!r} in head {i}); the heads of a "
                    f"pack share data, backbone and schedule, and may differ only in: {', '.join(PACK_MAY_DIFFER)}")


def pack_key(cfg: Config) -> str:
    """A string that is equal for two configs exactly when they may share a pack (the must-match fields as
    canonical JSON): group a sweep's grid points by it."""
    return json.dumps({name: to_dict(field_value(cfg, name)) for name in PACK_MUST_MATCH}, sort_keys=True,
                      separators=(",", ":"), default=str)


def group_packable(cfgs: Sequence[Config]) -> list[list[int]]:
    """Indices of `cfgs` grouped into packs (same `pack_key`), groups in order of first appearance, each group
    in the order given."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(pack_key(cfg), []).append(i)
    return list(groups.values())
