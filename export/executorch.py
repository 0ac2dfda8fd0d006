"""ExecuTorch exporter: a Hugging Face LFM2 checkpoint -> one self-sufficient .pte lowered to XNNPACK.

The reference `HybridLM` is exported unchanged; only its cache object differs. `BufferCache` keeps the
sequence state inside the program as mutable buffers, which ExecuTorch memory-plans once and keeps
between `execute()` calls of a loaded method:
  - per attention layer K and V in ExecuTorch's llama layout [1, max_seq_len, n_kv_heads, head_dim]
    (grouped, never expanded): fp32 written with `llama::update_cache` and read by `llama::custom_sdpa`;
    int8 (int8 values plus one fp32 scale per (position, kv head), symmetric) written by our
    `edge::int8_update_cache` and read by our `edge::int8_sdpa` (runtime/et_kernels.py says why
    ExecuTorch's own int8 kernel is not used by default; `int8-stock` uses it, `llama::update_cache` +
    `llama::custom_quantized_sdpa`, for runners without our op library);
  - per conv layer the last conv_L_cache-1 columns of B*x, [1, hidden, L_cache-1].
Both custom kernels attend only to positions < start_pos+T, so stale K/V of an earlier sequence are
never read; the conv state is zeroed inside the graph whenever input_pos is 0. A new sequence therefore
needs no reset call at all: starting again at position 0 is the reset.

The program has one `forward(tokens[1, T], input_pos[1]) -> logits[1, vocab]` (last position only)
with T dynamic in 1..prefill_chunk, plus constant methods: the ones ExecuTorch's LLM runner reads
(get_max_seq_len, get_vocab_size, get_bos_id, get_eos_ids, use_kv_cache, ...) and ours —
`edge_metadata` (uint8 tensor of JSON: HybridConfig, quant, KV format, ...) and `edge_tokenizer_json`
(uint8 tensor of the tokenizer.json text) — so the .pte alone is everything `runtime.load` needs.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edge.checkpoint import load_model
from edge.errors import EdgeError
from edge.model import RMSNorm
from edge.files import atomic_path
from edge.chat import read_chat_template
from edge.tokenizer import tokenizer_json
from edge.formats.executorch import (EMBEDDING_QUANTS, FORMAT, METADATA_VERSION, OP_LIBRARY, load_custom_ops,
                                     quantize_symmetric)

# KV caches (edge/formats/__init__.py): int8 is our kernels (edge/formats/executorch.py), which need our op
# library in the runner; int8-stock is the same int8 cache written with llama::update_cache and read by
# llama::custom_quantized_sdpa, ExecuTorch's stock ops, for runners that cannot link our library (prebuilt
# ExecuTorch packages), slower on x86 (benchmarks/RESULTS.md)
# 8da4w's group: 32, what the XNNPACK docs recommend. With hqq scales, groups of 64 also stay within
# docs/design.md §5's 4-bit bound (absmax rounding needs 32) for 4% fewer bytes per token at lfm2-350m, but
# fall below export_llama's fidelity on LFM2-350M's shapes (benchmarks/RESULTS.md, issue 27): an option
DEFAULT_GROUP_SIZE = 32
DEFAULT_PREFILL_CHUNK = 128


# ---- the cache: mutable buffers -------------------------------------------------------------------
class BufferCache(nn.Module):
    """HybridLM's cache interface (see edge/model.py) over buffers that live inside the .pte."""

    def __init__(self, config, max_seq_len: int, kv_cache: str, attention: str = "custom"):
        super().__init__()
        self.config, self.max_seq_len, self.kv_cache = config, max_seq_len, kv_cache
        # "custom": llama::custom_sdpa (fp32) / our edge::int8_sdpa (int8); "llama": llama::custom_quantized_sdpa
        # (int8; the CLI's --kv-cache int8-stock).
        self.attention = attention
        kv_shape = (1, max_seq_len, config.num_key_value_heads, config.head_dim)
        for i in config.attention_layers:
            dtype = torch.int8 if kv_cache == "int8" else torch.float32
            self.register_buffer(f"k_{i}", torch.zeros(kv_shape, dtype=dtype))
            self.register_buffer(f"v_{i}", torch.zeros(kv_shape, dtype=dtype))
            if kv_cache == "int8":
                self.register_buffer(f"k_scales_{i}", torch.zeros(kv_shape[:3] + (1,)))
                self.register_buffer(f"v_scales_{i}", torch.zeros(kv_shape[:3] + (1,)))
        if kv_cache == "int8" and attention == "llama":  # a constant: symmetric quantization has zero points 0
            self.register_buffer("kv_zero_points", torch.zeros(kv_shape[:3] + (1,), dtype=torch.int8))
        for i in config.conv_layers:
            self.register_buffer(f"conv_{i}", torch.zeros(1, config.hidden_size, config.conv_L_cache - 1))
        self.keep_conv_state = None  # set per call: 0.0 at input_pos 0 (a new sequence), else 1.0

    def attend(self, layer, q, k, v, start_pos):
        # the llama kernels take [B, T, heads, head_dim]; GQA is native in them (no repeat of K/V)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k_cache, v_cache = getattr(self, f"k_{layer}"), getattr(self, f"v_{layer}")
        if self.kv_cache == "fp32":
            torch.ops.llama.update_cache(k, k_cache, start_pos)
            torch.ops.llama.update_cache(v, v_cache, start_pos)
            y = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start_pos, None, 0, True)
        else:
            k_scales, v_scales = getattr(self, f"k_scales_{layer}"), getattr(self, f"v_scales_{layer}")
            if self.attention == "llama":  # ExecuTorch's stock ops only: runs in any prebuilt runner
                (kq, ks), (vq, vs) = quantize_symmetric(k), quantize_symmetric(v)
                torch.ops.llama.update_cache(kq, k_cache, start_pos)
                torch.ops.llama.update_cache(ks, k_scales, start_pos)
                torch.ops.llama.update_cache(vq, v_cache, start_pos)
                torch.ops.llama.update_cache(vs, v_scales, start_pos)
                qq, qs = quantize_symmetric(q)
                zp = self.kv_zero_points
                y = torch.ops.llama.custom_quantized_sdpa(
                    qq, k_cache, v_cache, start_pos, None, 0, True, None,
                    torch.zeros_like(qs, dtype=torch.int8), qs, zp, k_scales, zp, v_scales)
            else:  # ours: quantize + store in one op per tensor, then attend over the int8 cache
                torch.ops.edge.int8_update_cache(k, k_cache, k_scales, start_pos)
                torch.ops.edge.int8_update_cache(v, v_cache, v_scales, start_pos)
                y = torch.ops.edge.int8_sdpa(q, k_cache, v_cache, k_scales, v_scales, start_pos)
        return y.transpose(1, 2)

    def conv_window(self, layer, bx):
        state = getattr(self, f"conv_{layer}")
        window = torch.cat([state * self.keep_conv_state, bx], dim=-1)
        state.copy_(window[..., -(self.config.conv_L_cache - 1):])
        return window


class ExportedLM(nn.Module):
    """forward(tokens[1, T], input_pos[1]) -> logits [1, vocab] of the last position."""

    def __init__(self, model, cache: BufferCache):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, tokens, input_pos):
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + tokens.shape[1] <= self.cache.max_seq_len)
        self.cache.keep_conv_state = (input_pos > 0).to(torch.float32)
        logits = self.model(tokens, start_pos, self.cache, last_logits_only=True)
        return logits[:, -1]


class MatmulRMSNorm(nn.Module):
    """RMSNorm with the mean of squares as a matmul: XNNPACK has no last-dim mean, so the plain norm
    splits the delegated graph at every layer (34 -> 19 partitions on the tiny model). Same math."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        dim = norm.weight.shape[0]
        self.register_buffer("mean_weight", torch.full((1, dim), 1.0 / dim))

    def forward(self, x):
        mean_square = F.linear(x * x, self.mean_weight)
        return self.weight * (x * torch.rsqrt(mean_square + self.eps))


def use_matmul_rms_norm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, RMSNorm):
            setattr(module, name, MatmulRMSNorm(child))
        else:
            use_matmul_rms_norm(child)


# ---- weight quantization --------------------------------------------------------------------------
class QuantizedEmbedding(nn.Module):
    """Embedding table in int8 (one scale per row) or int4 (one scale per group of 32 columns, two
    values per byte), read by ExecuTorch's quantized_decomposed::embedding_byte / embedding_4bit."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int = 32, method: str = "rtn"):
        super().__init__()
        self.bits = bits
        vocab, dim = weight.shape
        groups = 1 if bits == 8 else dim // group_size
        qmax = 127 if bits == 8 else 7
        if method == "hqq":  # torchao's scale search, as for the linears (quantize_linears)
            from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

            q, scales = _choose_qparams_and_quantize_scale_only_hqq(weight.detach().float(), [1, dim // groups],
                                                                    -qmax - 1, qmax)
            q, scales = q.to(torch.int8), scales.float().reshape(vocab, groups, 1)
        else:
            w = weight.detach().float().reshape(vocab, groups, -1)
            scales = (w.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-10)
            q = torch.round(w / scales).clamp(-qmax - 1, qmax).to(torch.int8).reshape(vocab, dim)
        if bits == 4:  # kernel layout: (even + 8) in the high nibble, (odd + 8) in the low nibble
            u = (q + 8).to(torch.uint8).reshape(vocab, dim // 2, 2)
            q = u[..., 0] * 16 + u[..., 1]
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.reshape(vocab, groups).squeeze(-1))

    def forward(self, tokens):
        if self.bits == 8:
            return torch.ops.quantized_decomposed.embedding_byte.dtype(
                self.weight, self.scales, None, -128, 127, tokens, dtype=torch.float32)
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.weight, self.scales, None, -8, 7, tokens, dtype=torch.float32)


class DynamicQuantLinear(nn.Module):
    """A torchao-quantized linear spelled with ExecuTorch's quantized_decomposed ops: per-token dynamic
    int8 activations x int4 group-wise / int8 per-channel weights, which XNNPACK lowers to one qd8 GEMM.

    torchao computes the weights (qdata, scale, zero point 0); only the graph's spelling differs from its
    tensor subclass: the quantized_decomposed ops have meta kernels, so each of the lowering's ~20
    fake-tensor re-traces costs one dispatch per op, where torchao's python primitives cost dozens;
    this halves the lowering of the lfm2-350m preset (benchmarks/RESULTS.md, ExecuTorch)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight  # torchao's IntxUnpackedToInt8Tensor
        self.group_size = weight.block_size[-1]
        self.qmin, self.qmax = (-8, 7) if weight.target_dtype == torch.int4 else (-128, 127)
        per_channel = self.group_size == linear.in_features  # scales [out] rather than [out, groups]
        self.register_buffer("weight", weight.qdata.detach().clone())
        self.register_buffer("scale", weight.scale.detach().flatten(0 if per_channel else 1).clone())
        self.register_buffer("zero_point", weight.zero_point.detach().flatten(0 if per_channel else 1).clone())
        self.bias = linear.bias

    def forward(self, x):
        qd = torch.ops.quantized_decomposed
        scale, zero = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
        x = qd.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
        x = qd.dequantize_per_token(x, scale, zero, -128, 127, torch.int8, torch.float32)
        if self.scale.dim() == 2:
            w = qd.dequantize_per_channel_group(self.weight, self.scale, self.zero_point, self.qmin, self.qmax,
                                                torch.int8, self.group_size, torch.float32)
        else:
            w = qd.dequantize_per_channel(self.weight, self.scale, self.zero_point, 0, self.qmin, self.qmax,
                                          torch.int8, out_dtype=torch.float32)
        return F.linear(x, w, self.bias)


def quantize_linears(model: nn.Module, quant: str, group_size: int, method: str = "rtn", head_bits: int = 8
                     ) -> list[str]:
    """torchao dynamic int8 activations x int8/int4 weights (what XNNPACK runs); returns skipped names.

    8da4w: int4 weights in groups of `group_size` input columns (0 = one scale per output channel), except
    the lm_head, which keeps int8 per channel (head_bits 8) as llama.cpp's q4_0 keeps its output matrix at
    8 bits: a 4-bit head misses docs/design.md §5's 4-bit bound on the random checkpoint (benchmarks/RESULTS.md,
    2026-11-30 and issue 27). method: how torchao picks the scales (its `intx_choose_qparams_algorithm`):
    "rtn" is absmax round-to-nearest ("affine"); "hqq" is "hqq_scale_only", HQQ's alternating least-squares
    fit of each group's scale (symmetric, zero point 0, no data; up to 20 rounds), ExecuTorch's own LLM
    export default since PR #14834. Same bytes and kernels either way. 8da8w: int8 weights, one scale per
    output channel (XNNPACK runs groups for 4-bit only), always rtn."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    grouped = quant == "8da4w" and group_size > 0
    skipped = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and grouped and m.in_features % group_size]
    for name in skipped:  # never silently: the user sees every linear left in fp32
        mod = model.get_submodule(name)
        msg = (f"executorch {quant}: {name} stays fp32 (in_features {mod.in_features} is not a multiple of "
               f"--group-size {group_size}); pick a group size that divides it, or 0 for per-channel")
        warnings.warn(msg, stacklevel=2)
        print(f"warning: {msg}", file=sys.stderr)
    algorithm = "hqq_scale_only" if method == "hqq" else "affine"
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4 if quant == "8da4w" else torch.int8,
        weight_granularity=PerGroup(group_size) if grouped else PerAxis(0), intx_choose_qparams_algorithm=algorithm)
    head = config if quant == "8da4w" and head_bits == 4 else Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int8, weight_granularity=PerAxis(0), intx_choose_qparams_algorithm=algorithm)
    to_quantize = lambda m, fqn: isinstance(m, nn.Linear) and fqn not in skipped  # noqa: E731
    quantize_(model, head, filter_fn=lambda m, fqn: to_quantize(m, fqn) and fqn == "lm_head")
    quantize_(model, config, filter_fn=lambda m, fqn: to_quantize(m, fqn) and fqn != "lm_head")
    for name, module in list(model.named_modules()):
        if to_quantize(module, name):
            model.set_submodule(name, DynamicQuantLinear(module))
    return skipped


def prepare_model(model, quant: str, group_size: int, embedding_quant: str, method: str = "rtn", head_bits: int = 8):
    if model.config.tie_word_embeddings and (quant != "fp32" or embedding_quant != "none"):
        # untie: lm_head gets the linear format, the table the embedding format
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    skipped = quantize_linears(model, quant, group_size, method, head_bits) if quant != "fp32" else []
    if embedding_quant != "none":
        bits = 8 if embedding_quant == "int8" else 4
        model.model.embed_tokens = QuantizedEmbedding(model.model.embed_tokens.weight, bits, method=method)
    use_matmul_rms_norm(model)  # after quantize_, which must not see the norms' matmul
    return skipped


# ---- export -------------------------------------------------------------------------------------
def _check_options(config, quant, kv_cache, max_seq_len, group_size, embedding_quant, prefill_chunk, quant_method,
                   calib, head_bits):
    if calib is not None:
        raise EdgeError("executorch export takes no --calib: its quantizers (--quant-method "
                        f"{'|'.join(FORMAT.quant_methods)}) need no data; drop it")
    if quant_method is not None and quant != "8da4w":
        raise EdgeError(f"--quant-method applies to executorch's 4-bit weights (--quant 8da4w), not {quant}; drop it")
    if head_bits not in (4, 8):
        raise EdgeError(f"head_bits must be 4 or 8, got {head_bits}")
    if embedding_quant not in EMBEDDING_QUANTS:
        raise EdgeError(f"unsupported --embedding-quant {embedding_quant!r}; choose one of {', '.join(EMBEDDING_QUANTS)}")
    if embedding_quant == "int4" and config.hidden_size % 32:
        raise EdgeError(f"--embedding-quant int4 needs hidden_size divisible by 32, got {config.hidden_size}; use int8")
    if group_size < 0:
        raise EdgeError(f"--group-size must be >= 0 (0 = per channel), got {group_size}")
    if not 1 <= prefill_chunk:
        raise EdgeError(f"--prefill-chunk must be positive, got {prefill_chunk}")
    if max_seq_len < 2:
        raise EdgeError(f"--max-seq-len must be at least 2 for an ExecuTorch export, got {max_seq_len}")


def export(model_dir: Path, out: Path, *, quant: str, kv_cache: str, max_seq_len: int,
           group_size: int = DEFAULT_GROUP_SIZE, embedding_quant: str | None = None,
           prefill_chunk: int = DEFAULT_PREFILL_CHUNK, quant_method: str | None = None, calib=None,
           head_bits: int = 8, attention: str = "custom", verbose: bool = False) -> Path:
    """quant_method: 8da4w's rounding (FORMAT.quant_methods, default the first); head_bits: the lm_head's
    weights in 8da4w (8: int8 per channel; 4: the linears' int4 groups)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    load_custom_ops()
    started = time.time()
    tok_text = tokenizer_json(model_dir)
    model = load_model(model_dir)
    config = model.config
    embedding_quant = embedding_quant or ("none" if quant == "fp32" else "int8")
    method = quant_method or (FORMAT.quant_methods[0] if quant == "8da4w" else "rtn")
    _check_options(config, quant, kv_cache, max_seq_len, group_size, embedding_quant, prefill_chunk, quant_method,
                   calib, head_bits)
    prefill_chunk = min(prefill_chunk, max_seq_len)
    skipped = prepare_model(model, quant, group_size, embedding_quant, method, head_bits)
    if kv_cache == "int8-stock":  # the same cache, ExecuTorch's own int8 attention kernel
        kv_cache, attention, kv_label = "int8", "llama", "int8-stock"
    else:
        kv_label = kv_cache
    wrapper = ExportedLM(model, BufferCache(config, max_seq_len, kv_cache, attention)).eval()

    # example T >= 2 so export keeps T symbolic (0 and 1 get specialized)
    example = (torch.tensor([[2, 3, 4]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    chunk = torch.export.Dim("tokens", min=1, max=max(prefill_chunk, 2))
    try:
        with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            ep = torch.export.export(wrapper, example, dynamic_shapes=({1: chunk}, None), strict=False)
    except Exception as e:
        raise EdgeError(f"torch.export of {model_dir} failed: {str(e).splitlines()[0]}") from e

    ours = kv_cache == "int8" and attention == "custom"
    metadata = dict(format_version=METADATA_VERSION, config=config.to_dict(), quant=quant, kv_cache=kv_label,
                    group_size=group_size, embedding_quant=embedding_quant, prefill_chunk=prefill_chunk,
                    quant_method=method, head_bits=head_bits if quant == "8da4w" else None,
                    max_seq_len=max_seq_len, unquantized_linears=skipped,
                    chat_template=read_chat_template(model_dir),  # edge/chat.py; None if it has none
                    # our kernels the runtime must load before the forward method, and the library that
                    # holds them (runtime/et_kernels.py; `edge info` prints its installed path)
                    custom_kernels=["edge::int8_sdpa", "edge::int8_update_cache"] if ours else [],
                    op_library=OP_LIBRARY if ours else None)
    constant_methods = {
        # read by ExecuTorch's LLM runner (extension/llm/runner/constants.h)
        "get_max_seq_len": prefill_chunk,   # the runner's name for the most tokens one forward takes
        "get_max_context_len": max_seq_len,
        "get_vocab_size": config.vocab_size,
        # no bos (a SmolLM2 child: its tokenizer adds none): the method is left out, as ExecuTorch cannot
        # emit None; the runner then takes its tokenizer's bos, which it adds only when asked (num_bos)
        **({"get_bos_id": config.bos_token_id} if config.bos_token_id is not None else {}),
        "get_eos_ids": [config.eos_token_id],
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
        # ours: everything runtime.load needs, so the .pte is self-sufficient
        "edge_metadata": _bytes_tensor(json.dumps(metadata)),
        "edge_tokenizer_json": _bytes_tensor(tok_text),
    }
    # One XnnpackPartitioner takes the dynamically quantized linears and the fp32 ops alike: a per-linear
    # DQ partitioner first (export_llama's -X) made 4.5x more delegates, no faster at run time and 2x slower
    # to lower (benchmarks/RESULTS.md, ExecuTorch)
    partitioners = [XnnpackPartitioner()]
    try:
        edge = to_edge_transform_and_lower(
            ep, partitioner=partitioners, constant_methods=constant_methods,
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
        program = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    except Exception as e:
        raise EdgeError(f"lowering {model_dir} to ExecuTorch failed: {str(e).splitlines()[0]}") from e
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            program.write_to_file(f)
    if verbose:
        print(f"exported {out} in {time.time() - started:.1f}s", file=sys.stderr)
    return out


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()
