"""The distillation corpus: local text split into train and held-out by document, tokenized once.

The default is the Python standard library's own source (edge/corpus.py: every machine has it, ~11 MB
without its tests), split by module: a module's path hash puts it in the held-out tenth or in train, so no
held-out window shares a file with a training window. A user's corpus (`--corpus PATH`: a text file, or a
directory of them) is split by the same rule on its files' relative paths, or by its last tenth when it
is one file.

Batches are drawn by (seed, step) alone, so a resumed run sees exactly the batches it would have seen,
and only token ids (4 bytes a token) are held in memory; activations are computed batch by batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..corpus import is_heldout, stdlib_files, stdlib_root
from ..errors import EdgeError
from ..files import atomic_path

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".html", ".c", ".h", ".js", ".ts"}


def stdlib_documents() -> list[tuple[str, Path]]:
    """(path relative to the stdlib root, path) of edge.corpus's standard library sources."""
    root = stdlib_root()
    docs = [(p.relative_to(root).as_posix(), p) for p in stdlib_files()]
    if not docs:
        raise EdgeError(f"no Python standard library sources under {root}; give --corpus PATH")
    return docs


def _user_documents(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        docs = [(p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in TEXT_SUFFIXES]
        if docs:
            return docs
    raise EdgeError(f"--corpus {path}: no text there; give a text file or a directory of .txt/.md/.py files")


@dataclass
class Corpus:
    train: np.ndarray      # int32 token ids
    heldout: np.ndarray
    description: str

    @classmethod
    def build(cls, tokenizer, source: str | Path | None = None, cache_dir: str | Path | None = None) -> "Corpus":
        """Tokenize `source` (default: the standard library) with `tokenizer` (a tokenizers.Tokenizer);
        with `cache_dir` the ids are kept there, keyed by the tokenizer and the documents."""
        docs = stdlib_documents() if source is None else _user_documents(Path(source))
        description = "python-stdlib" if source is None else str(Path(source).resolve())
        key = hashlib.sha256(tokenizer.to_str().encode())
        for name, path in docs:
            key.update(f"{name}\0{path.stat().st_size}\0{path.stat().st_mtime_ns}\0".encode())
        cached = Path(cache_dir) / f"corpus-{key.hexdigest()[:16]}.npz" if cache_dir else None
        if cached and cached.exists():
            with np.load(cached) as f:
                return cls(f["train"], f["heldout"], description)
        parts = {"train": [], "heldout": []}
        texts = [(name, path.read_text(encoding="utf-8", errors="replace")) for name, path in docs]
        if len(texts) == 1:  # one file: its last tenth is held out
            name, text = texts[0]
            cut = text.rfind("\n", 0, len(text) * 9 // 10) + 1 or len(text) * 9 // 10
            texts = [(name + ":train", text[:cut]), (name + ":heldout", text[cut:])]
        for (name, text), enc in zip(texts, tokenizer.encode_batch([t for _, t in texts], add_special_tokens=False)):
            heldout = name.endswith(":heldout") or (not name.endswith(":train") and is_heldout(name))
            parts["heldout" if heldout else "train"].append(np.asarray(enc.ids, dtype=np.int32))
        train = np.concatenate(parts["train"]) if parts["train"] else np.zeros(0, np.int32)
        heldout = np.concatenate(parts["heldout"]) if parts["heldout"] else np.zeros(0, np.int32)
        if len(heldout) < 2 * 65 or len(train) < 8 * 65:
            raise EdgeError(f"the corpus {description} has {len(train)} train and {len(heldout)} held-out tokens; "
                            "give more text (a few hundred KB)")
        if cached:
            with atomic_path(cached) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, train=train, heldout=heldout)
        return cls(train, heldout, description)

    def batch(self, step: int, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """Random windows [batch, seq_len + 1] of the train split; the same (seed, step) gives the same batch."""
        if len(self.train) < seq_len + 2:
            raise EdgeError(f"the train split has {len(self.train)} tokens, fewer than a window of {seq_len + 1}")
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - seq_len - 1, batch)
        return torch.from_numpy(np.stack([self.train[s:s + seq_len + 1] for s in starts]).astype(np.int64))

    def heldout_windows(self, n: int, seq_len: int) -> torch.Tensor:
        """`n` windows [n, seq_len + 1] spread evenly over the held-out split (fewer if it is short)."""
        n = max(1, min(n, len(self.heldout) // (seq_len + 1)))
        starts = np.linspace(0, len(self.heldout) - seq_len - 1, n).astype(np.int64)
        return torch.from_numpy(np.stack([self.heldout[s:s + seq_len + 1] for s in starts]).astype(np.int64))
