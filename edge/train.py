"""A short training loop, shared by the search's quality proxies (arch_search/quality.py) and the
trained test checkpoints (tests/conftest.py, `trained:<variant>`).

Random-weight models are chaotic: 4-bit rounding noise compounds through their layers and their logits
carry no signal, so a few dozen steps on text give test models the structure real checkpoints have
(peaked next-token distributions) at a cost of seconds.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .model import DynamicCache, HybridLM


def train(model: HybridLM, inputs: np.ndarray, labels: np.ndarray, steps: int, batch: int, lr: float,
          seed: int = 0, threads: int | None = None) -> float:
    """AdamW (weight decay 0.1), linear warm-up then cosine decay, over consecutive batches of
    inputs/labels [N, T] (label -100 is ignored). Trains `model` in place; returns the last loss."""
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    x_all, y_all = torch.from_numpy(inputs), torch.from_numpy(labels)
    final = float("nan")
    for step in range(steps):
        x, y = x_all[step * batch:(step + 1) * batch], y_all[step * batch:(step + 1) * batch]
        logits = model(x, 0, DynamicCache(model.config, batch_size=x.shape[0]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        final = float(loss.detach())
    model.eval()
    return final


def lm_batches(ids: np.ndarray, steps: int, batch: int, seq_len: int, seed: int = 0):
    """Random windows of a token stream as (inputs, labels) for `train`."""
    if len(ids) < seq_len + 2:
        raise ValueError(f"a corpus of {len(ids)} tokens is too short for windows of {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len - 1, steps * batch)
    windows = np.stack([ids[s:s + seq_len + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]


def train_on_text(model: HybridLM, tokenizer, text: str, steps: int, seed: int = 0, batch: int = 16,
                  seq_len: int = 64, lr: float = 3e-3, threads: int | None = None) -> float:
    """`train` on random windows of `text` (tokenized by `tokenizer`, a tokenizers.Tokenizer): what the
    trained test checkpoints use (tests/conftest.py). Returns the last loss."""
    ids = np.array(tokenizer.encode(text).ids, dtype=np.int64)
    inputs, labels = lm_batches(ids, steps, batch, seq_len, seed)
    return train(model, inputs, labels, steps, batch, lr, seed, threads)
