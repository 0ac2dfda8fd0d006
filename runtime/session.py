"""The Session API every engine implements (docs/design.md §4).

A backend subclasses `Session` and implements `_forward(ids) -> last logits`, `_reset()` and
`kv_cache_bytes()` (abstract here). Input checks, position bookkeeping, sampling and text streaming live
here once, so every engine reports bad input with the same one-line `EdgeError`.

Every engine runtime.load opens has one constructor signature, `Backend(path, n_threads=None,
kv_cache=None, max_seq_len=None)` (LOAD_OPTIONS), and calls `Session.__init__` with what it read from the
artifact. An option the engine cannot honour is an EdgeError naming the engine (`_fixed_at_export`).
Capabilities only some engines have are declared here with a default, never probed with hasattr:
`format.kv_cache_at_load`, `saves_state` (state_arrays/load_state), `op_library`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np

from edge.config import HybridConfig
from edge.errors import EdgeError
from edge.formats import Format

LOAD_OPTIONS = ("n_threads", "kv_cache", "max_seq_len")


class Session(ABC):
    engine: ClassVar[str] = "?"
    format: ClassVar[Format | None] = None  # its entry in edge.formats (None: the reference, benchmark peers)
    saves_state: ClassVar[bool] = False     # state_arrays()/load_state() save and restore a conversation
    chat_template: str | None = None  # the artifact's chat template (edge/chat.py), where it carries one
    op_library: str | None = None     # the native op library the artifact needs loaded, where it needs one

    def __init__(self, config: HybridConfig, tokenizer, max_seq_len: int, n_threads: int | None = None,
                 quant: str = "f32", kv_cache: str = "f32", path: str = ""):
        self.config = config
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer, or None where the artifact has none
        self.max_seq_len = int(max_seq_len)
        self.n_threads = n_threads
        self.quant = quant
        self.kv_cache = kv_cache
        self.path = path
        self.n_past = 0

    # ---- what a backend implements ------------------------------------------------------------
    @abstractmethod
    def _forward(self, ids: list[int]) -> np.ndarray:
        """Run ids at positions n_past.. through the engine; return float32 logits [vocab] of the last."""

    @abstractmethod
    def _reset(self) -> None:
        """Start a fresh sequence."""

    @abstractmethod
    def kv_cache_bytes(self) -> int:
        """Bytes the K/V cache of the attention layers occupies at the current context."""

    def close(self) -> None:
        """Free the engine's resources (idempotent)."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        raise EdgeError(f"{self.engine} cannot save a conversation's state (Session.saves_state is False)")

    def load_state(self, arrays: dict[str, np.ndarray], n_past: int) -> None:
        raise EdgeError(f"{self.engine} cannot restore a conversation's state (Session.saves_state is False)")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def _fixed_at_export(cls, path, option: str, asked, stored) -> None:
        """load(option=asked) on an engine that fixes the option at export: refused, in one line, unless
        it names what the artifact already has."""
        if asked is not None and asked != stored:
            flag = "--" + option.replace("_", "-")
            fix = (f"re-export with `edge export {cls.format.name} {flag} {asked}`" if cls.format
                   else f"{cls.engine} has no other")
            raise EdgeError(f"{cls.engine}: {getattr(path, 'name', path)} has {option} {stored}, fixed at export; "
                            f"drop {option}/{flag} or {fix}")

    # ---- the API ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        ids = self._check(ids)
        logits = self._forward(ids)
        self.n_past += len(ids)
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def reset(self) -> None:
        self._reset()
        self.n_past = 0

    def _check(self, ids) -> list[int]:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            raise EdgeError("empty token list; give at least one token id")
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise EdgeError(f"token id {bad} is out of range for vocab size {self.vocab_size}")
        if self.n_past + len(ids) > self.max_seq_len:
            raise EdgeError(f"context overflow: {self.n_past} cached + {len(ids)} new tokens exceed "
                            f"max_seq_len {self.max_seq_len}; call reset() or export with a larger --max-seq-len")
        return ids

    def generate(self, ids: Sequence[int], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True) -> Iterator[int]:
        """Yield new token ids after prefilling `ids` on top of the current context."""
        rng = np.random.default_rng(seed)
        logits = self.prefill(ids)
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, rng)
            yield token
            if stop_at_eos and token == self.config.eos_token_id:
                return
            if self.n_past >= self.max_seq_len:
                return
            logits = self.decode(token)

    # ---- text -----------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        self._need_tokenizer()
        # bos is added here, not by the tokenizer: a tokenizer.json whose post-processor also adds it
        # (LiquidAI's) would otherwise give two
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.config.bos_token_id  # None: a model without one (config.json's bos_token_id null)
        return [bos, *ids] if add_bos and bos is not None else ids

    def stream_text(self, prompt: str, **generate_kwargs) -> Iterator[str]:
        """Yield printable text pieces as tokens are generated (complete UTF-8 characters only)."""
        self._need_tokenizer()
        out: list[int] = []
        shown = ""
        for token in self.generate(self.encode(prompt), **generate_kwargs):
            out.append(token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                continue
            yield text[len(shown):]
            shown = text

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise EdgeError(f"{self.path} carries no tokenizer; pass token ids instead of text")

    def __repr__(self):
        return (f"<{type(self).__name__} {self.path} engine={self.engine} quant={self.quant} "
                f"kv_cache={self.kv_cache} n_past={self.n_past}/{self.max_seq_len}>")


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> int:
    """Greedy at temperature 0, else softmax sampling restricted by top-k and nucleus top-p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p  # smallest set whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))
