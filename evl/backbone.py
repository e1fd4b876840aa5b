"""The frozen CLIP image encoder and the features EVL reads from it.

EVL never trains the backbone: it runs the open_clip ViT once per frame, in eval mode and without autograd,
and hands the decoder, for each of the last N blocks, the block's output tokens (CLS included) and the
attention queries and keys per head. Those last N blocks are re-run here with scaled_dot_product_attention so
queries and keys come straight from the input projection and no attention map is ever materialised.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from evl.config import ConfigError

# Small ViT configs shipped with the project (tests and the CPU demo). Registered on import, so every process
# that imports evl (Ray workers included) knows them.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


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
    if os.path.isfile(pretrained):
        digest = hashlib.sha256()
        with open(pretrained, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        return f"{name}:sha256:{digest.hexdigest()}"
    return f"{name}:{pretrained}"


def _create_clip(name: str, pretrained: str | None, seed: int, quick_gelu: bool | None) -> nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(name)
    is_file = pretrained is not None and os.path.isfile(pretrained)
    if pretrained is not None and not is_file:
        if pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained:
            raise ConfigError(f"backbone weights file {pretrained!r} does not exist")
        if pretrained not in tags:
            raise ConfigError(f"pretrained {pretrained!r} is neither a local weights file nor an open_clip tag for "
                              f"{name} (tags: {', '.join(tags) or 'none'})")
    if quick_gelu is None:  # follow what the tagged weights were trained with (OpenAI CLIP: QuickGELU)
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained in tags else {}
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
        except RuntimeError as e:  # open_clip reports key mismatches of a weights file this way
            raise ConfigError(f"could not load backbone weights {pretrained!r} into {name}: {e}") from e


class FrozenCLIPBackbone(nn.Module):
    """open_clip ViT image tower, frozen, returning per-block features for the decoder.

    `num_feature_layers` is the decoder depth N: the last N blocks return tokens, queries and keys; the blocks
    before them run as open_clip wrote them. `ln_post` and `proj` are never used.
    """

    def __init__(self, name: str, pretrained: str | None, num_feature_layers: int, seed: int = 0,
                 quick_gelu: bool | None = None):
        super().__init__()
        self.spec = backbone_spec(name)
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
