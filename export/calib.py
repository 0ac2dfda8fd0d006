"""Calibration text, and what the quantizers that learn from activations read from it (issue 27).

`--calib FILE` names a UTF-8 text file; without it the text is the default corpus (edge.tokenizer:
the Python standard library's source of a dozen modules, present on every machine, ~110k tokens of our
tiny BPE). The first CALIBRATION_TOKENS tokens of it, in independent sequences of CHUNK_TOKENS (as
llama.cpp's imatrix tool reads its text in chunks of 512), run through the fp32 reference model
(edge.model), and every nn.Linear's input is recorded:
- `importance(...)`: per input column, the mean of x^2 over those tokens: llama.cpp's importance matrix
  (tools/imatrix: sums / counts per column, what `llama_model_quantize` takes as its `imatrix` data);
- `linear_inputs(...)`: the inputs themselves, from which GPTQ forms each weight's Hessian X^T X.
Users who calibrate for a domain (chat, another language) give text of that domain; the default fits code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import EdgeError

CALIBRATION_TOKENS = 1024
CHUNK_TOKENS = 512


def calibration_text(path: str | Path | None = None) -> str:
    if path is None:
        from edge.tokenizer import default_corpus

        return default_corpus()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EdgeError(f"cannot read --calib {path}: {e.strerror or e}; give a UTF-8 text file") from None
    if not text.strip():
        raise EdgeError(f"--calib {path} is empty; give a text file of at least a few thousand words")
    return text


def calibration_ids(tokenizer_text: str, path: str | Path | None = None,
                    n_tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """The first n_tokens token ids of the calibration text (fewer if the text is shorter; at least 16)."""
    from edge.tokenizer import load_tokenizer

    text = calibration_text(path)
    ids = load_tokenizer(tokenizer_text).encode(text[:40 * n_tokens]).ids[:n_tokens]
    if len(ids) < 16:
        raise EdgeError(f"--calib {path} gives {len(ids)} tokens; calibration needs at least 16 "
                        f"({n_tokens} are used)")
    return ids


def _each_input(model, ids: list[int], names: set[str] | None, take) -> dict[str, str]:
    """Run `model` over `ids` in sequences of CHUNK_TOKENS and call take(name, rows [T, in_features] float32
    torch) with the input of each nn.Linear (by module name; only `names` if given). Linears that read the
    same input (q/k/v, w1/w3) are taken once, under the first; returns each sibling's first."""
    import torch
    from torch import nn

    from edge.model import DynamicCache

    first_of: dict[str, str] = {}
    # id of an input tensor -> (the first linear that read it, the tensor: kept alive so that its id is not
    # reused within the chunk)
    by_input: dict[int, tuple[str, torch.Tensor]] = {}
    hooks = []

    def record(name):
        def hook(module, args):
            x = args[0]
            if id(x) in by_input:  # a sibling of the first linear to read x
                first_of[name] = by_input[id(x)][0]
                return
            by_input[id(x)] = (name, x)
            first_of[name] = name
            take(name, x.detach().reshape(-1, x.shape[-1]).float())
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (names is None or name in names):
            hooks.append(module.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), CHUNK_TOKENS):
                by_input.clear()
                model(torch.tensor([ids[start:start + CHUNK_TOKENS]]), 0, DynamicCache(model.config))
    finally:
        for h in hooks:
            h.remove()
    return first_of


def linear_inputs(model, ids: list[int], names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Input rows [n_tokens, in_features] (float32) of each nn.Linear of `model` (by module name; only
    `names` if given) over `ids`. Linears that share one input (q/k/v, w1/w3) share one array."""
    import torch

    rows: dict[str, list] = {}
    first_of = _each_input(model, ids, names, lambda name, x: rows.setdefault(name, []).append(x.clone()))
    arrays = {name: torch.cat(parts).numpy() for name, parts in rows.items()}
    return {name: arrays[first] for name, first in first_of.items()}


def importance(model, ids: list[int], names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Per nn.Linear, the mean of x^2 per input column over `ids` (float32 [in_features]): llama.cpp's
    importance-matrix entry of that weight. Kept as running sums: no activation is stored."""
    sums: dict[str, list] = {}

    def take(name, x):
        acc = sums.setdefault(name, [0.0, 0])
        acc[0] = acc[0] + (x.double() ** 2).sum(0)
        acc[1] += x.shape[0]

    first_of = _each_input(model, ids, names, take)
    means = {name: (total / count).float().numpy() for name, (total, count) in sums.items()}
    return {name: means[first] for name, first in first_of.items()}
