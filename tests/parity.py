"""The parity protocol of docs/design.md §5, shared by every exporter's tests.

A random 64-token sequence: the first half as one prefill, the rest decoded one token at a time.
rel = max|Δlogit| / (max-min of the reference logits); cos = cosine similarity per position.
"""
from __future__ import annotations

import numpy as np
import torch

from edge.checkpoint import load_model
from edge.model import DynamicCache

SEQ_LEN = 64

BOUNDS = {  # name -> (kind, thresholds)
    "exact": dict(rel=1e-3),                       # fp32 weights, fp32/fp16 KV: rel and identical top-1
    "8bit": dict(mean_cos=0.999, min_cos=0.995),   # int8 KV cache, 8-bit weights
    "4bit": dict(mean_cos=0.98, min_cos=0.95),     # 4-bit weights or 4-bit KV
}


def random_ids(vocab_size: int, seed: int = 0, n: int = SEQ_LEN) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, n).tolist()


@torch.inference_mode()
def reference_logits(model_dir, ids) -> np.ndarray:
    """Reference logits [n - n//2 + 1, vocab] at the positions the session protocol produces."""
    model = load_model(model_dir)
    logits = model(torch.tensor([ids]), 0, DynamicCache(model.config))[0].numpy()
    return logits[len(ids) // 2 - 1:]


def session_logits(session, ids) -> np.ndarray:
    session.reset()
    half = len(ids) // 2
    out = [session.prefill(ids[:half])]
    out += [session.decode(t) for t in ids[half:]]
    return np.stack(out)[: len(ids) - half + 1]


def metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    rel = np.abs(ref - got).max() / (ref.max() - ref.min())
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return dict(rel=float(rel), mean_cos=float(cos.mean()), min_cos=float(cos.min()),
                top1_match=float((ref.argmax(-1) == got.argmax(-1)).mean()))


def assert_parity(ref: np.ndarray, got: np.ndarray, bound: str) -> dict:
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    m = metrics(ref, got)
    b = BOUNDS[bound]
    if bound == "exact":
        assert m["rel"] <= b["rel"], m
        assert m["top1_match"] == 1.0, m
    else:
        assert m["mean_cos"] >= b["mean_cos"] and m["min_cos"] >= b["min_cos"], m
    return m
