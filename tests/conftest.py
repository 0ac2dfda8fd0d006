"""Session-scoped tiny checkpoints: each is built once per test session and shared by every test."""
from __future__ import annotations

import pytest

from edge.checkpoint import save_model
from edge.config import preset
from edge.model import HybridLM
from edge.tokenizer import default_corpus, save_tokenizer, train_tokenizer

TINY = preset("tiny")

# Small configs that cover the architecture's corners (DESIGN.md §2). head_dim 32 everywhere so
# 4-bit KV blocks of 32 fit; widths are multiples of 32 for 4-bit weight groups.
VARIANTS = {
    "tiny": {},
    "attn_first_last": dict(layer_types=["full_attention", "conv", "conv", "full_attention"], num_hidden_layers=4),
    "all_conv": dict(layer_types=["conv"] * 3, num_hidden_layers=3),
    "mqa": dict(num_key_value_heads=1),
    "untied": dict(tie_word_embeddings=False),
    "lcache4": dict(conv_L_cache=4),
}


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(default_corpus(), TINY.vocab_size)


def build_checkpoint(path, tokenizer, seed=0, **changes):
    model = HybridLM(TINY.replace(**changes)).init_weights(seed)
    save_model(model, path)
    save_tokenizer(tokenizer, path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """name -> checkpoint dir, for every variant; built lazily and cached for the session."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_checkpoint(tmp_path_factory.mktemp(name), tokenizer, **VARIANTS[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_dir(checkpoints):
    return checkpoints("tiny")
