"""One Session API over the PyTorch reference, llama.cpp, ExecuTorch and ONNX Runtime.

    from runtime import load
    s = load("model.gguf")          # .gguf / .pte / .onnx / Hugging Face checkpoint directory
    s = load("model_dir")           # an onnxruntime-genai model folder (`edge export onnx -o DIR`) too
    with load("model.pte", n_threads=2) as s: ...   # closes the engine's resources on exit

Which backend runs which suffix: the format registry (edge/formats/__init__.py); backends are imported
on first use, so one engine's import cost is paid only when it is used.
"""
from __future__ import annotations

from pathlib import Path

from edge import formats
from edge.errors import EdgeError
from edge.formats.onnx import is_model_folder, model_file

from .session import LOAD_OPTIONS, Session


def engine_for(path: str | Path) -> str:
    path = Path(path)
    if is_model_folder(path):
        return formats.FORMATS["onnx"].engine
    if path.is_dir():
        return formats.REFERENCE_ENGINE
    fmt = formats.for_suffix(path)
    if fmt is None:
        raise EdgeError(f"cannot load {path}: unknown artifact type {path.suffix!r}; "
                        f"expected {', '.join(formats.SUFFIXES)} or a Hugging Face checkpoint directory")
    return fmt.engine


def backend_for(path: str | Path) -> type[Session]:
    """The Session class that runs `path` (imports that engine)."""
    path = Path(path)
    if is_model_folder(path):
        return formats.FORMATS["onnx"].backend()
    if path.is_dir():
        from .reference import ReferenceSession
        return ReferenceSession
    engine_for(path)  # raises on an unknown suffix
    return formats.for_suffix(path).backend()


def load(path: str | Path, n_threads: int | None = None, **options) -> Session:
    """Open an artifact or checkpoint directory. Options (LOAD_OPTIONS, the same for every engine):
    kv_cache (an engine that fixes it at export refuses another than the artifact's), max_seq_len."""
    path = Path(path)
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise EdgeError(f"load() takes no option {unknown[0]!r}; the options are {', '.join(LOAD_OPTIONS)}")
    if not path.exists():
        raise EdgeError(f"{path} does not exist; give an exported artifact or a checkpoint directory")
    cls = backend_for(path)
    if is_model_folder(path):  # an onnxruntime-genai folder: our session runs the graph its config names
        session = cls(model_file(path), n_threads=n_threads, **options)
        session.path = str(path)
        return session
    return cls(path, n_threads=n_threads, **options)


__all__ = ["load", "Session", "engine_for", "backend_for", "LOAD_OPTIONS"]
