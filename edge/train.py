"""A short training loop and its evaluation helpers, shared by the search's quality proxies
(arch_search/proxies.py), their validation (benchmarks/proxy_validation.py) and the trained test
checkpoints (tests/conftest.py, `trained:<variant>`).

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
          seed: int = 0, threads: int | None = None, progress: str | None = None) -> float:
    """AdamW (weight decay 0.1), linear warm-up then cosine decay, over consecutive batches of
    inputs/labels [N, T] (label -100 is ignored). Trains `model` in place; returns the last loss.
    `progress`: a tqdm bar with that description (long runs), none by default."""
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
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=progress, unit="step", leave=False)
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
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{final:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return final


def train_fresh(config, inputs: np.ndarray, labels: np.ndarray, steps: int, batch: int, lr: float,
                seed: int = 0, threads: int | None = None, progress: str | None = None) -> tuple[HybridLM, float]:
    """A new model of `config` (seeded init) trained by `train`: (model, last loss)."""
    model = HybridLM(config).init_weights(seed)
    return model, train(model, inputs, labels, steps, batch, lr, seed, threads, progress)


@torch.no_grad()
def logits_of(model: HybridLM, inputs: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Logits [N, T, vocab] of full sequences inputs [N, T] (int64), in chunks of `batch` sequences."""
    x = torch.from_numpy(inputs)
    return torch.cat([model(chunk, 0, DynamicCache(model.config, batch_size=chunk.shape[0]))
                      for chunk in x.split(batch)])


@torch.no_grad()
def token_losses(model: HybridLM, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """Next-token cross-entropy [N, T-1] (nats) of each position of token windows [N, T]."""
    out = []
    for chunk in torch.from_numpy(windows).split(batch):
        logits = model(chunk[:, :-1], 0, DynamicCache(model.config, batch_size=chunk.shape[0]))
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none"))
    return torch.cat(out).numpy()


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
