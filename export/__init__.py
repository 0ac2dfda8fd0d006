"""Exporters: a Hugging Face LFM2 checkpoint -> .gguf (llama.cpp), .pte (ExecuTorch), .onnx (ONNX Runtime).

Each format module exposes QUANTS, KV_CACHES, DEFAULT_QUANT, DEFAULT_KV_CACHE and
`export(model_dir, out, quant, kv_cache, max_seq_len, **options) -> Path`, which writes atomically
(edge.files.atomic_path, or atomic_dir for the ONNX model folder): an interrupted export leaves nothing
under the output name. `export_model` validates the checkpoint first (edge.checkpoint.check_checkpoint),
so a checkpoint whose weights do not match its config.json is one error line and no file, whatever the
format.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from edge.errors import EdgeError

FORMATS = {"gguf": ("export.gguf", ".gguf"), "executorch": ("export.executorch", ".pte"),
           "onnx": ("export.onnx", ".onnx")}
DEFAULT_MAX_SEQ_LEN = 2048


def format_module(fmt: str):
    if fmt not in FORMATS:
        raise EdgeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[fmt][0])


def export_model(fmt: str, model_dir, out, quant: str | None = None, kv_cache: str | None = None,
                 max_seq_len: int | None = None, **options) -> Path:
    module = format_module(fmt)
    out = Path(out)
    # onnx: a path without .onnx is an onnxruntime-genai model folder (export/genai.py)
    folder = fmt == "onnx" and out.suffix not in {ext for _, ext in FORMATS.values()}
    if out.suffix != FORMATS[fmt][1] and not folder:
        raise EdgeError(f"output {out} should end in {FORMATS[fmt][1]} for format {fmt}"
                        + (" (or have no suffix: a model folder)" if fmt == "onnx" else ""))
    quant = quant or module.DEFAULT_QUANT
    kv_cache = kv_cache or module.DEFAULT_KV_CACHE
    if quant not in module.QUANTS:
        raise EdgeError(f"unsupported quant {quant!r} for {fmt}; choose one of {', '.join(module.QUANTS)}")
    if kv_cache not in module.KV_CACHES:
        raise EdgeError(f"unsupported KV cache {kv_cache!r} for {fmt}; choose one of {', '.join(module.KV_CACHES)}")
    max_seq_len = max_seq_len or DEFAULT_MAX_SEQ_LEN
    if max_seq_len < 1:
        raise EdgeError(f"--max-seq-len must be positive, got {max_seq_len}")
    from edge.checkpoint import check_checkpoint  # imports torch: only when exporting

    # one check for every format, before anything is written: config, tensors, tokenizer, finite weights
    check_checkpoint(model_dir)
    return module.export(Path(model_dir), out, quant=quant, kv_cache=kv_cache, max_seq_len=max_seq_len, **options)
