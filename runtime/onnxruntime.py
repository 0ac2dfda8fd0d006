"""ONNX Runtime backend for the .onnx files export/onnx.py writes (I/O names: see that module).

The sequence state (K/V, their scales, conv states) lives in OrtValues that ORT allocates as the
`present.*` outputs of one step and that are bound as the `past_*` inputs of the next through IO
binding, so the cache never round-trips through numpy between tokens.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.config import HybridConfig
from edge.errors import EdgeError
from edge.tokenizer import load_tokenizer

from .session import Session

META_PREFIX = "edge."
REQUIRED_META = ("config", "tokenizer", "quant", "kv_cache", "max_seq_len")
# ONNX tensor type strings -> numpy dtypes (the ones our graphs use for state)
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def read_metadata(session: ort.InferenceSession, path) -> dict[str, str]:
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in REQUIRED_META if META_PREFIX + k not in meta]
    if missing:
        raise EdgeError(f"{path} lacks the metadata {META_PREFIX}{missing[0]}; it was not written by "
                        "`edge export onnx` — re-export it with `edge export onnx MODEL_DIR -o OUT.onnx`")
    return {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}


class OnnxSession(Session):
    engine = "onnxruntime"

    def __init__(self, path, n_threads: int | None = None, max_seq_len: int | None = None,
                 optimization: str = "all", **ignored):
        path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if n_threads:
            options.intra_op_num_threads = int(n_threads)
        options.log_severity_level = 3  # ORT's warnings would otherwise go to stderr on every load
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise EdgeError(f"cannot load {path} in ONNX Runtime: {first_line(e)}; the file is corrupt or "
                            "not an ONNX model — re-export it with `edge export onnx`") from None
        meta = read_metadata(self.session, path)
        try:
            config = HybridConfig.from_dict(json.loads(meta["config"]))
            tokenizer = load_tokenizer(meta["tokenizer"])
            exported_max = int(meta["max_seq_len"])
        except (ValueError, KeyError) as e:
            raise EdgeError(f"{path} has unreadable metadata ({first_line(e)}); re-export it") from None
        if max_seq_len and max_seq_len > exported_max:
            raise EdgeError(f"max_seq_len {max_seq_len} exceeds the {exported_max} {path} was exported for; "
                            "re-export with a larger --max-seq-len")
        super().__init__(config, tokenizer, max_seq_len or exported_max, n_threads, quant=meta["quant"],
                         kv_cache=meta["kv_cache"], path=str(path))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.state_names = [n for n in self.inputs if n != "input_ids"]
        self.output_names = [o.name for o in self.session.get_outputs()]
        expected = ["logits", *(present_name(n) for n in self.state_names)]
        if "input_ids" not in self.inputs or sorted(self.output_names) != sorted(expected):
            raise EdgeError(f"{path} does not have the I/O of an `edge export onnx` model "
                            f"(inputs {list(self.inputs)[:3]}...); re-export it")
        self.binding = self.session.io_binding()
        self.engine_ns = 0  # time spent inside ORT's run, so benchmarks can show the Python loop's own share
        self._reset()

    # ---- state ------------------------------------------------------------------------------
    def _empty(self, name: str) -> np.ndarray:
        info = self.inputs[name]
        shape = [0 if isinstance(d, str) or d is None else d for d in info.shape]  # past length 0
        return np.zeros(shape, dtype=ORT_DTYPES[info.type])

    def _reset(self):
        self.state = {n: ort.OrtValue.ortvalue_from_numpy(self._empty(n)) for n in self.state_names}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """A copy of the sequence state (to save a conversation); `load_state` restores it."""
        return {n: v.numpy().copy() for n, v in self.state.items()}

    def load_state(self, arrays: dict[str, np.ndarray], n_past: int) -> None:
        """Restore a state from `state_arrays` at n_past positions; shapes and dtypes are checked."""
        if sorted(arrays) != sorted(self.state_names):
            raise EdgeError(f"state has tensors {sorted(arrays)[:2]}..., expected {self.state_names[:2]}...")
        for name, arr in arrays.items():
            want = [n_past if isinstance(d, str) else d for d in self.inputs[name].shape]
            if list(arr.shape) != want or arr.dtype != ORT_DTYPES[self.inputs[name].type]:
                raise EdgeError(f"cache tensor {name} has shape {list(arr.shape)} {arr.dtype}, expected {want} "
                                f"{np.dtype(ORT_DTYPES[self.inputs[name].type])} at {n_past} past positions")
        self.state = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()}
        self.n_past = n_past

    def kv_cache_bytes(self) -> int:
        """Bytes of the K/V tensors (and their int8 scales) at the current context."""
        return sum(int(np.prod(v.shape())) * np.dtype(ORT_DTYPES[self.inputs[n].type]).itemsize
                   for n, v in self.state.items() if n.startswith("past_key_values."))

    # ---- one step ----------------------------------------------------------------------------
    def _forward(self, ids):
        io = self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        for name, value in self.state.items():
            io.bind_ortvalue_input(name, value)
        for name in self.output_names:
            io.bind_output(name, "cpu")
        try:
            t0 = time.perf_counter_ns()
            self.session.run_with_iobinding(io)
            self.engine_ns += time.perf_counter_ns() - t0
        except Exception as e:
            raise EdgeError(f"ONNX Runtime failed on {self.path}: {first_line(e)}") from None
        outputs = dict(zip(self.output_names, io.get_outputs()))
        self.state = {n: outputs[present_name(n)] for n in self.state_names}
        return outputs["logits"].numpy()[0, -1].astype(np.float32, copy=False)

    def close(self):
        self.state = {}
        self.binding = None
        self.session = None


def present_name(past: str) -> str:
    """The output name that carries a past_* input's next value (export/onnx.py writes these pairs)."""
    return past.replace("past_key_values.", "present.").replace("past_conv.", "present_conv.")
