"""HybridConfig: the LFM2 configuration (Hugging Face `Lfm2Config` field names and semantics), validated.

Reads and writes the `config.json` of a Hugging Face LFM2 checkpoint, including the legacy keys of the
first LiquidAI releases (`block_ff_dim`, `full_attn_idxs`, `theta`, `tie_embedding`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

LAYER_TYPES = ("conv", "full_attention")
# Sizes above any real model's (LFM2 and larger families: vocab <= 262k, hidden <= 16k, <= 128 layers, 10M
# context): a bigger value is a corrupt config.json or artifact header, refused before it sizes an allocation.
LIMITS = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**20, "num_hidden_layers": 1024,
          "num_attention_heads": 2**12, "num_key_value_heads": 2**12, "conv_L_cache": 64,
          "max_position_embeddings": 2**24}


@dataclass
class HybridConfig:
    vocab_size: int = 65536
    hidden_size: int = 1024
    intermediate_size: int = 6656  # before the auto-adjust rule, as in config.json
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    layer_types: list[str] = field(default_factory=list)
    conv_L_cache: int = 3  # the short conv's kernel size
    conv_bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 128_000
    block_auto_adjust_ff_dim: bool = True
    block_ffn_dim_multiplier: float | None = 1.0
    block_multiple_of: int = 256
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 7

    def __post_init__(self):
        check_types(self)  # before anything below computes with a field of the wrong type
        if not self.layer_types:  # HF semantics: with neither field set, every layer is attention
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        """The FFN width the weights actually have (Lfm2MLP's auto-adjust rule)."""
        ff = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            ff = int(2 * ff / 3)
            if self.block_ffn_dim_multiplier is not None:
                ff = int(self.block_ffn_dim_multiplier * ff)
                m = self.block_multiple_of
                ff = m * ((ff + m - 1) // m)
        return ff

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def conv_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "conv"]

    def kv_vectors(self, positions: int) -> int:
        """K and V vectors (head_dim elements each) of the grouped cache at `positions` tokens of context:
        one per (attention layer, K or V, kv head, position), never expanded to the query heads."""
        return positions * len(self.attention_layers) * 2 * self.num_key_value_heads

    def n_params(self, include_embeddings: bool = True) -> int:
        h, ff, kv = self.hidden_size, self.ffn_dim, self.num_key_value_heads * self.head_dim
        per_attn = h * h * 2 + 2 * h * kv + 2 * self.head_dim
        per_conv = 3 * h * h + h * h + h * self.conv_L_cache + (5 * h if self.conv_bias else 0)
        total = sum(per_attn if t == "full_attention" else per_conv for t in self.layer_types)
        total += self.num_hidden_layers * (3 * h * ff + 2 * h) + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(f"invalid config: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
             f"{self.num_hidden_layers}; give one type per layer")
        unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        need(not unknown, f"unknown layer type {unknown[0]!r} in layer_types; use 'conv' or 'full_attention'"
             if unknown else "")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} is not divisible by num_key_value_heads "
             f"{self.num_key_value_heads}; pick kv heads that divide the heads")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} (hidden_size / num_attention_heads) is odd; "
             "rotary embeddings need an even head_dim")
        for name, limit in LIMITS.items():
            need(getattr(self, name) <= limit, f"{name} {getattr(self, name)} is above {limit}, larger than any "
                 "real model; the config or the artifact is corrupt")
        need(self.conv_L_cache >= 2,
             f"conv_L_cache must be an integer >= 2 (the short conv kernel size), got {self.conv_L_cache!r}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.block_multiple_of > 0, f"block_multiple_of must be positive, got {self.block_multiple_of}")
        need(0 < self.ffn_dim <= LIMITS["intermediate_size"],
             f"the effective FFN width is {self.ffn_dim}; set intermediate_size and the block_* fields so that "
             f"it is in 1..{LIMITS['intermediate_size']}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            need(value is None or 0 <= value < self.vocab_size,
                 f"{name} {value} is outside the vocabulary [0, {self.vocab_size})")

    # ---- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "HybridConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"invalid config: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type", "lfm2") != "lfm2":
            raise ConfigError(f"invalid config: model_type is {d['model_type']!r}, expected 'lfm2'")
        # legacy LiquidAI keys, with the precedence transformers gives them
        if "block_ff_dim" in d:
            d["intermediate_size"] = d["block_ff_dim"]
        if "tie_embedding" in d:
            d["tie_word_embeddings"] = d["tie_embedding"]
        rope = d.get("rope_parameters") or {}
        if isinstance(rope, dict) and "full_attention" in rope:
            rope = rope["full_attention"] or {}
        theta = d.get("theta", d.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None))
        if theta is not None:
            d["rope_theta"] = theta
        if not d.get("layer_types"):
            n = d.get("num_hidden_layers", cls.num_hidden_layers)
            idxs = d.get("full_attn_idxs")
            idxs = list(range(n)) if idxs is None else idxs
            if not isinstance(n, int) or not isinstance(idxs, list) or n > LIMITS["num_hidden_layers"]:
                raise ConfigError(f"invalid config: num_hidden_layers {n!r} / full_attn_idxs {idxs!r} "
                                  "do not describe the layers; give layer_types, one entry per layer")
            d["layer_types"] = ["full_attention" if i in idxs else "conv" for i in range(n)]
        if isinstance(d.get("eos_token_id"), list) and d["eos_token_id"]:
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise ConfigError(f"invalid config: {e}") from None

    def to_dict(self) -> dict:
        """A config.json that transformers' Lfm2ForCausalLM and llama.cpp's converter both read."""
        d = dataclasses.asdict(self)
        d.update(model_type="lfm2", architectures=["Lfm2ForCausalLM"],
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                 torch_dtype="float32", use_cache=True)
        return d

    @classmethod
    def load(cls, path: str | Path) -> "HybridConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}; point to a Hugging Face LFM2 checkpoint directory") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from None
        return cls.from_dict(d)

    def replace(self, **changes) -> "HybridConfig":
        return dataclasses.replace(self, **changes)


def check_types(config: HybridConfig) -> None:
    """Every field has its annotated JSON type (bool is not an int here, an int is a float), so a
    config.json with e.g. "hidden_size": "128" is one ConfigError rather than a TypeError later."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,)}
    for f in dataclasses.fields(config):
        value, allowed = getattr(config, f.name), f.type.split(" | ")
        if value is None and "None" in allowed:
            continue
        if f.type == "list[str]":
            ok = isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value)
        else:
            kind = kinds[allowed[0]]
            ok = isinstance(value, kind) and (bool in kind or not isinstance(value, bool))
            ok = ok and (not isinstance(value, float) or math.isfinite(value))
        if not ok:
            raise ConfigError(f"invalid config: {f.name} must be {f.type.replace('list[str]', 'a list of strings')}, "
                              f"got {value!r:.60}")


# The shapes of the real family (docs/design.md §2) plus a tiny one for tests and demos.
_LFM2_ATTN = [2, 5, 8, 10, 12, 14]


def _lfm2(hidden: int, heads: int, ff: int) -> HybridConfig:
    return HybridConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=8,
                        intermediate_size=ff, num_hidden_layers=16,
                        layer_types=["full_attention" if i in _LFM2_ATTN else "conv" for i in range(16)],
                        max_position_embeddings=32768)


def preset(name: str, vocab_size: int | None = None) -> HybridConfig:
    presets = {
        # head_dim 32 so llama.cpp's q8_0/q4_0 KV blocks fit; widths multiple of 32 for 4-bit groups
        "tiny": lambda: HybridConfig(vocab_size=1024, hidden_size=128, intermediate_size=512,
                                     num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                     layer_types=["conv", "conv", "full_attention", "conv", "conv",
                                                  "full_attention"],
                                     block_multiple_of=64, max_position_embeddings=4096),
        "lfm2-350m": lambda: _lfm2(1024, 16, 6656),
        "lfm2-700m": lambda: _lfm2(1536, 24, 10240),
        "lfm2-1.2b": lambda: _lfm2(2048, 32, 12288),
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    config = presets[name]()
    return config.replace(vocab_size=vocab_size) if vocab_size else config


PRESETS = ("tiny", "lfm2-350m", "lfm2-700m", "lfm2-1.2b")
