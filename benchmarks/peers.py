"""Peer engines as Sessions, and the harness settings each one (and ours) is tried under.

Every peer is a `runtime.session.Session`, so `runtime.bench` times it exactly as it times ours, in the
same interleaved rotation. A peer's numbers are not its program's alone: the harness around `execute`
matters (issue 15: ExecuTorch's own export decoded 2x faster with its threadpool sized to the thread
count than with torch's pool held at one thread around each call). So benchmarks.compare lists, for ours
and for each peer, the plausible settings of its harness (one `Candidate` each) and reports each system
at its best.

Peers:
- `RawLlamaSession`: llama.cpp through its plain C API (llama_batch_get_one + llama_decode +
  llama_synchronize, as llama-bench does), llama-cpp-python's low-level bindings, no Session code of ours.
- `StockPteSession`: ExecuTorch's own `export_llama` .pte, run by `executorch.runtime`.
- `GenaiSession`: onnxruntime-genai's builder model through its own Generator.
- `TransformersSession`: Hugging Face transformers' Lfm2ForCausalLM in fp32 with its own hybrid cache.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.common import run_child
from edge.config import HybridConfig
from runtime import load
from runtime.session import Session


# ---- building the peers' artifacts ---------------------------------------------------------------
EXPORT_LLAMA_FLAGS = ["-qmode", "8da4w", "-G", "32", "-kv", "--use_sdpa_with_kv_cache", "-X",
                      "--xnnpack-extended-ops", "--max_seq_length", "512", "--max_context_length", "512",
                      "-m", '{"get_bos_id": 1, "get_eos_ids": [7]}']


def export_stock_pte(model_dir: Path, out: Path) -> dict:
    """The same weights through ExecuTorch's own path: `executorch.examples.models.lfm2.convert_weights`,
    then `export_llama --model lfm2_350m` with EXPORT_LLAMA_FLAGS (8da4w, fp32 KV cache and embedding).
    Returns the wall time and peak RSS of the export (logs beside `out`)."""
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    config = HybridConfig.load(model_dir)
    params = work / "et_params.json"
    params.write_text(json.dumps({
        "dim": config.hidden_size, "ffn_dim_multiplier": 1, "hidden_dim": config.ffn_dim,
        "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
        "n_layers": config.num_hidden_layers, "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "use_scaled_rope": False, "vocab_size": config.vocab_size, "use_hf_rope": True, "use_qk_norm": True,
        "qk_norm_before_rope": True, "layer_types": config.layer_types}))
    ckpt = work / "et_weights.pth"
    # not run inside `work`: export_llama's model factory drops its "executorch." import prefix when the
    # working directory's name ends with "executorch" (benchmarks/work/executorch does)
    cwd = work.parent
    convert = run_child([sys.executable, "-m", "executorch.examples.models.lfm2.convert_weights", str(model_dir),
                         str(ckpt)], work / "et_convert.log", cwd=cwd)
    result = run_child([sys.executable, "-m", "executorch.examples.models.llama.export_llama", "--model",
                        "lfm2_350m", "-c", str(ckpt), "-p", str(params), *EXPORT_LLAMA_FLAGS, "-o", str(work),
                        "-n", out.name], work / "et_export.log", cwd=cwd)
    result["convert_seconds"] = convert["seconds"]
    return result


def build_genai(model_dir: Path, out: Path, *extra: str) -> dict:
    """onnxruntime-genai's builder: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` (its
    default block 32; pass `--extra_options block_size=128` for 128)."""
    return run_child([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
                      "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache"), *extra])


# ---- the peers -------------------------------------------------------------------------------------
class RawLlama:
    """A llama.cpp context driven by the plain C API; n_threads None keeps the C API's default."""

    def __init__(self, path: Path, n_ctx: int, n_batch: int, n_threads: int | None):
        import llama_cpp
        self.ll = llama_cpp
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        self.n_threads = cparams.n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def reset(self):
        self.ll.llama_memory_clear(self.memory, True)

    def eval(self, ids):
        tokens = (self.ll.llama_token * len(ids))(*ids)
        assert self.ll.llama_decode(self.ctx, self.ll.llama_batch_get_one(tokens, len(ids))) == 0
        self.ll.llama_synchronize(self.ctx)

    def close(self):
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def default_c_api_threads() -> int:
    import llama_cpp
    return llama_cpp.llama_context_default_params().n_threads


class RawLlamaSession(Session):
    """llama.cpp's C API on a GGUF, with the context parameters of our session; no logits copied out."""
    engine = "llama.cpp (C API)"

    def __init__(self, path: Path, n_threads: int | None, max_seq_len: int):
        ours = load(path, n_threads=1, max_seq_len=max_seq_len)  # its config, quant and batch size
        self.raw = RawLlama(path, ours.max_seq_len, ours.n_batch, n_threads)
        self.n_batch = ours.n_batch
        super().__init__(ours.config, None, ours.max_seq_len, self.raw.n_threads, quant=ours.quant,
                         kv_cache="f16", path=str(path))  # the C API's default cache type
        ours.close()

    def _forward(self, ids):
        for start in range(0, len(ids), self.n_batch):  # llama_batch_get_one: at most n_batch per call
            self.raw.eval(ids[start:start + self.n_batch])
        return np.zeros(0, np.float32)

    def _reset(self):
        self.raw.reset()

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * 2  # f16

    def close(self):
        self.raw.close()


@contextlib.contextmanager
def torch_thread_hold(on: bool):
    """runtime.executorch.execute holds torch's OpenMP pool at one thread around each `execute` (see its
    docstring); off: the bare `method.execute`, torch's pool at its size. Swapped for the block only."""
    import runtime.executorch as et
    if on:
        yield
        return
    held = et.execute
    et.execute = lambda method, inputs: method.execute(inputs)
    try:
        yield
    finally:
        et.execute = held


class StockPteSession(Session):
    """export_llama's .pte (forward(tokens, input_pos) -> last logits) run by executorch.runtime through
    the same `runtime.executorch.execute` as ours, so the harness settings apply to both alike."""
    engine = "executorch (export_llama)"

    def __init__(self, path: Path, config: HybridConfig, n_threads: int | None):
        from runtime import executorch as et
        threads = et.set_threads(n_threads)
        program = et._runtime().load_program(path)
        self.chunk = program.load_method("get_max_seq_len").execute([])[0] - 1  # its dynamic-T bound
        max_ctx = program.load_method("get_max_context_len").execute([])[0]
        self.forward = program.load_method("forward")
        self.et = et
        super().__init__(config, None, max_ctx, threads, quant="8da4w", kv_cache="fp32", path=str(path))

    def _forward(self, ids):
        import torch
        for start in range(0, len(ids), self.chunk):
            tokens = torch.tensor([ids[start:start + self.chunk]], dtype=torch.long)
            pos = torch.tensor([self.n_past + start], dtype=torch.long)
            logits = self.et.execute(self.forward, [tokens, pos])[0]
        return logits.reshape(-1).numpy()

    def _reset(self):
        pass  # its attention reads positions < start_pos + T only; its conv state is not cleared (timing only)

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * 4


class GenaiSession(Session):
    """onnxruntime-genai's Generator over its builder's model. It cannot rewind: a new Generator per reset.

    loop "append": every token through `append_tokens` (pre-drawn ids, as runtime.bench feeds every
    engine) and its logits read back; "generate": decode through `generate_next_token`, its own greedy
    loop (the ids runtime.bench hands it are ignored: timing only). threads None: ORT's default pool."""
    engine = "onnxruntime-genai"
    _models: dict = {}  # (path, threads) -> og.Model, shared by the loop variants

    def __init__(self, path: Path, model_dir: Path, n_threads: int | None, max_seq_len: int, loop: str = "append"):
        import onnxruntime_genai as og
        self.og, self.loop = og, loop
        key = (str(path), n_threads)
        if key not in self._models:
            config = og.Config(str(path))
            config.clear_providers()
            if n_threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": n_threads, "inter_op_num_threads": 1}}}}))
            self._models[key] = og.Model(config)
        self.model = self._models[key]
        super().__init__(HybridConfig.load(model_dir), None, max_seq_len, n_threads, quant="int4", kv_cache="fp32",
                         path=str(path))
        self._reset()

    def _forward(self, ids):
        if self.loop == "generate" and self.n_past and len(ids) == 1:
            self.gen.generate_next_token()
        else:
            self.gen.append_tokens(ids)
            if self.loop == "append":
                self.gen.get_logits()
        return np.zeros(0, np.float32)

    def _reset(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_seq_len, batch_size=1, do_sample=False)
        self.gen = self.og.Generator(self.model, params)

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * 4

    def close(self):
        self.gen = None
        self._models.pop((self.path, self.n_threads), None)


class TransformersSession(Session):
    """Hugging Face transformers' Lfm2ForCausalLM in fp32 with its own hybrid cache; torch's pool is set to
    n_threads (None: torch's default) for each forward and restored after, so other sessions keep theirs."""
    engine = "transformers"
    _models: dict = {}  # (dir, attention) -> model, shared by the thread variants

    def __init__(self, model_dir: Path, n_threads: int | None, max_seq_len: int, attention: str = "eager"):
        import torch
        from transformers import Lfm2ForCausalLM

        self.torch = torch
        key = (str(model_dir), attention)
        if key not in self._models:
            self._models[key] = Lfm2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                                attn_implementation=attention).eval()
        self.model = self._models[key]
        self.cache = None
        self.key = key
        super().__init__(HybridConfig.load(model_dir), None, max_seq_len, n_threads or torch.get_num_threads(),
                         quant="fp32", kv_cache="fp32", path=str(model_dir))

    def _forward(self, ids):
        torch = self.torch
        previous = torch.get_num_threads()
        torch.set_num_threads(self.n_threads)
        try:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([ids]), cache=self.cache, use_cache=True,
                                 logits_to_keep=1)
        finally:
            torch.set_num_threads(previous)
        self.cache = out.cache
        return out.logits[0, -1].numpy()

    def _reset(self):
        self.cache = None

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * 4

    def close(self):
        self.cache = None
        self._models.pop(self.key, None)


class Harnessed(Session):
    """Another session run under a harness context (e.g. `torch_thread_hold(False)`) around each forward;
    everything else is the inner session's."""

    def __init__(self, inner: Session, context: Callable[[], contextlib.AbstractContextManager]):
        self.inner, self.context = inner, context
        self.engine = inner.engine
        super().__init__(inner.config, inner.tokenizer, inner.max_seq_len, inner.n_threads, quant=inner.quant,
                         kv_cache=inner.kv_cache, path=inner.path)

    def _forward(self, ids):
        with self.context():
            self.inner.n_past = self.n_past
            return self.inner._forward(ids)

    def _reset(self):
        self.inner.reset()

    def kv_cache_bytes(self):
        self.inner.n_past = self.n_past
        return self.inner.kv_cache_bytes()

    def close(self):
        self.inner.close()


# ---- the harness search ----------------------------------------------------------------------------
@dataclass
class Candidate:
    """One system (ours or a peer, on one artifact) under one harness setting."""
    system: str                  # e.g. "ours: executorch 8da4w-int8kv.pte", "peer: llama.cpp C API q4_0"
    harness: dict                # the setting, e.g. {"threads": 2, "torch hold": "on"}
    open: Callable[[], Session] = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.system} [{harness_text(self.harness)}]"

    @property
    def ours(self) -> bool:
        return self.system.startswith("ours:")


def harness_text(harness: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in harness.items())


def thread_settings(threads: int, default: int | None) -> list:
    """-t, and the engine's own default where that differs (None: a default this process cannot resolve)."""
    return [threads] if default == threads else [threads, None]


def threads_label(n: int | None, default: int | None) -> str:
    return f"{n}" if n else (f"default ({default})" if default else "default")
