"""The EVL video classifier: frozen CLIP backbone -> temporal decoder -> head.

`EVL` is the whole model; `EVLClassifier` (decoder + head) is its trainable part, the only thing an optimizer,
a DeepSpeed engine or a checkpoint ever holds.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
from torch import nn

from evl.backbone import BackboneSpec, BlockFeatures, FrozenCLIPBackbone, backbone_spec, resolve_activation
from evl.config import ConfigError, ModelConfig
from evl.decoder import EVLDecoder
from evl.video.transforms import normalize

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_config(cfg: ModelConfig) -> tuple[ModelConfig, BackboneSpec]:
    """Fill the backbone-dependent defaults (qkv dim, heads), settle the backbone's name and activation
    (`resolve_activation`: `ViT-B-16-quickgelu` becomes `ViT-B-16` with quick_gelu true) and check the config
    against the backbone."""
    cfg.validate()
    backbone, quick_gelu = resolve_activation(cfg.backbone, cfg.pretrained, cfg.quick_gelu)
    cfg = dataclasses.replace(cfg, backbone=backbone, quick_gelu=quick_gelu)
    spec = backbone_spec(cfg.backbone)
    if cfg.decoder_num_layers > spec.layers:
        raise ConfigError(f"model.decoder_num_layers={cfg.decoder_num_layers} exceeds the depth of {cfg.backbone} "
                          f"({spec.layers} blocks)")
    cfg = dataclasses.replace(cfg, decoder_qkv_dim=cfg.decoder_qkv_dim or spec.width,
                              decoder_num_heads=cfg.decoder_num_heads or spec.heads)
    if cfg.decoder_qkv_dim % cfg.decoder_num_heads:
        raise ConfigError(f"model.decoder_qkv_dim={cfg.decoder_qkv_dim} is not divisible by "
                          f"model.decoder_num_heads={cfg.decoder_num_heads}")
    return cfg, spec


class EVLClassifier(nn.Module):
    """Decoder + head: backbone features -> logits. Built from the config alone, without the backbone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg, spec = resolve_model_config(cfg)
        self.config = cfg
        self.decoder = EVLDecoder(
            width=spec.width, num_frames=cfg.num_frames, grid=spec.grid, num_layers=cfg.decoder_num_layers,
            qkv_dim=cfg.decoder_qkv_dim, num_heads=cfg.decoder_num_heads, mlp_factor=cfg.decoder_mlp_factor,
            mlp_dropout=cfg.decoder_mlp_dropout, temporal_conv=cfg.temporal_conv,
            temporal_pos_embed=cfg.temporal_pos_embed, temporal_cross_attention=cfg.temporal_cross_attention)
        self.head = nn.Sequential(OrderedDict(
            norm=nn.LayerNorm(spec.width), dropout=nn.Dropout(cfg.cls_dropout),
            fc=nn.Linear(spec.width, cfg.num_classes)))

    def forward(self, features: list[BlockFeatures]) -> torch.Tensor:
        return self.head(self.decoder(features))  # [B, num_classes]


class EVL(nn.Module):
    """Video clips -> logits. Clips are [B, T, 3, H, W], either uint8 pixels (normalised here, on the clips'
    device) or floats already normalised with CLIP's mean and std."""

    def __init__(self, cfg: ModelConfig, backbone: FrozenCLIPBackbone | None = None):
        super().__init__()
        self.classifier = EVLClassifier(cfg)
        self.config = self.classifier.config
        cfg = self.config
        self.backbone = backbone or FrozenCLIPBackbone(
            cfg.backbone, cfg.pretrained, cfg.decoder_num_layers, seed=cfg.backbone_seed, quick_gelu=cfg.quick_gelu)

    @property
    def image_size(self) -> int:
        return self.backbone.spec.image_size

    def features(self, clips: torch.Tensor) -> list[BlockFeatures]:
        """Backbone features for a batch of clips, without autograd (the backbone is frozen)."""
        if clips.ndim != 5 or clips.shape[2] != 3:
            raise ValueError(f"clips must be [batch, frames, 3, H, W], got {tuple(clips.shape)}")
        if clips.shape[1] != self.config.num_frames:
            raise ValueError(f"model takes {self.config.num_frames} frames per clip, got {clips.shape[1]}")
        images = clips.flatten(0, 1)  # [B*T, 3, H, W]
        if images.dtype == torch.uint8:
            images = normalize(images)
        return self.backbone(images)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(clips))

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.classifier.parameters() if p.requires_grad)


def backbone_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return PRECISIONS[precision]


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> EVL:
    """The EVL model for `cfg` on `device`: backbone in bf16 on GPU (fp32 on CPU unless told), decoder fp32."""
    model = EVL(cfg)
    model.backbone.to(device=device, dtype=backbone_dtype(cfg.backbone_precision, device))
    model.classifier.to(device)
    return model
