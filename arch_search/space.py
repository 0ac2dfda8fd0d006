"""The LFM2-style search space: depth, width, FFN width, heads / KV heads, where the attention blocks sit,
and the short conv's kernel size (L_cache). The vocabulary is fixed by the tokenizer.

Define-by-run (Optuna style): `suggest(trial, space, vocab_size)` asks the trial for a handful of
parameters whose every combination is valid, then derives the model from them:
- width = heads x head_dim, so heads always divide the width and head_dim is always even
  (head_dim is a multiple of 32: llama.cpp's q8_0/q4_0 KV blocks hold 32 values);
- KV heads = the largest divisor of heads that is <= heads / kv_group, so they always divide the heads
  (kv_group is the GQA ratio asked for; the candidate records the ratio it got);
- FFN width = width x ffn_mult rounded to the space's multiple (a multiple of 32 for 4-bit groups);
- one `layer_i` choice (conv or attention) per layer, so the number AND the positions of the
  attention blocks are searched, and NSGA-II's uniform crossover mixes layouts layer by layer;
  every candidate is a hybrid: an all-conv pick gets attention in its last layer, an all-attention pick
  conv in its first (llama.cpp's lfm2 runs neither extreme; conv-only also fails at recall).
Every distribution is fixed per parameter name (Optuna refuses a categorical whose choices change).

A candidate's identity is the sha256 of its canonical config JSON (`Candidate.hash`): two parameter
sets that derive the same model are the same candidate, measured once.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from edge.config import HybridConfig

LFM2_ATTENTION = (2, 5, 8, 10, 12, 14)  # of 16 layers, in every LFM2 dense model
LFM2_DEPTH = 16


@dataclass(frozen=True)
class SpaceBounds:
    depth: tuple[int, int]           # layers, inclusive
    heads: tuple[int, int]           # attention heads, inclusive; width = heads x head_dim
    head_dims: tuple[int, ...]
    kv_groups: tuple[int, ...]       # GQA ratios asked for (heads per KV head)
    ffn_mult: tuple[float, float]    # FFN width / model width, in steps of 0.5
    l_cache: tuple[int, ...]         # short conv kernel sizes
    ffn_multiple_of: int             # FFN widths are rounded to this (block_multiple_of)
    # (depth, heads, head_dim, kv_group, ffn_mult) of the seeded LFM2 layouts, scaled to this space
    lfm2_seeds: tuple[tuple[int, int, int, int, float], ...]


SPACES = {
    # tests and demos: seconds per candidate
    "tiny": SpaceBounds(depth=(2, 8), heads=(2, 8), head_dims=(32,), kv_groups=(1, 2, 4),
                        ffn_mult=(2.0, 4.5), l_cache=(2, 3, 4), ffn_multiple_of=64,
                        lfm2_seeds=((6, 4, 32, 2, 4.0), (8, 6, 32, 2, 4.5), (4, 2, 32, 2, 4.0))),
    # laptop-sized: tens of millions of parameters
    "small": SpaceBounds(depth=(4, 16), heads=(4, 16), head_dims=(32, 64), kv_groups=(1, 2, 3, 4, 8),
                         ffn_mult=(2.0, 5.0), l_cache=(2, 3, 4), ffn_multiple_of=128,
                         lfm2_seeds=((16, 8, 64, 2, 4.5), (12, 8, 64, 2, 4.5), (8, 12, 32, 3, 4.5))),
    # LFM2 scale: the 350M / 700M / 1.2B shapes are in it
    "full": SpaceBounds(depth=(8, 24), heads=(8, 32), head_dims=(64, 128), kv_groups=(1, 2, 3, 4, 8),
                        ffn_mult=(2.0, 5.0), l_cache=(2, 3, 4), ffn_multiple_of=256,
                        lfm2_seeds=((16, 16, 64, 2, 4.5), (16, 24, 64, 3, 4.5), (16, 32, 64, 4, 4.0))),
}


@dataclass(frozen=True)
class Candidate:
    depth: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int                      # effective FFN width (what the weights have)
    attention: tuple[int, ...]    # indices of the attention layers
    l_cache: int
    vocab_size: int
    ffn_multiple_of: int = 64

    def to_config(self) -> HybridConfig:
        # keep LFM2's config.json convention (intermediate_size before the auto-adjust rule): 3/2 of the
        # effective width gives it back exactly, since ffn is a multiple of block_multiple_of
        config = HybridConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden, intermediate_size=(3 * self.ffn + 1) // 2,
            num_hidden_layers=self.depth, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            layer_types=["full_attention" if i in self.attention else "conv" for i in range(self.depth)],
            conv_L_cache=self.l_cache, block_multiple_of=self.ffn_multiple_of, max_position_embeddings=32768)
        assert config.ffn_dim == self.ffn, (config.ffn_dim, self.ffn)
        return config

    def canonical_json(self) -> str:
        return json.dumps(self.to_config().to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def describe(self) -> str:
        """One short line: d8 w256 h8/kv4 ffn1024 attn[2,5] L3."""
        return (f"d{self.depth} w{self.hidden} h{self.heads}/kv{self.kv_heads} ffn{self.ffn} "
                f"attn[{','.join(map(str, self.attention))}] L{self.l_cache}")

    @classmethod
    def from_dict(cls, d: dict, space: str) -> "Candidate":
        """Back from `to_dict` (as stored with a trial)."""
        return cls(depth=d["depth"], hidden=d["hidden"], heads=d["heads"], kv_heads=d["kv_heads"], ffn=d["ffn"],
                   attention=tuple(d["attention"]), l_cache=d["l_cache"], vocab_size=d["vocab_size"],
                   ffn_multiple_of=bounds(space).ffn_multiple_of)

    def to_dict(self) -> dict:
        return {"depth": self.depth, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "ffn": self.ffn, "attention": list(self.attention),
                "n_attention": len(self.attention), "l_cache": self.l_cache, "vocab_size": self.vocab_size}


def bounds(space: str) -> SpaceBounds:
    from edge.errors import EdgeError

    if space not in SPACES:
        raise EdgeError(f"unknown search space {space!r}; choose one of {', '.join(SPACES)}")
    return SPACES[space]


def kv_heads_for(heads: int, kv_group: int) -> int:
    """The largest divisor of `heads` that is at most heads / kv_group (1 always qualifies)."""
    return max(d for d in range(1, heads + 1) if heads % d == 0 and d * kv_group <= max(heads, kv_group))


def ffn_width(hidden: int, ffn_mult: float, multiple_of: int) -> int:
    return max(multiple_of, multiple_of * round(hidden * ffn_mult / multiple_of))


def suggest(trial, space: str, vocab_size: int) -> Candidate:
    """Ask `trial` (an optuna Trial or FixedTrial) for a candidate of `space`; every answer is valid."""
    b = bounds(space)
    depth = trial.suggest_int("depth", *b.depth)
    heads = trial.suggest_int("heads", *b.heads)
    head_dim = trial.suggest_categorical("head_dim", list(b.head_dims))
    kv_group = trial.suggest_categorical("kv_group", list(b.kv_groups))
    ffn_mult = trial.suggest_float("ffn_mult", *b.ffn_mult, step=0.5)
    l_cache = trial.suggest_categorical("l_cache", list(b.l_cache))
    layers = [trial.suggest_categorical(f"layer_{i}", ["conv", "attention"]) for i in range(depth)]
    hidden = heads * head_dim
    # LFM2 designs are hybrids, and llama.cpp's lfm2 runs only hybrids (it refuses conv-only models and
    # aborts on attention-only ones): a pick without attention gets it in the last layer, a pick without
    # conv gets it in the first (depth >= 2 everywhere, so both fit)
    if "attention" not in layers:
        layers[-1] = "attention"
    if "conv" not in layers:
        layers[0] = "conv"
    return Candidate(depth=depth, hidden=hidden, heads=heads, kv_heads=kv_heads_for(heads, kv_group),
                     ffn=ffn_width(hidden, ffn_mult, b.ffn_multiple_of),
                     attention=tuple(i for i, t in enumerate(layers) if t == "attention"),
                     l_cache=l_cache, vocab_size=vocab_size, ffn_multiple_of=b.ffn_multiple_of)


def lfm2_layout(depth: int) -> tuple[int, ...]:
    """LFM2's attention positions (2,5,8,10,12,14 of 16) scaled to `depth`, keeping its 6/16 share (at most 6).

    With n = round(6/16 * depth) blocks, take n of LFM2's six positions spread evenly (always the first
    and the last), and map each from 0..15 onto 0..depth-1. Depth 16 gives LFM2's layout exactly."""
    n = max(1, round(len(LFM2_ATTENTION) * depth / LFM2_DEPTH))
    picks = ([LFM2_ATTENTION[round(j * (len(LFM2_ATTENTION) - 1) / (n - 1))] for j in range(n)] if n > 1
             else [LFM2_ATTENTION[-1]])
    return tuple(sorted({round(p * (depth - 1) / (LFM2_DEPTH - 1)) for p in picks}))


def seed_params(space: str) -> list[dict]:
    """Trial parameters of the LFM2 layouts scaled to `space`, for study.enqueue_trial."""
    b = bounds(space)
    seeds = []
    for depth, heads, head_dim, kv_group, ffn_mult in b.lfm2_seeds:
        attention = lfm2_layout(depth)
        params = {"depth": depth, "heads": heads, "head_dim": head_dim, "kv_group": kv_group,
                  "ffn_mult": ffn_mult, "l_cache": 3}
        params.update({f"layer_{i}": "attention" if i in attention else "conv" for i in range(depth)})
        seeds.append(params)
    return seeds


def distributions(space: str) -> dict:
    """Every parameter's optuna distribution (for tests and tools that enumerate the space)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    b = bounds(space)
    out = {"depth": IntDistribution(*b.depth), "heads": IntDistribution(*b.heads),
           "head_dim": CategoricalDistribution(list(b.head_dims)),
           "kv_group": CategoricalDistribution(list(b.kv_groups)),
           "ffn_mult": FloatDistribution(*b.ffn_mult, step=0.5),
           "l_cache": CategoricalDistribution(list(b.l_cache))}
    out.update({f"layer_{i}": CategoricalDistribution(["conv", "attention"]) for i in range(b.depth[1])})
    return out
