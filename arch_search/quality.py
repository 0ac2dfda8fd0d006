"""Quality proxies: how good a candidate backbone would be, at a fraction of the cost of training it.

  params      non-embedding parameters (LiteTransformerSearch's training-free proxy; maximise). Blind to
              the operator type: a conv block and an attention block of equal size score the same.
  mqar[:N]    multi-query associative recall (Zoology, arXiv 2312.04927), data-free: the candidate's
              backbone is trained N steps (default 400) on synthetic key-value recall and scored by
              accuracy on held-out sequences (maximise). Short convolutions cannot store key->value
              bindings over long gaps, attention can, so this separates conv-only from
              attention-bearing designs.
  lm:FILE[:N] language modelling on a text corpus: N steps (default 200) on 90% of FILE tokenized with
              the search's tokenizer, scored by the loss on the other 10% (minimise).
Seeds are fixed (weights, data, batches), so a proxy value is reproducible. The cost of a proxy is
reported separately from the measurement (`quality_s`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import EdgeError


@dataclass(frozen=True)
class Proxy:
    kind: str                   # params | mqar | lm
    direction: str              # maximize | minimize
    label: str                  # column / axis name
    steps: int = 0
    corpus: str | None = None
    worst: float = 0.0          # the value of a candidate that learned nothing (used when skipped)

    @property
    def trains(self) -> bool:
        return self.kind != "params"

    def spec(self) -> str:
        return {"params": "params", "mqar": f"mqar:{self.steps}", "lm": f"lm:{self.corpus}:{self.steps}"}[self.kind]


def parse_proxy(spec: str) -> Proxy:
    """`params`, `mqar`, `mqar:STEPS`, `lm:FILE` or `lm:FILE:STEPS`."""
    def steps_of(text: str, default: int) -> int:
        if not text:
            return default
        if not text.isdigit() or int(text) < 1:
            raise EdgeError(f"--quality {spec}: {text!r} is not a positive number of training steps")
        return int(text)

    if spec == "params":
        return Proxy("params", "maximize", "non-embedding params (M)")
    if spec == "mqar" or spec.startswith("mqar:"):
        return Proxy("mqar", "maximize", "MQAR accuracy", steps=steps_of(spec[5:], 400), worst=0.0)
    if spec.startswith("lm:") and len(spec) > 3:
        rest = spec[3:]
        path, _, tail = rest.rpartition(":")
        if not (path and tail.isdigit()):
            path, tail = rest, ""
        if not Path(path).is_file():
            raise EdgeError(f"--quality lm:{path}: no such file; give a text corpus, e.g. lm:corpus.txt")
        return Proxy("lm", "minimize", "validation loss", steps=steps_of(tail, 200), corpus=str(Path(path).resolve()),
                     worst=float("inf"))
    raise EdgeError(f"unknown --quality {spec!r}; use params, mqar[:STEPS] or lm:FILE[:STEPS]")


def evaluate(proxy: Proxy, config, tokenizer_path: str | Path | None = None, seed: int = 0,
             threads: int = 1) -> tuple[float, dict]:
    """(value, details) of `proxy` for `config` (a HybridConfig); details include the cost in seconds."""
    started = time.perf_counter()
    if proxy.kind == "params":
        value, details = config.n_params(include_embeddings=False) / 1e6, {}
    elif proxy.kind == "mqar":
        value, details = mqar_accuracy(config, steps=proxy.steps, seed=seed, threads=threads)
    else:
        value, details = lm_loss(config, proxy.corpus, tokenizer_path, steps=proxy.steps, seed=seed,
                                 threads=threads)
    details["quality_s"] = round(time.perf_counter() - started, 3)
    return value, details


# ---- MQAR -----------------------------------------------------------------------------------------
def multiquery_ar(vocab_size: int, num_examples: int, seq_len: int, num_kv_pairs: int, seed: int,
                  power_a: float = 0.01, random_non_queries: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Zoology's MQAR generator (zoology/data/multiquery_ar.py), with a seeded numpy Generator.

    A sequence is `num_kv_pairs` (key, value) pairs, then each key queried once after a gap drawn from
    a power law; keys come from the first half of the vocabulary, values from the second. Labels are -100
    except right after a query, where the label is the queried key's value."""
    if vocab_size <= seq_len or 4 * num_kv_pairs > seq_len:
        raise ValueError("MQAR needs vocab_size > seq_len and 4 * num_kv_pairs <= seq_len")
    rng = np.random.default_rng(seed)
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    keys = np.stack([rng.choice(np.arange(1, half), num_kv_pairs, replace=False) for _ in range(num_examples)])
    values = np.stack([rng.choice(np.arange(half, vocab_size), num_kv_pairs, replace=False)
                       for _ in range(num_examples)])
    kvs = np.zeros((num_examples, context), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p /= p.sum()
    gaps = np.stack([rng.choice(space, num_kv_pairs, replace=False, p=p) for _ in range(num_examples)])
    queries = np.zeros((num_examples, seq_len - context + 1), dtype=np.int64)
    np.put_along_axis(queries, gaps * 2, keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((num_examples, seq_len + 1), -100, dtype=np.int64)
    np.put_along_axis(labels, gaps * 2 + context + 1, values, axis=1)
    inputs, labels = examples[:, :-1], labels[:, 1:]
    if random_non_queries:
        noise = rng.integers(0, vocab_size, inputs.shape)
        inputs = np.where(inputs == 0, noise, inputs)
    return inputs, labels


MQAR_TASK = dict(vocab_size=256, seq_len=64, num_kv_pairs=8)  # Zoology's smallest setting, smaller vocab
MQAR_BATCH = 32
MQAR_LR = 3e-3


def mqar_accuracy(config, steps: int, seed: int = 0, threads: int = 1) -> tuple[float, dict]:
    """Train the candidate's backbone (vocab swapped for MQAR's) on recall; accuracy on fresh sequences."""
    cfg = config.replace(vocab_size=MQAR_TASK["vocab_size"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    train_x, train_y = multiquery_ar(num_examples=steps * MQAR_BATCH, seed=seed, **MQAR_TASK)
    test_x, test_y = multiquery_ar(num_examples=256, seed=seed + 1_000_003, **MQAR_TASK)
    model, final_loss = _train(cfg, train_x, train_y, steps, MQAR_BATCH, MQAR_LR, seed, threads)
    logits = _logits_of(cfg, model, test_x)
    mask = test_y != -100
    accuracy = float((logits.argmax(-1).numpy()[mask] == test_y[mask]).mean())
    return accuracy, {"mqar": {**MQAR_TASK, "steps": steps, "batch": MQAR_BATCH, "lr": MQAR_LR,
                               "final_train_loss": round(final_loss, 4)}}


# ---- language modelling ---------------------------------------------------------------------------
LM_SEQ_LEN = 128
LM_BATCH = 16
LM_LR = 1e-3


def lm_loss(config, corpus: str, tokenizer_path, steps: int, seed: int = 0, threads: int = 1) -> tuple[float, dict]:
    from edge.tokenizer import load_tokenizer

    if tokenizer_path is None:
        raise EdgeError("the lm proxy needs the search's tokenizer")
    ids = np.array(load_tokenizer(str(tokenizer_path)).encode(Path(corpus).read_text(errors="replace")).ids,
                   dtype=np.int64)
    split = int(len(ids) * 0.9)
    if len(ids) - split < LM_SEQ_LEN + 1 or split < LM_SEQ_LEN + 1:
        raise EdgeError(f"--quality lm:{corpus}: the corpus has only {len(ids)} tokens; give at least "
                        f"{20 * (LM_SEQ_LEN + 1)} (a few dozen KB of text)")
    from edge.train import lm_batches

    train_x, train_y = lm_batches(ids[:split], steps, LM_BATCH, LM_SEQ_LEN, seed)
    n_val = min(64, (len(ids) - split) // (LM_SEQ_LEN + 1))
    val = np.stack([ids[split + i * (LM_SEQ_LEN + 1): split + (i + 1) * (LM_SEQ_LEN + 1)] for i in range(n_val)])
    model, final_loss = _train(config, train_x, train_y, steps, LM_BATCH, LM_LR, seed, threads)
    import torch
    logits = _logits_of(config, model, val[:, :-1])
    val_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      torch.from_numpy(val[:, 1:]).reshape(-1)))
    return val_loss, {"lm": {"corpus": corpus, "tokens": int(len(ids)), "steps": steps, "batch": LM_BATCH,
                             "seq_len": LM_SEQ_LEN, "lr": LM_LR, "final_train_loss": round(final_loss, 4)}}


def _train(cfg, inputs, labels, steps, batch, lr, seed, threads):
    """A fresh candidate (seeded init) trained by edge.train's shared loop; returns (model, last loss)."""
    from edge.model import HybridLM
    from edge.train import train

    model = HybridLM(cfg).init_weights(seed)
    return model, train(model, inputs, labels, steps, batch, lr, seed, threads)


def _logits_of(cfg, model, inputs: np.ndarray):
    import torch

    from edge.model import DynamicCache

    with torch.no_grad():
        x = torch.from_numpy(inputs)
        return model(x, 0, DynamicCache(cfg, batch_size=x.shape[0]))
