"""Decoder checkpoints: the project's own format, and the reference implementation's released weights.

Only the trainable part (decoder + head) is ever saved; the backbone is named by its weights identity instead,
so a decoder is never silently paired with another backbone. Everything loads with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evl import storage
from evl.config import ModelConfig, from_dict, to_dict

FORMAT = "evl-classifier"
DECODER_FILE = "decoder.pt"  # a run's checkpoint folder holds its decoder under this name
VERSION = 1

# Reference key (after the DDP `module.` prefix) -> this project's EVLClassifier key.
_REFERENCE_KEYS = [
    (r"^decoder\.cls_token$", "decoder.query_token"),
    (r"^decoder\.decoder_layers\.(\d+)\.", r"decoder.layers.\1."),
    (r"^decoder\.temporal_conv\.(\d+)\.", r"decoder.temporal.\1.conv."),
    (r"^decoder\.temporal_pos_embed\.(\d+)$", r"decoder.temporal.\1.pos_embed"),
    (r"^decoder\.cross_attention\.(\d+)\.w1$", r"decoder.temporal.\1.cross_attention.w_prev"),
    (r"^decoder\.cross_attention\.(\d+)\.w2$", r"decoder.temporal.\1.cross_attention.w_next"),
    (r"^proj\.0\.", "head.norm."),
    (r"^proj\.2\.", "head.fc."),
]
_PROJECT_KEYS = [(re.compile(p), r) for p, r in _REFERENCE_KEYS]

# The backbones the reference trains on (OpenAI CLIP), to recognise a reference checkpoint's backbone from its
# width and, when it has temporal cross-attention, its table rows ((2h-1)(2w-1) for an h x w patch grid).
_REFERENCE_BACKBONES = ("ViT-B-16", "ViT-L-14", "ViT-L-14-336")

# Config fields that change what the checkpoint's tensors mean; a mismatch in any of them is refused.
STRUCTURAL_FIELDS = ("backbone", "quick_gelu", "num_frames", "num_classes", "decoder_num_layers", "decoder_qkv_dim",
                     "decoder_num_heads", "decoder_mlp_factor", "temporal_conv", "temporal_pos_embed",
                     "temporal_cross_attention")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names why."""


@dataclass
class Checkpoint:
    model: ModelConfig  # resolved
    state_dict: dict[str, torch.Tensor]  # EVLClassifier keys
    backbone_weights: str | None  # weights identity; None for reference checkpoints (OpenAI CLIP by construction)
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # step, metrics, ...


def save_checkpoint(path: str | Path, classifier: torch.nn.Module, model_cfg: ModelConfig, backbone_weights: str,
                    class_names: list[str] | None = None, extra: dict[str, Any] | None = None) -> None:
    state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "model": to_dict(model_cfg), "backbone_weights": backbone_weights,
               "class_names": class_names, "extra": extra or {}, "state_dict": state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes(str(path), buffer.getvalue())  # never a half-written checkpoint under the real name


def decoder_file(path: str) -> str:
    """The decoder checkpoint `path` names: the file itself, or the `decoder.pt` in a checkpoint folder (a
    Ray checkpoint directory, local or in a store)."""
    return storage.join(path, DECODER_FILE) if storage.is_dir(path) else str(path)


def load_checkpoint(path: str | Path, given: dict[str, Any] | None = None) -> Checkpoint:
    """Read a project checkpoint or a reference one (`{'model': {'module.…': tensor}}`), from a file or a
    checkpoint folder (`decoder_file`), local or in a store.

    given: model settings the user stated (e.g. {"num_frames": 8}); a reference checkpoint takes from them what
    its tensors cannot tell (the frame count without a temporal position embedding, the backbone without a
    cross-attention table) and must agree with them on the rest.
    """
    try:
        path = decoder_file(str(path))
        data = storage.read_bytes(path)
    except storage.NotFound:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except storage.StorageError as e:
        raise CheckpointError(f"checkpoint {e}") from None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor payloads
        raise CheckpointError(f"{path} is not a checkpoint this project can read (expected an EVL decoder.pt or a "
                              f"reference .pth of tensors): {_load_error(e)}") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        if payload.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')} is not supported "
                                  f"(this build reads version {VERSION})")
        return Checkpoint(model=from_dict(ModelConfig, payload["model"]), state_dict=payload["state_dict"],
                          backbone_weights=payload["backbone_weights"], class_names=payload.get("class_names"),
                          extra=payload.get("extra") or {})
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        return reference_checkpoint(payload["model"], source=str(path), given=given)
    raise CheckpointError(f"{path} is neither an EVL checkpoint nor a reference checkpoint ({{'model': state_dict}})")


def _load_error(e: BaseException) -> str:
    """torch.load's complaint in one line, without its advice to load with weights_only=False: pickled code
    is never run here."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # the cause, between PyTorch's advice and its documentation link
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    elif "weights_only" in text:
        text = ""
    text = " ".join(text.split()).strip(" .:")[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def reference_checkpoint(state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
                         given: dict[str, Any] | None = None) -> Checkpoint:
    """Convert the reference's DDP state dict to this project's keys and infer its model config."""
    state = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, replacement in _PROJECT_KEYS:
            key, n = pattern.subn(replacement, key)
            if n:
                break
        state[key] = value
    return Checkpoint(model=_infer_reference_config(state, source, given or {}), state_dict=state,
                      backbone_weights=None)


def _infer_reference_config(state: dict[str, torch.Tensor], source: str, given: dict[str, Any]) -> ModelConfig:
    """The reference's model config from its tensors' shapes, completed (never contradicted) by `given`."""
    from evl.backbone import backbone_spec, resolve_activation

    try:
        width = state["decoder.query_token"].shape[0]
        num_classes = state["head.fc.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.layers."))
        qkv_dim = state["decoder.layers.0.attn.q_proj.weight"].shape[0]
        mlp_hidden = state["decoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source} does not look like an EVL reference checkpoint (missing {e})") from e
    pos = state.get("decoder.temporal.0.pos_embed")
    table = state.get("decoder.temporal.0.cross_attention.w_prev")

    def fits(name: str) -> bool:
        spec = backbone_spec(name)
        h, w = spec.grid
        return spec.width == width and (table is None or table.shape[0] == (2 * h - 1) * (2 * w - 1))

    if given.get("backbone"):
        backbone = resolve_activation(given["backbone"], None, True)[0]
        if not fits(backbone):
            raise CheckpointError(f"{source} was not trained on {given['backbone']}: its decoder has width {width}"
                                  + (f" and a {table.shape[0]}-row cross-attention table" if table is not None else ""))
    else:
        candidates = [name for name in _REFERENCE_BACKBONES if fits(name)]
        if not candidates:
            raise CheckpointError(f"{source}: no reference backbone ({', '.join(_REFERENCE_BACKBONES)}) has width "
                                  f"{width}" + (f" and a {table.shape[0]}-row cross-attention table"
                                                if table is not None else ""))
        if len(candidates) > 1:
            raise CheckpointError(f"{source}: without a temporal cross-attention table its backbone could be any of "
                                  f"{', '.join(candidates)}; name it: model.backbone (e.g. evl eval --set "
                                  f"model.backbone={candidates[-1]})")
        backbone = candidates[0]
    if pos is not None:
        num_frames = pos.shape[0]
        if given.get("num_frames") not in (None, num_frames):
            raise CheckpointError(f"{source} was trained with {num_frames} frames, not {given['num_frames']}")
    elif given.get("num_frames"):
        num_frames = int(given["num_frames"])
    else:
        raise CheckpointError(f"{source}: without a temporal position embedding the frame count cannot be read; "
                              f"name it: model.num_frames (e.g. evl eval --set model.num_frames=8)")
    inferred = dict(backbone=backbone, num_frames=num_frames, num_classes=num_classes, decoder_num_layers=layers,
                    decoder_qkv_dim=qkv_dim, decoder_num_heads=qkv_dim // 64, decoder_mlp_factor=mlp_hidden / width,
                    temporal_conv="decoder.temporal.0.conv.weight" in state, temporal_pos_embed=pos is not None,
                    temporal_cross_attention=table is not None)
    if given.get("quick_gelu") is False:
        raise CheckpointError(f"{source} is a reference checkpoint: its backbone is OpenAI CLIP, trained with "
                              f"QuickGELU; model.quick_gelu=false would change its features")
    clash = [f"{k}: checkpoint has {v!r}, given {given[k]!r}" for k, v in inferred.items()
             if k not in ("backbone", "num_frames") and given.get(k) is not None and _norm(k, given[k]) != _norm(k, v)]
    if clash:
        raise CheckpointError(f"{source} does not match the given model settings:\n  " + "\n  ".join(clash))
    # The reference trains on OpenAI CLIP, which uses QuickGELU, whatever the user's weights file is called.
    return from_dict(ModelConfig, {"pretrained": "openai", **given, **inferred, "quick_gelu": True})


def check_compatible(ckpt: Checkpoint, model_cfg: ModelConfig, backbone_weights: str | None) -> None:
    """Refuse a checkpoint made for another configuration, naming every difference."""
    saved, model_cfg = _settled(ckpt.model), _settled(model_cfg)
    problems = [f"{name}: checkpoint has {getattr(saved, name)!r}, model has {getattr(model_cfg, name)!r}"
                for name in STRUCTURAL_FIELDS
                if _norm(name, getattr(saved, name)) != _norm(name, getattr(model_cfg, name))]
    if ckpt.backbone_weights and backbone_weights and ckpt.backbone_weights != backbone_weights:
        problems.append(f"backbone weights: checkpoint was trained on {ckpt.backbone_weights}, "
                        f"model has {backbone_weights}")
    if problems:
        raise CheckpointError("checkpoint does not match this model:\n  " + "\n  ".join(problems))


def _settled(cfg: ModelConfig) -> ModelConfig:
    """The config with its backbone named one way (`ViT-B-16-quickgelu` -> `ViT-B-16`, quick_gelu true), as
    checkpoints written before the activation was recorded may name it either way."""
    from evl.backbone import resolve_activation

    backbone, quick_gelu = resolve_activation(cfg.backbone, cfg.pretrained, cfg.quick_gelu)
    return dataclasses.replace(cfg, backbone=backbone, quick_gelu=quick_gelu)


def _norm(name: str, value: Any) -> Any:
    return round(value, 6) if name == "decoder_mlp_factor" else value


def load_into(classifier: torch.nn.Module, ckpt: Checkpoint, backbone_weights: str | None) -> None:
    """Check compatibility, then load strictly: no missing and no unexpected keys."""
    check_compatible(ckpt, classifier.config, backbone_weights)
    result = classifier.load_state_dict(ckpt.state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint keys do not fit the model: missing {result.missing_keys}, "
                              f"unexpected {result.unexpected_keys}")


def model_config_of(ckpt: Checkpoint, given: dict[str, Any] | None = None) -> ModelConfig:
    """The model to run a checkpoint with: its own config under the settings the user stated (a local weights
    file, a precision). A stated structural change (frames, depth...) is refused later by `load_into`."""
    cfg = from_dict(ModelConfig, {**to_dict(ckpt.model), **(given or {})})
    cfg.validate()
    return cfg
