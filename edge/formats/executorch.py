"""The ExecuTorch contract: what export/executorch.py writes into a .pte and runtime/executorch.py reads.

- `edge_metadata`: a constant method returning JSON (META_TYPES: the fields the session needs), plus
  `edge_tokenizer_json` and the standard `get_max_context_len`; a .pte whose KV cache is `int8` records
  `op_library: OP_LIBRARY`, the library its runner must load (runtime/et_kernels.py builds it).
- The op schemas of our int8 KV cache, `edge::int8_sdpa` and `edge::int8_update_cache`: `define_ops()`
  registers them with torch.library with a reference implementation in torch (what torch.export traces at
  export time, and what the tests compare the C++ kernels of runtime/kernels/ against);
  `load_custom_ops()` registers every op a .pte of ours uses, for the exporter and the runtime alike.
The KV cache and the weights are fixed at export: load() cannot pick another (FORMAT.kv_cache_at_load).
"""
from __future__ import annotations

import torch

from . import FORMATS

FORMAT = FORMATS["executorch"]
METADATA_VERSION = 1
OP_LIBRARY = "libedge_ops"  # what a .pte with kv_cache int8 records in edge_metadata.op_library
EMBEDDING_QUANTS = ("none", "int8", "int4")
# edge_metadata fields the session reads, and their JSON types
META_TYPES = {"config": dict, "quant": str, "kv_cache": str, "max_seq_len": int, "prefill_chunk": int}
KV_ELEMENT_BYTES = {"fp32": 4, "int8": 1, "int8-stock": 1}
assert tuple(KV_ELEMENT_BYTES) == FORMAT.kv_caches, "edge/formats/__init__.py lists the same KV caches"


def load_custom_ops() -> None:
    """Register the llama:: and quantized_decomposed:: ops (export-time kernels and runtime kernels)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401
    from torch.ao.quantization.fx import _decomposed  # noqa: F401  quantized_decomposed:: ops of the linears

    define_ops()


def int8_sdpa_reference(q, k_cache, v_cache, k_scales, v_scales, start_pos: int) -> torch.Tensor:
    """What the kernel computes, in torch: q [1,T,H,D] float; caches int8 [1,S,KV,D]; scales [1,S,KV,1]."""
    from edge.model import causal_mask, grouped_attention

    T, end = q.shape[1], start_pos + q.shape[1]
    keys = k_cache[:, :end].to(torch.float32) * k_scales[:, :end]
    values = v_cache[:, :end].to(torch.float32) * v_scales[:, :end]
    y = grouped_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                          causal_mask(T, end, start_pos))
    return y.transpose(1, 2).contiguous()


def quantize_symmetric(x: torch.Tensor):
    """int8 values and one fp32 scale per vector over the last dim (symmetric: zero point 0)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def int8_update_cache_reference(value, cache, scales, start_pos: int) -> None:
    """What the cache writer does, in torch: value [1,T,KV,D] float -> cache int8 / scales at start_pos.."""
    end = start_pos + value.shape[1]
    quantized, scale = quantize_symmetric(value)
    cache[:, start_pos:end].copy_(quantized)
    scales[:, start_pos:end].copy_(scale)


def define_ops() -> None:
    """Register edge::int8_sdpa and edge::int8_update_cache (functional + .out) with torch (idempotent)."""
    if hasattr(torch.ops.edge, "int8_sdpa"):
        return
    lib = torch.library.Library("edge", "DEF")
    args = "Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, Tensor v_scales, SymInt start_pos"
    lib.define(f"int8_sdpa({args}) -> Tensor")
    lib.define(f"int8_sdpa.out({args}, *, Tensor(a!) out) -> Tensor(a!)")

    def functional(q, k_cache, v_cache, k_scales, v_scales, start_pos):
        return int8_sdpa_reference(q, k_cache, v_cache, k_scales, v_scales, start_pos)

    def out_variant(q, k_cache, v_cache, k_scales, v_scales, start_pos, *, out):
        return out.copy_(int8_sdpa_reference(q, k_cache, v_cache, k_scales, v_scales, start_pos))

    lib.impl("int8_sdpa", functional, "CompositeExplicitAutograd")
    lib.impl("int8_sdpa.out", out_variant, "CompositeExplicitAutograd")
    lib.impl("int8_sdpa", lambda q, *rest: torch.empty_like(q), "Meta")
    lib.impl("int8_sdpa.out", lambda q, *rest, out: out, "Meta")

    # the cache writer: mutates cache and scales in place (as llama::update_cache does), returns a dummy [1]
    args = "Tensor value, Tensor(a!) cache, Tensor(b!) scales, SymInt start_pos"
    lib.define(f"int8_update_cache({args}) -> Tensor")
    lib.define(f"int8_update_cache.out({args}, *, Tensor(c!) out) -> Tensor(c!)")

    def update(value, cache, scales, start_pos):
        int8_update_cache_reference(value, cache, scales, start_pos)
        return value.new_zeros(1)

    def update_out(value, cache, scales, start_pos, *, out):
        int8_update_cache_reference(value, cache, scales, start_pos)
        return out

    lib.impl("int8_update_cache", update, "CompositeExplicitAutograd")
    lib.impl("int8_update_cache.out", update_out, "CompositeExplicitAutograd")
    lib.impl("int8_update_cache", lambda value, *rest: value.new_empty(1), "Meta")
    lib.impl("int8_update_cache.out", lambda *args, out: out, "Meta")
    define_ops.library = lib  # a Library unregisters its ops when collected
