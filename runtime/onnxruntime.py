"""ONNX Runtime backend for the .onnx files export/onnx.py writes (I/O names: see that module).

The sequence state never round-trips through numpy between tokens; IO binding keeps it in ORT's
tensors. Graphs with an `attention_mask` input (GroupQueryAttention: fp32 and int8 KV) keep each K/V
tensor in one buffer bound as both the past input and the present output, which GQA appends to in place
(ORT's past_present_share_buffer, as onnxruntime-genai runs these graphs): a decode step copies no cache
and rebinds only `input_ids` and the mask. The buffers start at FIRST_CAPACITY positions and double as
the context grows. The conv states alternate between two buffers (even steps read A and write B, odd
steps the reverse), so each of the two IO bindings is set up once. Graphs without the mask (fp16 KV)
take the `present.*` OrtValues ORT allocates as the next step's `past_*` inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.config import HybridConfig
from edge.errors import EdgeError, first_line
from edge.formats import FORMATS
from edge.headers import HeaderError, check_onnx
from edge.formats.onnx import ATTENTION_MASK, META_PREFIX, REQUIRED_META, present_name
from edge.tokenizer import load_tokenizer

from .session import Session

FIRST_CAPACITY = 256  # positions of the shared K/V buffers of a fresh session
# ONNX tensor type strings -> numpy dtypes (the ones our graphs use for state)
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def read_metadata(session: ort.InferenceSession, path) -> dict[str, str]:
    try:
        meta = session.get_modelmeta().custom_metadata_map
    except UnicodeDecodeError as e:  # a corrupt byte in a metadata string
        raise EdgeError(f"{path} has unreadable metadata ({first_line(e)}); the file is corrupt, re-export it") from None
    missing = [k for k in REQUIRED_META if META_PREFIX + k not in meta]
    if missing:
        raise EdgeError(f"{path} lacks the metadata {META_PREFIX}{missing[0]}; it was not written by "
                        "`edge export onnx` — re-export it with `edge export onnx MODEL_DIR -o OUT.onnx`")
    return {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}


class OnnxSession(Session):
    format = FORMATS["onnx"]  # KV cache fixed at export: the graph's past/present dtypes
    engine = format.engine
    saves_state = True

    def __init__(self, path, n_threads: int | None = None, kv_cache: str | None = None,
                 max_seq_len: int | None = None):
        path = Path(path)
        try:  # the bounded walk first: ONNX Runtime builds every message a file declares
            check_onnx(path)
        except HeaderError as e:
            raise EdgeError(f"cannot load {path}: {e}; re-export it with `edge export onnx`") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
        self._fixed_at_export(path, "kv_cache", kv_cache, meta["kv_cache"])
        if max_seq_len and max_seq_len > exported_max:
            raise EdgeError(f"max_seq_len {max_seq_len} exceeds the {exported_max} {path} was exported for; "
                            "re-export with a larger --max-seq-len")
        super().__init__(config, tokenizer, max_seq_len or exported_max, n_threads, quant=meta["quant"],
                         kv_cache=meta["kv_cache"], path=str(path))
        self.chat_template = meta.get("chat_template")
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.state_names = [n for n in self.inputs if n not in ("input_ids", ATTENTION_MASK)]
        self.output_names = [o.name for o in self.session.get_outputs()]
        expected = ["logits", *(present_name(n) for n in self.state_names)]
        if "input_ids" not in self.inputs or sorted(self.output_names) != sorted(expected):
            raise EdgeError(f"{path} does not have the I/O of an `edge export onnx` model "
                            f"(inputs {list(self.inputs)[:3]}...); re-export it")
        self.kv_names = [n for n in self.state_names if n.startswith("past_key_values.")]
        self.shared_kv = ATTENTION_MASK in self.inputs
        if self.shared_kv:
            self.mask = np.ones((1, self.max_seq_len), np.int64)
            self.logits = np.zeros((1, 1, config.vocab_size), np.float32)
            self.conv = {n: [self._empty(n), self._empty(n)] for n in self.state_names if n not in self.kv_names}
            self.kv = {}
            self._allocate(min(FIRST_CAPACITY, self.max_seq_len))
        self._reset()

    # ---- state ------------------------------------------------------------------------------
    def _empty(self, name: str, positions: int = 0) -> np.ndarray:
        info = self.inputs[name]
        shape = [positions if isinstance(d, str) or d is None else d for d in info.shape]
        return np.zeros(shape, dtype=ORT_DTYPES[info.type])

    def _allocate(self, capacity: int):
        """Shared K/V buffers of `capacity` positions that keep the first n_past, and both bindings over them."""
        kept = {n: buf[:, :, :self.n_past] for n, buf in self.kv.items()}
        self.kv = {n: self._empty(n, capacity) for n in self.kv_names}
        for n, past in kept.items():
            self.kv[n][:, :, :self.n_past] = past
        self.capacity = capacity
        as_ort = ort.OrtValue.ortvalue_from_numpy  # wraps the numpy buffer, no copy
        kv = {n: as_ort(buf) for n, buf in self.kv.items()}
        conv = {n: [as_ort(a), as_ort(b)] for n, (a, b) in self.conv.items()}
        logits = as_ort(self.logits)
        self.bindings = []
        for step in (0, 1):  # the binding of even steps, then of odd steps
            io = self.session.io_binding()
            for n, value in kv.items():
                io.bind_ortvalue_input(n, value)
                io.bind_ortvalue_output(present_name(n), value)
            for n, pair in conv.items():
                io.bind_ortvalue_input(n, pair[step])
                io.bind_ortvalue_output(present_name(n), pair[1 - step])
            io.bind_ortvalue_output("logits", logits)
            self.bindings.append(io)

    def _reset(self):
        if self.shared_kv:  # stale K/V past n_past is never read; the conv states must restart from zero
            for pair in self.conv.values():
                pair[0].fill(0)
            self.step = 0
        else:
            self.state = {n: ort.OrtValue.ortvalue_from_numpy(self._empty(n)) for n in self.state_names}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """A copy of the sequence state (to save a conversation); `load_state` restores it."""
        if not self.shared_kv:
            return {n: v.numpy().copy() for n, v in self.state.items()}
        return {**{n: buf[:, :, :self.n_past].copy() for n, buf in self.kv.items()},
                **{n: pair[self.step % 2].copy() for n, pair in self.conv.items()}}

    def load_state(self, arrays: dict[str, np.ndarray], n_past: int) -> None:
        """Restore a state from `state_arrays` at n_past positions; shapes and dtypes are checked."""
        if sorted(arrays) != sorted(self.state_names):
            raise EdgeError(f"state has tensors {sorted(arrays)[:2]}..., expected {self.state_names[:2]}...")
        for name, arr in arrays.items():
            want = self._empty(name, n_past)
            if arr.shape != want.shape or arr.dtype != want.dtype:
                raise EdgeError(f"cache tensor {name} has shape {list(arr.shape)} {arr.dtype}, expected "
                                f"{list(want.shape)} {want.dtype} at {n_past} past positions")
        if n_past > self.max_seq_len:
            raise EdgeError(f"a state of {n_past} positions exceeds max_seq_len {self.max_seq_len}")
        if not self.shared_kv:
            self.state = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()}
        else:
            self._reset()
            self.n_past = 0
            if n_past > self.capacity:
                self._allocate(n_past)
            for n, arr in arrays.items():
                target = self.kv[n][:, :, :n_past] if n in self.kv else self.conv[n][0]
                target[...] = arr
        self.n_past = n_past

    def kv_cache_bytes(self) -> int:
        """Bytes of the K/V the attention layers hold at the current context (n_past positions)."""
        if not self.kv_names:
            return 0
        itemsize = np.dtype(ORT_DTYPES[self.inputs[self.kv_names[0]].type]).itemsize
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * itemsize

    # ---- one step ----------------------------------------------------------------------------
    def _forward(self, ids):
        input_ids = np.asarray([ids], dtype=np.int64)
        if self.shared_kv:
            total = self.n_past + len(ids)
            if total > self.capacity:
                self._allocate(min(max(total, 2 * self.capacity), self.max_seq_len))
            io = self.bindings[self.step % 2]
            io.bind_cpu_input("input_ids", input_ids)
            io.bind_cpu_input(ATTENTION_MASK, self.mask[:, :total])
            self._run(io)
            self.step += 1
            return self.logits[0, -1].copy()
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", input_ids)
        for name, value in self.state.items():
            io.bind_ortvalue_input(name, value)
        for name in self.output_names:
            io.bind_output(name, "cpu")
        self._run(io)
        outputs = dict(zip(self.output_names, io.get_outputs()))
        self.state = {n: outputs[present_name(n)] for n in self.state_names}
        return outputs["logits"].numpy()[0, -1].astype(np.float32, copy=False)

    def _run(self, io):
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:
            raise EdgeError(f"ONNX Runtime failed on {self.path}: {first_line(e)}") from None

    def close(self):
        self.state, self.kv, self.conv, self.bindings = {}, {}, {}, []
        self.session = None

