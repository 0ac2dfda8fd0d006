"""Synthetic token tasks for the quality proxies: Zoology's MQAR and the six MAD tasks, as seeded,
data-free generators sized for a CPU.

Every generator returns (inputs, labels), int64 arrays [N, T]: the model reads inputs[:, :t+1] and is
scored at position t against labels[:, t]; -100 marks positions that are not scored. Generators take a
numpy Generator, so a task's data is fixed by its seed.

MAD (Poli et al., ICML 2024, arXiv 2403.17844; athms/mad-lab `mad/data/instances.py`) defines the six
tasks. MAD trains each for 200 epochs of 100 steps; a proxy gets a few hundred steps, so the tasks here are
MAD's at a size a small candidate learns in that time (MAD's baselines in brackets): recall and noisy recall
as MAD's (vocab 16 / 16+16, length 128), fuzzy recall with motifs of up to 2 tokens in 64 (3 in 128),
selective copying of 8 tokens in 96 (16 in 256), compression of 16 tokens (32), memorization of 1023 facts
from 512 training sequences (127 facts, 256 sequences: every candidate stored them all). Training is scored
on the task's targets only (MAD trains on every next token): the cheaper signal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

IGNORE = -100


# ---- MQAR (Zoology) -------------------------------------------------------------------------------
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
    labels = np.full((num_examples, seq_len + 1), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, gaps * 2 + context + 1, values, axis=1)
    inputs, labels = examples[:, :-1], labels[:, 1:]
    if random_non_queries:
        noise = rng.integers(0, vocab_size, inputs.shape)
        inputs = np.where(inputs == 0, noise, inputs)
    return inputs, labels


# ---- MAD ------------------------------------------------------------------------------------------
def in_context_recall(n: int, rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 128,
                      noise_vocab_size: int = 0, frac_noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Key-value pairs drawn with replacement from a per-sequence map (keys in the first half of the
    non-noise vocabulary, values in the second); every value whose key appeared before is scored
    (MAD's multi-query setting). With `frac_noise`, that share of pair slots holds two noise tokens."""
    pairs = seq_len // 2
    half = (vocab_size - noise_vocab_size) // 2
    keys = rng.integers(0, half, (n, pairs))
    mapping = rng.integers(half, 2 * half, (n, half))
    values = np.take_along_axis(mapping, keys, axis=1)
    noise = rng.random((n, pairs)) < frac_noise
    seen_before = np.zeros((n, pairs), dtype=bool)
    for j in range(1, pairs):  # a key counts as presented only in a non-noise slot
        seen_before[:, j] = ((keys[:, :j] == keys[:, j:j + 1]) & ~noise[:, :j]).any(axis=1)
    inputs = np.empty((n, seq_len), dtype=np.int64)
    inputs[:, 0::2], inputs[:, 1::2] = keys, values
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    # the value is predicted at its key's position
    labels[:, 0::2] = np.where(seen_before & ~noise, values, IGNORE)
    if frac_noise:
        noise_tokens = rng.integers(2 * half, vocab_size, (n, seq_len))
        slot = np.repeat(noise, 2, axis=1)
        inputs = np.where(slot, noise_tokens, inputs)
    return inputs, labels


def noisy_recall(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """In-context recall with 16 noise tokens filling 20% of the pair slots (MAD: vocab 32)."""
    return in_context_recall(n, rng, vocab_size=32, noise_vocab_size=16, frac_noise=0.2)


def fuzzy_recall(n: int, rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 64,
                 motif: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values are runs of 1-`motif` tokens (MAD's fuzzy recall); a value is scored, token by
    token, when its key (the same run) appeared before. The last id is padding on the left."""
    pad = vocab_size - 1
    half = (vocab_size - 1) // 2
    inputs = np.full((n, seq_len), pad, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    for i in range(n):
        mapping: dict[tuple, tuple] = {}
        seq: list[int] = []
        lab: list[int] = []
        while True:
            k = tuple(rng.integers(0, half, rng.integers(1, motif + 1)))
            v = mapping.get(k) or tuple(rng.integers(half, 2 * half, rng.integers(1, motif + 1)))
            if len(seq) + len(k) + len(v) > seq_len:
                break
            known = k in mapping
            mapping[k] = v
            seq += [*k, *v]
            # value token j is predicted at the position before it (the key's last token, then value j-1)
            lab += [IGNORE] * (len(k) - 1) + (list(v) if known else [IGNORE] * len(v)) + [IGNORE]
        inputs[i, seq_len - len(seq):] = seq
        labels[i, seq_len - len(seq):] = lab[:len(seq)]
    return inputs, labels


def selective_copying(n: int, rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 96,
                      n_copy: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """`n_copy` tokens scattered among blanks, then a copy token: reproduce them in order (MAD)."""
    copy_token, blank = vocab_size - 1, vocab_size - 2
    body = seq_len - n_copy - 1
    inputs = np.full((n, seq_len), blank, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    tokens = rng.integers(0, vocab_size - 2, (n, n_copy))
    for i in range(n):
        where = np.sort(rng.choice(body, n_copy, replace=False))
        inputs[i, where] = tokens[i]
    inputs[:, body] = copy_token
    # token j is predicted at the copy token (j = 0) and at the blanks after it
    labels[:, body:body + n_copy] = tokens
    return inputs, labels


def compression(n: int, rng: np.random.Generator, vocab_size: int = 16,
                seq_len: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens and a compression token; the sequence must be rebuilt from the last position's
    state alone (MAD's auto-encoder: see `proxies.CompressionProxy`). Labels are the inputs."""
    inputs = rng.integers(0, vocab_size - 1, (n, seq_len))
    inputs[:, -1] = vocab_size - 1
    return inputs, inputs.copy()


def memorization(n: int, rng: np.random.Generator, vocab_size: int = 2048, seq_len: int = 32,
                 map_seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """(key, insert) pairs whose values come from one fixed map (the same in every sequence and seed):
    facts stored in the weights, not in the context (MAD)."""
    insert = vocab_size - 1
    half = (vocab_size - 1) // 2
    mapping = np.random.default_rng(map_seed).permutation(np.arange(half, 2 * half))
    keys = rng.integers(0, half, (n, seq_len // 2))
    inputs = np.full((n, seq_len), insert, dtype=np.int64)
    inputs[:, 0::2] = keys
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    labels[:, 1::2] = mapping[keys]  # predicted at the insert token
    return inputs, labels


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    vocab_size: int
    train_examples: int | None = None   # a fixed training set (memorization); None: fresh examples per step
    summary: str = ""


MAD_TASKS = {t.name: t for t in (
    Task("recall", in_context_recall, 16, summary="in-context recall (multi-query), vocab 16, length 128"),
    Task("fuzzy_recall", fuzzy_recall, 16, summary="keys and values of 1-2 tokens, vocab 16, length 64"),
    Task("noisy_recall", noisy_recall, 32, summary="recall with 20% noise pairs, vocab 16+16, length 128"),
    Task("selective_copy", selective_copying, 16, summary="copy 8 tokens scattered in 96, vocab 16"),
    Task("compression", compression, 16, summary="rebuild 16 tokens from the last state, vocab 16"),
    Task("memorization", memorization, 2048, train_examples=512,
         summary="a fixed 1023-fact map, 512 training sequences, vocab 2048, length 32"),
)}
