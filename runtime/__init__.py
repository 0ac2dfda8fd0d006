"""One Session API over the PyTorch reference, llama.cpp, ExecuTorch and ONNX Runtime.

    from runtime import load
    s = load("model.gguf")          # .gguf / .pte / .onnx / Hugging Face checkpoint directory
    s = load("model_dir")           # an onnxruntime-genai model folder (`edge export onnx -o DIR`) too
"""
from __future__ import annotations

from pathlib import Path

from edge.errors import EdgeError
from export.genai import is_model_folder, model_file

from .session import Session

# suffix -> (module, class); imported lazily so one engine's import cost is paid only when used
BACKENDS = {
    ".gguf": ("runtime.llamacpp", "LlamaCppSession"),
    ".pte": ("runtime.executorch", "ExecuTorchSession"),
    ".onnx": ("runtime.onnxruntime", "OnnxSession"),
}


def engine_for(path: str | Path) -> str:
    path = Path(path)
    if is_model_folder(path):
        return "onnxruntime"
    if path.is_dir():
        return "pytorch"
    if path.suffix not in BACKENDS:
        raise EdgeError(f"cannot load {path}: unknown artifact type {path.suffix!r}; "
                        f"expected {', '.join(BACKENDS)} or a Hugging Face checkpoint directory")
    return BACKENDS[path.suffix][0].split(".")[1]


def load(path: str | Path, n_threads: int | None = None, **options) -> Session:
    """Open an artifact or checkpoint directory. Options are engine-specific (e.g. kv_cache for .gguf)."""
    import importlib

    path = Path(path)
    if not path.exists():
        raise EdgeError(f"{path} does not exist; give an exported artifact or a checkpoint directory")
    if is_model_folder(path):  # an onnxruntime-genai folder: our session runs the graph its config names
        from .onnxruntime import OnnxSession
        session = OnnxSession(model_file(path), n_threads=n_threads, **options)
        session.path = str(path)
        return session
    if path.is_dir():
        from .reference import ReferenceSession
        return ReferenceSession(path, n_threads=n_threads, **options)
    engine_for(path)  # raises on an unknown suffix
    module, cls = BACKENDS[path.suffix]
    return getattr(importlib.import_module(module), cls)(path, n_threads=n_threads, **options)


__all__ = ["load", "Session", "engine_for"]
