"""Exporters: a Hugging Face LFM2 checkpoint -> .gguf (llama.cpp), .pte (ExecuTorch), .onnx (ONNX Runtime).

Which formats exist, their suffixes, quant and KV vocabularies and defaults: edge/formats/__init__.py (the
one registry). Each format's exporter is `export(model_dir, out, quant, kv_cache, max_seq_len, **options)
-> Path`, which writes atomically (edge.files.atomic_path, or atomic_dir for the ONNX model folder): an
interrupted export leaves nothing under the output name. `export_model` validates the checkpoint first
(edge.checkpoint.check_checkpoint), so a checkpoint whose weights do not match its config.json is one
error line and no file, whatever the format.
"""
from __future__ import annotations

from pathlib import Path

from edge import formats
from edge.errors import EdgeError

DEFAULT_MAX_SEQ_LEN = 2048


def export_model(fmt: str, model_dir, out, quant: str | None = None, kv_cache: str | None = None,
                 max_seq_len: int | None = None, **options) -> Path:
    """options: the format's own (see its exporter), including `quant_method` (a name of the format's
    quant_methods; None: the format's default for the quant) and `calib` (a calibration text file)."""
    spec = formats.get(fmt)
    out = Path(out)
    # onnx: a path without .onnx is an onnxruntime-genai model folder (export/genai.py)
    folder = spec.folder and out.suffix not in formats.SUFFIXES
    if out.suffix != spec.suffix and not folder:
        raise EdgeError(f"output {out} should end in {spec.suffix} for format {fmt}"
                        + (" (or have no suffix: a model folder)" if spec.folder else ""))
    quant = quant or spec.default_quant
    kv_cache = kv_cache or spec.default_kv_cache
    spec.check(quant, kv_cache, quant_method=options.get("quant_method"))
    max_seq_len = max_seq_len or DEFAULT_MAX_SEQ_LEN
    if max_seq_len < 1:
        raise EdgeError(f"--max-seq-len must be positive, got {max_seq_len}")
    from edge.checkpoint import check_checkpoint  # imports torch: only when exporting

    # one check for every format, before anything is written: config, tensors, tokenizer, finite weights
    check_checkpoint(model_dir)
    return spec.exporter()(Path(model_dir), out, quant=quant, kv_cache=kv_cache, max_seq_len=max_seq_len, **options)
