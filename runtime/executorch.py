"""ExecuTorch backend: runs a .pte written by `edge export executorch` with `executorch.runtime`.

The sequence state (K/V, conv state) lives in the loaded `forward` method's mutable buffers, which
ExecuTorch allocates once at max_seq_len. A forward at input_pos 0 zeroes the conv state inside the
graph and the attention kernels never read K/V past the current position, so `reset()` costs nothing:
it only rewinds n_past. Prompts longer than the exported prefill chunk are run chunk by chunk.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from edge.config import HybridConfig
from edge.errors import EdgeError, first_line
from edge.formats import FORMATS
from edge.headers import HeaderError, check_pte
from edge.formats.executorch import KV_ELEMENT_BYTES, META_TYPES, load_custom_ops
from edge.tokenizer import load_tokenizer

from .session import Session


def _runtime():
    """The ExecuTorch runtime with the llama:: and quantized_decomposed:: kernels registered."""
    from executorch.runtime import Runtime

    load_custom_ops()
    return Runtime.get()


_pool_in_use = False  # set once a method is loaded: from then on the pool must not be resized


def set_threads(n_threads: int | None) -> int:
    """Size the threadpool XNNPACK and the custom kernels share (process-wide); returns its size.

    XNNPACK binds the pool when a method is loaded, and resizing it under a loaded method crashes the
    process (glibc `__pthread_tpp_change_priority` assertion), so after the first session the size is
    fixed: a later different request is refused with a warning, never applied."""
    from executorch.extension.pybindings import portable_lib
    current = portable_lib._threadpool_get_thread_count()
    if n_threads and int(n_threads) != current:
        if _pool_in_use:
            warnings.warn(f"ExecuTorch's threadpool already runs {current} threads in this process and cannot "
                          f"be resized safely; ignoring n_threads={n_threads}", stacklevel=3)
        else:
            portable_lib._unsafe_reset_threadpool(int(n_threads))
    return portable_lib._threadpool_get_thread_count()


def execute(method, inputs: list):
    """`method.execute(inputs)` with torch's own (OpenMP) pool held at one thread.

    The pybindings hand each output back as a torch clone, and torch copies a [1, 65536] logits row in
    parallel: its OpenMP workers then busy-wait for more work while XNNPACK's threads run the next step,
    and on a 2-core machine they take a core from it (perf: 27% of a decode loop's samples spinning in
    libgomp; lfm2-350m decode 27-31% faster with the pool held at one thread). The previous size is
    restored after the call, so torch code elsewhere in the process keeps its threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return method.execute(inputs)
    finally:
        torch.set_num_threads(previous)


def _constant(program, name: str, default):
    """A constant method's value (e.g. get_max_context_len, which sizes the K/V buffers), or default."""
    return program.load_method(name).execute([])[0] if name in program.method_names else default


ET_LOG = re.compile(r"\[[\w.]+:\d+\] |[DIWEF] \d\d:\d\d:\d\d\.\d+ executorch:")  # its two log formats


@contextlib.contextmanager
def native_log():
    """Capture what is written to the process's stderr (fd 2) inside the block: ExecuTorch's C++ log lines
    (the cpuinfo probe of the first load, the loader's reason for refusing a program) are kept in the
    yielded list, never printed; anything else written meanwhile is passed on to stderr."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            for line in f.read().decode("utf-8", errors="replace").splitlines():
                lines.append(line) if ET_LOG.match(line) else print(line, file=sys.stderr)


def _text(method) -> str:
    return bytes(method.execute([])[0].numpy().tobytes()).decode("utf-8")


class ExecuTorchSession(Session):
    format = FORMATS["executorch"]  # KV cache fixed at export: the program's buffers
    engine = format.engine

    def __init__(self, path, n_threads: int | None = None, kv_cache: str | None = None,
                 max_seq_len: int | None = None):
        path = Path(path)
        try:
            check_pte(path)
        except HeaderError as e:
            raise EdgeError(f"cannot load {path}: {e}; re-export it with `edge export executorch`") from None
        runtime = _runtime()
        # before any method is loaded: XNNPACK binds the pool at method init, and resizing it under a
        # loaded method crashes the process (glibc __pthread_tpp_change_priority assertion)
        with native_log() as log:  # ExecuTorch's C++ log lines would print above our one-line error
            threads = set_threads(n_threads)
            try:
                meta, tokenizer = self._open(runtime, path)
                error = None
            except EdgeError:
                raise
            except Exception as e:  # noqa: BLE001 - the pybindings raise RuntimeError, KeyError, ...
                error = e
        if error is not None:  # ExecuTorch's reason is its first log line; the exception only says "failed"
            reason = next((line for line in log if "cpuinfo" not in line), first_line(error))
            raise EdgeError(f"cannot load {path} in ExecuTorch ({reason}); the file is corrupt or not written "
                            "by `edge export executorch`, re-export it")
        self._fixed_at_export(path, "kv_cache", kv_cache, meta["kv_cache"])
        if max_seq_len and max_seq_len > meta["max_seq_len"]:
            raise EdgeError(f"max_seq_len {max_seq_len} exceeds the {meta['max_seq_len']} {path} was exported for; "
                            "re-export with a larger --max-seq-len")
        config = HybridConfig.from_dict(meta["config"])
        super().__init__(config, tokenizer, max_seq_len or meta["max_seq_len"], threads,
                         quant=meta["quant"], kv_cache=meta["kv_cache"], path=str(path))
        self.metadata = meta
        self.chat_template = meta.get("chat_template")
        self.prefill_chunk = meta["prefill_chunk"]

    def _open(self, runtime, path: Path):
        """Load the program and its methods; returns (metadata, tokenizer). Sets self.program/forward."""
        self.program = runtime.load_program(path)
        if "edge_metadata" not in self.program.method_names:
            raise EdgeError(f"{path} was not written by `edge export executorch` (no edge_metadata method); "
                            "re-export it")
        meta = json.loads(_text(self.program.load_method("edge_metadata")))
        bad = next((k for k, kind in META_TYPES.items() if not isinstance(meta.get(k), kind)
                    or (kind is int and meta[k] < 1)), None) if isinstance(meta, dict) else "edge_metadata"
        if bad:
            raise EdgeError(f"{path}: edge_metadata has no valid {bad!r}; the file is corrupt, re-export it")
        if meta["max_seq_len"] != _constant(self.program, "get_max_context_len", meta["max_seq_len"]):
            raise EdgeError(f"{path}: edge_metadata's max_seq_len {meta['max_seq_len']} differs from the program's "
                            "get_max_context_len; the file is corrupt, re-export it")
        tokenizer = load_tokenizer(_text(self.program.load_method("edge_tokenizer_json")))
        self.op_library = None  # the absolute path of our op library when the program needs it
        if meta.get("custom_kernels"):
            from .et_kernels import load_kernels
            self.op_library = str(load_kernels())  # prebuilt at install; one-line error if missing
        global _pool_in_use
        _pool_in_use = True
        self.forward = self.program.load_method("forward")
        return meta, tokenizer

    def _forward(self, ids):
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk]
            tokens = torch.tensor([chunk], dtype=torch.long)
            pos = torch.tensor([self.n_past + start], dtype=torch.long)
            try:
                logits = execute(self.forward, [tokens, pos])[0]
            except Exception as e:
                raise EdgeError(f"ExecuTorch forward failed at position {self.n_past + start}: "
                                f"{str(e).splitlines()[0]}") from None
        return logits.reshape(-1).numpy().astype(np.float32, copy=False)

    def _reset(self):
        pass  # the next forward starts at input_pos 0, which starts a fresh sequence inside the graph

    def _kv_bytes(self, positions: int) -> int:
        vectors = self.config.kv_vectors(positions)
        scale_bytes = 4 if self.kv_cache != "fp32" else 0  # int8: one fp32 scale per (position, kv head)
        return vectors * (self.config.head_dim * KV_ELEMENT_BYTES[self.kv_cache] + scale_bytes)

    def kv_cache_bytes(self) -> int:
        """K/V (+ int8 scales) of the positions in use; the buffers themselves are allocated at max_seq_len."""
        return self._kv_bytes(self.n_past)

    def kv_cache_allocated_bytes(self) -> int:
        """What the program's K/V buffers occupy: preallocated for max_seq_len positions."""
        return self._kv_bytes(self.metadata["max_seq_len"])
