"""Real text that exists offline on every machine: the Python standard library's own sources.

Used where the project needs text a model can learn from (the search's `lm` proxy and its validation,
distillation, calibration) without a download. The split is by module, so held-out text comes from files
the training text never saw: a file is held out when the first byte of the sha256 of its path relative to
the stdlib root is below `HELDOUT_SHARE * 256` (stable across machines; only the file set differs with the
Python version, so record `describe()` beside any figure measured on it).
Tests (`test/`, `idle_test/`, `tests/`) and `site-packages` are left out: they are mostly data and
fixtures, not code a model should imitate.
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

HELDOUT_SHARE = 0.1
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "all") -> list[Path]:
    """The stdlib's .py files, sorted by path; `split` is "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if split == "all":
        return files
    return [p for p in files if _heldout(p.relative_to(root)) == (split == "heldout")]


def _heldout(relative: Path) -> bool:
    return hashlib.sha256(relative.as_posix().encode()).digest()[0] < HELDOUT_SHARE * 256


def stdlib_text(split: str = "all") -> str:
    """The files of `split` joined by blank lines (undecodable bytes replaced)."""
    return "\n\n".join(p.read_text(errors="replace") for p in stdlib_files(split))


def describe() -> dict:
    """What the corpus is on this machine, for records: Python version, files and characters per split."""
    out = {"corpus": "python-stdlib", "python": sys.version.split()[0], "heldout_share": HELDOUT_SHARE}
    for split in ("train", "heldout"):
        files = stdlib_files(split)
        out[f"{split}_files"] = len(files)
        out[f"{split}_chars"] = sum(len(p.read_text(errors="replace")) for p in files)
    return out
