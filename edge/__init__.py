"""hybrid-edge core: the LFM2-compatible model, its config, checkpoints and tokenizer.

torch-dependent names are imported on first use so that `edge --help` and config checks stay instant.
"""
from .config import PRESETS, HybridConfig, preset
from .errors import ConfigError, EdgeError

_LAZY = {"HybridLM": "model", "DynamicCache": "model", "load_model": "checkpoint", "save_model": "checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")


__all__ = ["HybridConfig", "HybridLM", "DynamicCache", "preset", "PRESETS", "load_model", "save_model",
           "EdgeError", "ConfigError"]
