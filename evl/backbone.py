"""The frozen CLIP image encoder and the features EVL reads from it.

EVL never trains the backbone: it runs the open_clip ViT once per frame, in eval mode and without autograd,
and hands the decoder, for each of the last N blocks, the block's output tokens (CLS included) and the
attention queries and keys per head. Those last N blocks are re-run here with scaled_dot_product_attention so
queries and keys come straight from the input projection and no attention map is ever materialised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from evl import storage
from evl.config import ConfigError

# Small ViT configs shipped with the project (tests and the CPU demo). Registered on import, so every process
# that imports evl (Ray workers included) knows them.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
QUICKGELU = "-quickgelu"  # open_clip's suffix for the same architecture with QuickGELU
HUB_CONFIG = "open_clip_config.json"  # written beside the weights on the Hugging Face hub

log = logging.getLogger("evl.backbone")
_warned: set[str] = set()


@dataclass(frozen=True)
class BackboneSpec:
    """What the decoder needs to know about a ViT, read from its open_clip config without building it."""

    name: str
    width: int  # C
    layers: int
    heads: int
    patch_size: int
    image_size: int

    @property
    def grid(self) -> tuple[int, int]:  # (h, w) patches
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:  # L = h * w + 1 (CLS)
        h, w = self.grid
        return h * w + 1


def backbone_spec(name: str) -> BackboneSpec:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = ", ".join(m for m in open_clip.list_models() if m.startswith(("ViT", "EVL")))
        raise ConfigError(f"unknown backbone {name!r}: not an open_clip model config. Known ViTs: {known}")
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision and vision["timm_model_name"] or not isinstance(vision.get("layers"), int):
        raise ConfigError(f"backbone {name!r} is not an open_clip VisionTransformer; EVL needs a ViT")
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ConfigError(f"backbone {name!r}: non-square image size {image_size} is not supported")
        image_size = image_size[0]
    width = vision["width"]
    return BackboneSpec(name=name, width=width, layers=vision["layers"], heads=width // vision.get("head_width", 64),
                        patch_size=patch_size, image_size=image_size)


class BlockFeatures(NamedTuple):
    """One backbone block's outputs for N = batch * frames images."""

    tokens: torch.Tensor  # [N, L, C] block output, CLS first
    q: torch.Tensor  # [N, L, heads, head_dim] attention queries (unscaled)
    k: torch.Tensor  # [N, L, heads, head_dim] attention keys


def weights_identity(name: str, pretrained: str | None, seed: int) -> str:
    """A string that names the backbone weights, stored in checkpoints so a decoder meets the backbone it was
    trained on: an open_clip tag, a file's sha256, or the seed of a random init."""
    if pretrained is None:
        return f"{name}:random:seed={seed}"
    if _is_weights_file(pretrained):
        digest = hashlib.sha256()
        with open(_local_weights(pretrained), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        return f"{name}:sha256:{digest.hexdigest()}"
    return f"{name}:{pretrained}"


def _is_weights_file(pretrained: str | None) -> bool:
    """A weights file, local or in a store (`s3://bucket/weights/ViT-B-16.pt`), rather than an open_clip tag."""
    if pretrained is None:
        return False
    if not storage.is_uri(pretrained):
        return os.path.isfile(pretrained)
    try:
        return storage.is_file(pretrained)
    except storage.StorageError as e:
        raise ConfigError(f"backbone weights {e}") from None


def _local_weights(pretrained: str) -> str:
    """A local path to the weights file: a store's copy is fetched once per machine (`storage.local_copy`), with
    an `open_clip_config.json` beside it if the store has one."""
    try:
        if storage.is_uri(pretrained):
            hub = storage.join(storage.parent(pretrained), HUB_CONFIG)
            if storage.is_file(hub):
                storage.local_copy(hub)
        return storage.local_copy(pretrained)
    except storage.StorageError as e:
        raise ConfigError(f"backbone weights {e}") from None


def _is_tag(name: str, pretrained: str | None) -> bool:
    return pretrained is not None and pretrained in open_clip.list_pretrained_tags_by_model(name)


def resolve_activation(name: str, pretrained: str | None, quick_gelu: bool | None = None) -> tuple[str, bool]:
    """(architecture, uses QuickGELU) for a backbone as the user named it.

    The activation is part of what a backbone is: OpenAI CLIP's weights were trained with QuickGELU, and under
    GELU the same tensors give other features. What the weights say decides it: a `-quickgelu` model name, the
    open_clip tag's record, or an `open_clip_config.json` beside a weights file (the Hugging Face hub layout).
    `quick_gelu` (model.quick_gelu) may state it too but not contradict them. A bare weights file cannot say, so
    it gets open_clip's default (GELU) with a warning. The architecture comes back without the `-quickgelu`
    suffix, so every way of naming one model (tag, file, suffixed name) resolves to the same pair.
    """
    base = name.removesuffix(QUICKGELU)
    if base == name or open_clip.get_model_config(base) is None:
        base = name
    evidence = []  # (what says so, QuickGELU?)
    if base != name or (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        evidence.append((f"the model name {name!r}", True))
    is_file = _is_weights_file(pretrained)
    tag_owner = next((n for n in (name, base, base + QUICKGELU) if not is_file and _is_tag(n, pretrained)), None)
    if tag_owner is not None:
        said = bool(open_clip.get_pretrained_cfg(tag_owner, pretrained).get("quick_gelu", False))
        evidence.append((f"the open_clip tag {pretrained!r}", said))
    hub = storage.join(storage.parent(pretrained), HUB_CONFIG) if is_file else None
    if hub is not None and storage.is_file(hub):
        try:
            said = bool(json.loads(storage.read_text(hub))["model_cfg"].get("quick_gelu", False))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{hub} (beside the backbone weights) is not an open_clip config: {e}") from e
        evidence.append((hub, said))
    if quick_gelu is not None:
        evidence.insert(0, (f"model.quick_gelu={str(quick_gelu).lower()}", quick_gelu))
    for source, said in evidence[1:]:
        if said != evidence[0][1]:
            raise ConfigError(f"backbone activation: {evidence[0][0]} says {_act(evidence[0][1])} but {source} "
                              f"says {_act(said)}; the weights decide, so drop the contradicting setting")
    if evidence:
        return base, evidence[0][1]
    if is_file and pretrained not in _warned:
        _warned.add(pretrained)
        log.warning(f"backbone weights {pretrained}: a weights file does not say which activation it was trained "
                    f"with; using GELU. For OpenAI CLIP weights set model.quick_gelu: true (or use {base}{QUICKGELU})")
    return base, False


def _act(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def _create_clip(name: str, pretrained: str | None, seed: int, quick_gelu: bool) -> nn.Module:
    """The open_clip model `name` (no -quickgelu suffix) with the given activation and weights."""
    variant = name + QUICKGELU if quick_gelu and open_clip.get_model_config(name + QUICKGELU) else name
    is_file = _is_weights_file(pretrained)
    if is_file:
        pretrained = _local_weights(pretrained)
    elif pretrained is not None:
        if pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained or storage.is_uri(pretrained):
            raise ConfigError(f"backbone weights file {pretrained!r} does not exist")
        owner = next((n for n in (variant, name) if _is_tag(n, pretrained)), None)
        if owner is None:
            tags = sorted(set(open_clip.list_pretrained_tags_by_model(name))
                          | set(open_clip.list_pretrained_tags_by_model(variant)))
            raise ConfigError(f"pretrained {pretrained!r} is neither a local weights file nor an open_clip tag for "
                              f"{name} (tags: {', '.join(tags) or 'none'})")
        variant = owner
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return open_clip.create_model(variant, pretrained=pretrained, force_quick_gelu=quick_gelu)
        except RuntimeError as e:  # open_clip reports key mismatches of a weights file this way
            raise ConfigError(f"could not load backbone weights {pretrained!r} into {name}: {e}") from e


class FrozenCLIPBackbone(nn.Module):
    """open_clip ViT image tower, frozen, returning per-block features for the decoder.

    `num_feature_layers` is the decoder depth N: the last N blocks return tokens, queries and keys; the blocks
    before them run as open_clip wrote them. `ln_post` and `proj` are never used. The activation follows the
    weights (`resolve_activation`); `quick_gelu` may state it.
    """

    def __init__(self, name: str, pretrained: str | None, num_feature_layers: int, seed: int = 0,
                 quick_gelu: bool | None = None):
        super().__init__()
        name, quick_gelu = resolve_activation(name, pretrained, quick_gelu)
        self.spec = backbone_spec(name)
        self.quick_gelu = quick_gelu
        if not 1 <= num_feature_layers <= self.spec.layers:
            raise ConfigError(f"model.decoder_num_layers={num_feature_layers} must be between 1 and the "
                              f"backbone's depth ({self.spec.layers} blocks in {name})")
        self.num_feature_layers = num_feature_layers
        self.weights_id = weights_identity(name, pretrained, seed)
        visual = _create_clip(name, pretrained, seed, quick_gelu).visual
        blocks = visual.transformer.resblocks
        if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks[-num_feature_layers:]):
            raise ConfigError(f"backbone {name!r} uses custom attention blocks; EVL needs standard CLIP blocks")
        if not getattr(visual.transformer, "batch_first", True):
            raise ConfigError(f"backbone {name!r} runs its transformer sequence-first; EVL needs batch-first blocks")
        # Drop what EVL does not use, so it takes no memory and cannot be mistaken for a feature source.
        visual.ln_post, visual.proj, visual.attn_pool = nn.Identity(), None, None
        self.visual = visual
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenCLIPBackbone:
        return super().train(False)  # always eval: no dropout, no patch dropout

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[BlockFeatures]:
        """images: [N, 3, H, W], CLIP-normalised. Returns features of the last N blocks, first to last."""
        size = self.spec.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"backbone {self.spec.name} takes {size}x{size} frames, got {tuple(images.shape[-2:])}")
        x = self.visual._embeds(images.to(self.dtype))  # [N, L, C]: patches + CLS + positions, ln_pre
        blocks = self.visual.transformer.resblocks
        first = len(blocks) - self.num_feature_layers
        for block in blocks[:first]:
            x = block(x)
        features = []
        for block in blocks[first:]:
            x, q, k = _block_with_qk(block, x)
            features.append(BlockFeatures(x, q, k))
        return features


def _block_with_qk(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CLIP residual block that also returns its queries and keys: [N, L, C] -> x', q, k."""
    attn: nn.MultiheadAttention = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [N, L, 3C]
    q, k, v = qkv.view(n, length, 3, heads, width // heads).unbind(2)  # each [N, L, heads, head_dim]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [N, heads, L, d]
    out = attn.out_proj(out.transpose(1, 2).reshape(n, length, width))
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, q, k
