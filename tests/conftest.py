"""Shared fixtures. Models here use the project's tiny open_clip config (`EVL-Tiny`: 32 px, patch 8, width 64,
3 blocks) with random weights, so every test runs on a CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_model_config():
    from evl.config import ModelConfig

    return ModelConfig(backbone="EVL-Tiny", pretrained=None, num_frames=4, num_classes=5, decoder_num_layers=2)
