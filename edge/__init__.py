"""hybrid-edge core: the LFM2-compatible model, its config, checkpoints and tokenizer."""
from .checkpoint import load_model, save_model
from .config import PRESETS, HybridConfig, preset
from .errors import ConfigError, EdgeError
from .model import DynamicCache, HybridLM

__all__ = ["HybridConfig", "HybridLM", "DynamicCache", "preset", "PRESETS", "load_model", "save_model",
           "EdgeError", "ConfigError"]
