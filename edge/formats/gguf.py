"""The GGUF contract: what export/gguf.py writes and runtime/llamacpp.py reads (llama.cpp's arch `lfm2`).

Names come from gguf-py (Keys, MODEL_TENSOR, the quantization types), as in llama.cpp's converter; what
is ours: the quant-name tables, the custom key of the artifact's default KV-cache type, which models
llama.cpp can run at all, and the capture of llama.cpp's log (both the K-quant exporter and the backend
quote its first error line).
"""
from __future__ import annotations

import contextlib
import functools

from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType, MODEL_ARCH, MODEL_ARCH_NAMES

from edge.config import HybridConfig
from edge.errors import EdgeError

from . import FORMATS

FORMAT = FORMATS["gguf"]
ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.LFM2]

# quant name -> (ggml type of the 2-D weights, general.file_type); written by gguf-py
DIRECT_QUANTS = {
    "f32": (QType.F32, LlamaFileType.ALL_F32),
    "f16": (QType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# quant name -> llama.cpp file type; quantized by llama.cpp itself (its mixes: q4_k_s/q4_k_m keep attn_v and
# some ffn_down at 5-6 bits, iq4_xs is 4.25 bits per weight in 256-value super-blocks; every one gives the
# output matrix q6_K)
K_QUANTS = {
    "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "iq4_xs": LlamaFileType.MOSTLY_IQ4_XS,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}
assert (*DIRECT_QUANTS, *K_QUANTS) == FORMAT.quants, "edge/formats/__init__.py lists the same quants"
# --quant-method (FORMAT.quant_methods): "imatrix" quantizes with llama.cpp's quantizer given an importance
# matrix (per input column of each weight, the mean square of its activations over --calib text, computed by
# the fp32 model: export/calib.py), which weights each block's rounding error by how much its columns matter
# (ggml-quants.c: make_qx_quants / make_qkx3_quants); "plain" quantizes without one. The importance matrix
# applies to the quants llama.cpp rounds with it; q8_0 and the float types ignore it.
IMATRIX_QUANTS = ("q4_0", *K_QUANTS)
IMATRIX_FILE_TYPES = {"q4_0": LlamaFileType.MOSTLY_Q4_0, **K_QUANTS}
# each quant's --quant-method when none is given (benchmarks/RESULTS.md, issue 27): the importance matrix lowered
# q4_k_m's KL on every checkpoint measured and q4_0's on every one's id sequence (the random one's text sequence
# rose, 0.00086 -> 0.00095); IQ4_XS it left level on the text-trained checkpoint, improved on the tiny trained
# one and worsened on both random ones (LFM2-350M's shapes: KL 0.056 -> 0.066). Given an imatrix llama.cpp also
# drops IQ4_XS's q5_K for the first ffn_down layers
DEFAULT_METHODS = {**{q: "imatrix" for q in IMATRIX_QUANTS}, "iq4_xs": "plain"}

# KV-cache types llama.cpp takes at context creation; the artifact stores its default under KV_CACHE_KEY
KV_CACHES = FORMAT.kv_caches
KV_TYPES = {name: QType[name.upper()] for name in KV_CACHES}  # f16 -> F16, q8_0 -> Q8_0, q4_0 -> Q4_0
KV_CACHE_KEY = "hybrid_edge.kv_cache"  # custom key: llama.cpp ignores it, runtime.load honours it
ABSENT_KV_CACHE = "f16"  # what a GGUF without KV_CACHE_KEY (llama.cpp's own converter's) runs with


def check_llamacpp_can_run(config: HybridConfig, where) -> None:
    """llama.cpp's lfm2 (llama-cpp-python 0.3.36) keeps a KV cache for the attention layers and recurrent
    cells for the conv layers, and aborts the whole process (GGML_ASSERT(buffer)) when either is empty."""
    for kind, layers in (("attention", config.attention_layers), ("conv", config.conv_layers)):
        if not layers:
            raise EdgeError(f"{where} has no {kind} layer, which llama.cpp's lfm2 cannot run (it aborts on an "
                            f"empty {'KV cache' if kind == 'attention' else 'recurrent state'}); keep at least one "
                            f"{'full_attention' if kind == 'attention' else 'conv'} layer or use executorch/onnx")


# ---- llama.cpp's log: captured, not printed ----------------------------------------------------------
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


class _LogCapture:
    def __init__(self):
        self.lines: list[tuple[int, str]] = []

    def first_error(self) -> str:
        errors = [text.strip() for level, text in self.lines if level == GGML_LOG_LEVEL_ERROR and text.strip()]
        return errors[0] if errors else ""


_capture: _LogCapture | None = None


@functools.cache
def quiet_llamacpp():
    """Route llama.cpp's log (process-wide) to the capture of `llama_log`, which keeps llama.cpp quiet.
    Imports llama_cpp, so only the code that runs it calls this; the callback is kept alive here."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if _capture is not None:
            _capture.lines.append((level, (text or b"").decode("utf-8", errors="replace")))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


@contextlib.contextmanager
def llama_log():
    """Collect what llama.cpp logs inside the block (to quote its error in ours)."""
    global _capture
    quiet_llamacpp()
    previous, _capture = _capture, _LogCapture()
    try:
        yield _capture
    finally:
        _capture = previous
