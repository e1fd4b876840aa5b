"""EVL: video recognition with a frozen CLIP image encoder and a light temporal decoder (Lin et al., ECCV 2022).

The library knows nothing about Ray: model, video decoding and the training step live here; `workflows/` wires
them into Ray Data, Ray Train, Ray Tune and MLflow.
"""

from importlib import import_module

from evl.config import Config, ConfigError, load_config

_LAZY = {"EVL": "evl.model", "EVLClassifier": "evl.model", "build_model": "evl.model"}

__all__ = ["Config", "ConfigError", "load_config", *_LAZY]


def __getattr__(name: str):  # torch and open_clip load only when the model is asked for
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evl' has no attribute {name!r}")
