"""Atomic writes: an interrupted export or search never leaves a half-written file under its final name."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from .errors import EdgeError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path next to `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result gets an ordinary file's mode
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, replaceable=lambda old: False):
    """Yield a temporary directory next to `final`; on success it takes `final`'s name (an existing
    `final` is swapped out and deleted only when `replaceable(final)` says it is an earlier output of
    the same kind, so a mistyped path never deletes a user's directory)."""
    import shutil

    final = Path(final)
    if final.exists() and not (final.is_dir() and replaceable(final)):
        raise EdgeError(f"{final} exists and is not an earlier output of this command; choose another path "
                        "or remove it first")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result gets an ordinary directory's mode
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
