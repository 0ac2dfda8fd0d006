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
from edge.files import write_json
from runtime import load
from runtime.session import Session


# ---- building the peers' artifacts ---------------------------------------------------------------
def export_llama_flags(max_context: int = 512, quantize_kv: bool = False) -> list[str]:
    """export_llama's flags for our comparisons: 8da4w weights in groups of 32, its KV cache with the custom
    SDPA op (`-kv --use_sdpa_with_kv_cache`), XNNPACK. `--max_seq_length` bounds the tokens of one forward
    (a prefill chunk of at most 511), `--max_context_length` the KV cache. quantize_kv adds
    `--quantize_kv_cache`: int8 K and V per token and head, asymmetric (an fp32 scale and an int8 zero point
    per head_dim vector; its quantized SDPA op reads them)."""
    return ["-qmode", "8da4w", "-G", "32", "-kv", "--use_sdpa_with_kv_cache", *(["--quantize_kv_cache"] * quantize_kv),
            "-X", "--xnnpack-extended-ops", "--max_seq_length", str(min(512, max_context)),
            "--max_context_length", str(max_context), "-m", '{"get_bos_id": 1, "get_eos_ids": [7]}']


EXPORT_LLAMA_FLAGS = export_llama_flags()  # benchmarks.bench_executorch's peer: context 512, fp32 KV
# export_llama's --model per preset (its Lfm2 model class and weight conversion; the shapes come from -p)
EXPORT_LLAMA_MODELS = {"tiny": "lfm2_350m", "lfm2-350m": "lfm2_350m", "lfm2-700m": "lfm2_700m",
                       "lfm2-1.2b": "lfm2_1_2b"}


def export_stock_pte(model_dir: Path, out: Path, model: str = "lfm2_350m", flags: list[str] = EXPORT_LLAMA_FLAGS
                     ) -> dict:
    """The same weights through ExecuTorch's own path: `executorch.examples.models.lfm2.convert_weights`,
    then `export_llama --model MODEL` with `flags` (default EXPORT_LLAMA_FLAGS: 8da4w, fp32 KV cache and
    embedding). Returns the wall time and peak RSS of the export (logs beside `out`, named after it)."""
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
    convert = {"seconds": 0.0}
    if not ckpt.exists() or ckpt.stat().st_mtime < (model_dir / "model.safetensors").stat().st_mtime:
        convert = run_child([sys.executable, "-m", "executorch.examples.models.lfm2.convert_weights", str(model_dir),
                             str(ckpt)], work / "et_convert.log", cwd=cwd)
    result = run_child([sys.executable, "-m", "executorch.examples.models.llama.export_llama", "--model",
                        model, "-c", str(ckpt), "-p", str(params), *flags, "-o", str(work),
                        "-n", str(out)], work / f"{out.stem}.export.log", cwd=cwd)
    result["convert_seconds"] = convert["seconds"]
    return result


def build_genai(model_dir: Path, out: Path, *extra: str) -> dict:
    """onnxruntime-genai's builder: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` (its
    default block 32; pass `--extra_options block_size=128` for 128). Its KV cache is fp32 on CPU."""
    return run_child([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
                      "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache"), *extra])


GENAI_KV_SCHEME = "int8_per_channel"


def build_genai_int8kv(model_dir: Path, out: Path, baseline: Path) -> dict:
    """The builder's int8 KV cache. onnxruntime-genai 0.18's builder has one for CPU (and CUDA):
    `--extra_options kv_cache_quant_scheme=int8_per_channel kv_cache_scale_file=SCALES` (on CPU only the
    static schemes int8_per_tensor / int8_per_channel: fixed per-layer scales held as constants, so the
    cache is head_dim int8 bytes per vector). Its calibration tool (`onnxruntime_genai.models.quantization.
    kv_cache_calibration`) refuses LFM2's builder model ("unsupported required inputs: past.N.conv": it
    knows only past_key_values.* state), so calibrate_genai_kv computes the scales the same way from the
    fp32-KV `baseline` (build_genai's model). Scales change fidelity, not speed."""
    scales = out.parent / f"{out.name}-scales.json"
    calibrate_genai_kv(baseline, scales)
    return build_genai(model_dir, out, "--extra_options", f"kv_cache_quant_scheme={GENAI_KV_SCHEME}",
                       f"kv_cache_scale_file={scales}")


def calibrate_genai_kv(baseline: Path, out: Path, n_seqs: int = 4, seq_len: int = 512) -> None:
    """Per-channel int8 scales (threshold / 128, the calibration tool's convention) for every attention
    layer of a builder model: the abs-max of V, and of K's RoPE pair norm ||(k_d, k_d+h/2)||, which bounds
    K at every position (the tool's `k_rotary_envelope`), over n_seqs prefills of random ids."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(baseline / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {m.name: m for m in sess.get_inputs()}
    layers = sorted(int(n.split(".")[1]) for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    genai_model = json.loads((baseline / "genai_config.json").read_text())["model"]
    kv_heads, head_dim = genai_model["decoder"]["num_key_value_heads"], genai_model["decoder"]["head_size"]
    vocab = genai_model["vocab_size"]
    names = [f"present.{i}.{side}" for side in ("key", "value") for i in layers]
    amax = np.zeros((len(names), kv_heads, head_dim), np.float32)
    rng = np.random.default_rng(0)
    for _ in range(n_seqs):
        feeds = {"input_ids": rng.integers(0, vocab, (1, seq_len)), "attention_mask": np.ones((1, seq_len), np.int64)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(seq_len)[None]
        for name, meta in inputs.items():
            if name.startswith("past"):  # empty K/V, zero conv state: the start of a sequence
                shape = ((1, kv_heads, 0, head_dim) if name.startswith("past_key_values")
                         else [d if isinstance(d, int) else 1 for d in meta.shape])
                feeds[name] = np.zeros(shape, np.float32)
        for j, x in enumerate(sess.run(names, feeds)):  # (1, kv_heads, T, head_dim)
            x = np.abs(x[0])
            if j < len(layers):  # K: both channels of a RoPE pair take the pair's norm
                half = head_dim // 2
                norm = np.hypot(x[..., :half], x[..., half:])
                x = np.concatenate([norm, norm], axis=-1)
            amax[j] = np.maximum(amax[j], x.max(axis=1))
    scales = np.maximum(amax, 1e-6).reshape(len(names), -1) / 128.0
    write_json(out, {"scales": {"k_scales": scales[:len(layers)].tolist(), "v_scales": scales[len(layers):].tolist()},
                     "qmax": 128.0, "layer_ids": layers})


# ---- the peers -------------------------------------------------------------------------------------
class RawLlama:
    """A llama.cpp context driven by the plain C API; n_threads None keeps the C API's default."""

    def __init__(self, path: Path, n_ctx: int, n_batch: int, n_threads: int | None, kv_type: int | None = None):
        import llama_cpp
        self.ll = llama_cpp
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        if kv_type is not None and kv_type != cparams.type_k:  # a quantized V cache needs flash attention on
            cparams.type_k = cparams.type_v = kv_type
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
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
    """llama.cpp's C API on a GGUF, with the context parameters of our session; no logits copied out.

    kv_cache "f16" (the C API's default: type_k = type_v = GGML_TYPE_F16, flash attention on auto) or a
    quantized type ("q8_0": blocks of 32 values in 34 bytes), which sets llama_context_params.type_k and
    type_v and turns flash_attn_type on (llama.cpp stores a quantized V cache only with flash attention)."""
    engine = "llama.cpp (C API)"

    def __init__(self, path: Path, n_threads: int | None, max_seq_len: int, kv_cache: str = "f16"):
        from edge.formats.gguf import KV_TYPES
        # its config, quant and batch size; the cache type checked against head_dim as ours checks it
        ours = load(path, n_threads=1, max_seq_len=max_seq_len, kv_cache=kv_cache)
        self.kv_type = KV_TYPES[kv_cache]
        self.raw = RawLlama(path, ours.max_seq_len, ours.n_batch, n_threads, int(self.kv_type))
        self.n_batch = ours.n_batch
        super().__init__(ours.config, None, ours.max_seq_len, self.raw.n_threads, quant=ours.quant,
                         kv_cache=kv_cache, path=str(path))
        ours.close()

    def _forward(self, ids):
        for start in range(0, len(ids), self.n_batch):  # llama_batch_get_one: at most n_batch per call
            self.raw.eval(ids[start:start + self.n_batch])
        return np.zeros(0, np.float32)

    def _reset(self):
        self.raw.reset()

    def kv_cache_bytes(self):
        import gguf
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.kv_type]
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * block_bytes // block

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
    the same `runtime.executorch.execute` as ours, so the harness settings apply to both alike.

    kv_cache: how it was exported (the program does not say): "fp32", or "int8" for `--quantize_kv_cache`
    (export_llama's QuantizedKVCache, affine asymmetric per token and head: head_dim int8 values, an fp32
    scale and an int8 zero point per vector)."""
    engine = "executorch (export_llama)"
    KV_VECTOR_BYTES = {"fp32": lambda head_dim: 4 * head_dim, "int8": lambda head_dim: head_dim + 4 + 1}

    def __init__(self, path: Path, config: HybridConfig, n_threads: int | None, kv_cache: str = "fp32"):
        from runtime import executorch as et
        threads = et.set_threads(n_threads)
        program = et._runtime().load_program(path)
        self.chunk = program.load_method("get_max_seq_len").execute([])[0] - 1  # its dynamic-T bound
        max_ctx = program.load_method("get_max_context_len").execute([])[0]
        self.forward = program.load_method("forward")
        self.et = et
        super().__init__(config, None, max_ctx, threads, quant="8da4w", kv_cache=kv_cache, path=str(path))

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
        return self.config.kv_vectors(self.n_past) * self.KV_VECTOR_BYTES[self.kv_cache](self.config.head_dim)


class GenaiSession(Session):
    """onnxruntime-genai's Generator over its builder's model. It cannot rewind: a new Generator per reset.

    loop "append": every token through `append_tokens` (pre-drawn ids, as runtime.bench feeds every
    engine) and its logits read back; "generate": decode through `generate_next_token`, its own greedy
    loop (the ids runtime.bench hands it are ignored: timing only). threads None: ORT's default pool.
    share_buffer: genai's `past_present_share_buffer` search option: one K/V buffer of max_length bound as
    both past and present, which GroupQueryAttention appends to in place (how our ONNX session runs), rather
    than the builder's CPU default (false: each step's present is a new buffer the past is copied into).
    max_length: max_seq_len, at most the builder's context_length (the checkpoint's max_position_embeddings).
    kv_cache is read from the graph's past_key_values inputs: fp32, or int8 from build_genai_int8kv."""
    engine = "onnxruntime-genai"
    _models: dict = {}  # (path, threads) -> og.Model, shared by the loop variants

    def __init__(self, path: Path, model_dir: Path, n_threads: int | None, max_seq_len: int, loop: str = "append",
                 share_buffer: bool = False):
        import onnxruntime_genai as og
        self.og, self.loop, self.share_buffer = og, loop, share_buffer
        key = (str(path), n_threads)
        if key not in self._models:
            config = og.Config(str(path))
            config.clear_providers()
            if n_threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": n_threads, "inter_op_num_threads": 1}}}}))
            self._models[key] = og.Model(config)
        self.model = self._models[key]
        genai_config = json.loads((Path(path) / "genai_config.json").read_text())["model"]
        self.kv_itemsize, kv_cache = genai_kv_type(Path(path) / genai_config["decoder"]["filename"])
        super().__init__(HybridConfig.load(model_dir), None, min(max_seq_len, genai_config["context_length"]),
                         n_threads, quant="int4", kv_cache=kv_cache, path=str(path))
        self._reset()

    def _forward(self, ids):
        if self.loop == "generate" and self.n_past and len(ids) == 1:
            if self.unsampled:  # right after append_tokens, generate_next_token only samples those logits
                self.gen.generate_next_token()  # (no model run), so sample them first: one run per decode
                self.unsampled = False
            self.gen.generate_next_token()
        else:
            self.gen.append_tokens(ids)
            self.unsampled = True
            if self.loop == "append":  # the logits of the last token, read back as every engine's are
                return np.asarray(self.gen.get_logits(), np.float32).reshape(-1)[-self.vocab_size:]
        return np.zeros(0, np.float32)

    def _reset(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_seq_len, batch_size=1, do_sample=False,
                                  past_present_share_buffer=self.share_buffer)
        self.gen = self.og.Generator(self.model, params)
        self.unsampled = False

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * self.kv_itemsize

    def close(self):
        self.gen = None
        self._models.pop((self.path, self.n_threads), None)


def genai_kv_type(model: Path) -> tuple[int, str]:
    """(bytes per value, name) of a builder model's KV cache, from its past_key_values inputs."""
    import onnx
    graph = onnx.load(str(model), load_external_data=False).graph
    elem = next(i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_key_values."))
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    return dtype.itemsize, {"float32": "fp32", "float16": "fp16"}.get(dtype.name, dtype.name)


class TransformersSession(Session):
    """Hugging Face transformers' Lfm2ForCausalLM in fp32 with its own hybrid cache. One model per
    checkpoint serves every variant (at 1.2B a second fp32 copy is 4.7 GB): the attention implementation
    is switched to this session's (eager or sdpa) and torch's pool set to n_threads (None: torch's
    default) for each forward, the pool restored after, so other sessions keep theirs."""
    engine = "transformers"
    _models: dict = {}  # dir -> [model, number of open sessions]

    def __init__(self, model_dir: Path, n_threads: int | None, max_seq_len: int, attention: str = "eager"):
        import torch
        from transformers import Lfm2ForCausalLM

        self.torch, self.attention, self.key = torch, attention, str(model_dir)
        if self.key not in self._models:
            self._models[self.key] = [Lfm2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                                      attn_implementation=attention).eval(), 0]
        self._models[self.key][1] += 1
        self.model = self._models[self.key][0]
        self.cache = None
        super().__init__(HybridConfig.load(model_dir), None, max_seq_len, n_threads or torch.get_num_threads(),
                         quant="fp32", kv_cache="fp32", path=str(model_dir))

    def _forward(self, ids):
        torch = self.torch
        if self.model.config._attn_implementation != self.attention:
            self.model.set_attn_implementation(self.attention)
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
        entry = self._models.get(self.key)
        if entry:
            entry[1] -= 1
            if not entry[1]:
                del self._models[self.key]


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
