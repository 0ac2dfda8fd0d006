"""Exporter peak memory against the checkpoint's size (issue 15: "exporters that scale").

Each export runs in a child process (benchmarks/bench_export_memory.py's `--child`), which reports the
kernel's high-water mark of its RSS (VmHWM) and its RSS after importing the exporter. The ratio guarded
here is what the export itself added over the imports, divided by the fp32 checkpoint's bytes: the
checkpoint (~340 MB: 4 layers of hidden 1024, a wide FFN) is big enough that whole copies of the model
show (before issue 15 the ONNX int4 export added ~4x, int8 ~7x), while the fixed cost of importing
torch and an engine (~0.3 GB) is left out, because at the sizes people deploy it is a small share.
A memory measurement, not a timing: the machine's load does not change it.

The ONNX int4 + int8 KV export (the default run) was the worst; the other formats are `benchmark`s.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# the export's own peak RSS over the imports, / fp32 checkpoint bytes: the 2x. Measured 1.78x for
# ONNX int4 + int8 KV here (fixed costs such as calibration weigh more at this size); 4x+ before issue 15
MAX_EXPORT_RATIO = 2.0
BIG = dict(hidden_size=1024, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16,
           num_key_value_heads=4, layer_types=["conv", "full_attention", "conv", "full_attention"])


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory, tokenizer):
    return build_checkpoint(tmp_path_factory.mktemp("big"), tokenizer, **BIG)


def export_peak(model_dir: Path, fmt: str, out: Path, quant: str, kv_cache: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_export_memory", "--child", str(model_dir), fmt, str(out),
           quant, kv_cache]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_ratio(model_dir: Path, fmt: str, out: Path, quant: str, kv_cache: str) -> None:
    ckpt = (model_dir / "model.safetensors").stat().st_size
    got = export_peak(model_dir, fmt, out, quant, kv_cache)
    ratio = (got["peak_rss_kb"] - got["imports_rss_kb"]) * 1024 / ckpt
    print(f"{fmt} {quant}/{kv_cache}: export peak {ratio:.2f}x the {ckpt / 1e6:.0f} MB checkpoint "
          f"(process peak {got['peak_rss_kb'] / 1e6:.2f} GB, {got['wall_s']:.0f} s)")
    assert ratio <= MAX_EXPORT_RATIO, f"{fmt} {quant} export peaked at {ratio:.2f}x the checkpoint"
    assert out.exists()


def test_onnx_int4_export_memory(big_checkpoint, tmp_path):
    check_ratio(big_checkpoint, "onnx", tmp_path / "model", "int4", "int8")


@pytest.mark.benchmark
@pytest.mark.parametrize("fmt,quant,kv_cache,suffix", [("onnx", "int8", "fp32", ""),
                                                       ("executorch", "8da4w", "int8", ".pte"),
                                                       ("executorch", "8da8w", "fp32", ".pte"),
                                                       ("gguf", "q4_0", "q8_0", ".gguf")])
def test_export_memory(big_checkpoint, tmp_path, fmt, quant, kv_cache, suffix):
    check_ratio(big_checkpoint, fmt, tmp_path / f"model{suffix}", quant, kv_cache)


def test_int8_weights_match_onnxruntime_quantizer():
    """The ONNX exporter's vectorized int8 weight quantization gives ORT quantize_dynamic's bytes
    (quant_utils.quantize_data per column: symmetric, reduce_range), zero and one-signed columns included."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    from export.onnx import quantize_columns_int8

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 65)) * rng.uniform(1e-3, 3, 65)).astype(np.float32)
    w[:, 3], w[:, 5], w[:, 6] = 0, np.abs(w[:, 5]), -np.abs(w[:, 6])
    q, scales = quantize_columns_int8(w, rows_per_step=128)
    for j in range(w.shape[1]):
        zero_point, scale, expected = quantize_data(np.ascontiguousarray(w[:, j]), TensorProto.INT8, True,
                                                    reduce_range=True)
        assert zero_point == 0 and np.float32(scale) == scales[j] and np.array_equal(expected, q[:, j]), j
