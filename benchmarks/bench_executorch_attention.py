"""ExecuTorch attention A/B: custom kernels vs plain ATen ops, for the fp32 and the int8 KV cache.

    python -m benchmarks.bench_executorch_attention [-t 2] [-r 5] [--json PATH]

The exporter's own cache module (export/executorch.py BufferCache) is exported alone with lfm2-350m's
attention shape (16 query heads, 8 KV heads, head_dim 64), max_seq_len 1024, and lowered with the
XNNPACK partitioner like the full model: forward(q, k, v, input_pos) stores k, v and returns the
attention of q. Variants: fp32-custom (update_cache + llama::custom_sdpa), int8-custom (update_cache +
our edge::int8_sdpa, runtime/kernels/int8_sdpa.cpp), int8-llama (update_cache + ExecuTorch's
llama::custom_quantized_sdpa), and {fp32, int8}-plain (`PlainCache` below: slice copy_ + dequantized
prefix + masked SDPA, no custom kernels; the A/B's baseline, not a product option).
Each program is wrapped as a Session (`AttentionSession`: a "token" is one position of random q, k, v)
and timed by runtime.bench, interleaved: pp128 (a 128-position prefill at position 0) and tg32 @ d512
(32 single-position decodes after 512 positions are filled, where the kernels differ most). Attention of
one layer only, so these are microseconds per call; the full model has 6 such layers.
Writes benchmarks/results/executorch_attention.json.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from benchmarks.common import RESULTS, WORK
from edge.config import HybridConfig
from edge.files import write_json
from edge.model import causal_mask, grouped_attention
from export.executorch import BufferCache
from runtime.bench import bench_interleaved
from edge.formats.executorch import quantize_symmetric
from runtime.session import Session

ATTN_WORK = WORK / "executorch_attention"
MAX_SEQ_LEN, DEPTH, PREFILL, DECODE = 1024, 512, 128, 32
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 64
CONFIG = HybridConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      num_hidden_layers=1, layer_types=["full_attention"], vocab_size=256)
VARIANTS = (("fp32", "custom"), ("fp32", "plain"), ("int8", "custom"), ("int8", "llama"), ("int8", "plain"))


class PlainCache(BufferCache):
    """BufferCache with attention from plain ATen ops: slice-copy into the cache, dequantize the used
    prefix, masked SDPA. The baseline the custom kernels are measured against."""

    def __init__(self, config, max_seq_len: int, kv_cache: str):
        super().__init__(config, max_seq_len, kv_cache, "custom")  # the same buffers as the product cache

    def attend(self, layer, q, k, v, start_pos):
        k_cache, v_cache = getattr(self, f"k_{layer}"), getattr(self, f"v_{layer}")
        end = start_pos + q.shape[2]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # the cache layout: [B, T, kv heads, head_dim]
        if self.kv_cache == "fp32":
            k_cache[:, start_pos:end].copy_(k)
            v_cache[:, start_pos:end].copy_(v)
            keys, values = k_cache[:, :end], v_cache[:, :end]
        else:
            k_scales, v_scales = getattr(self, f"k_scales_{layer}"), getattr(self, f"v_scales_{layer}")
            (kq, ks), (vq, vs) = quantize_symmetric(k), quantize_symmetric(v)
            k_cache[:, start_pos:end].copy_(kq)
            k_scales[:, start_pos:end].copy_(ks)
            v_cache[:, start_pos:end].copy_(vq)
            v_scales[:, start_pos:end].copy_(vs)
            keys = k_cache[:, :end].to(torch.float32) * k_scales[:, :end]
            values = v_cache[:, :end].to(torch.float32) * v_scales[:, :end]
        mask = causal_mask(q.shape[2], end, start_pos)
        return grouped_attention(q, keys.transpose(1, 2), values.transpose(1, 2), mask)


class AttentionOnly(nn.Module):
    def __init__(self, kv_cache: str, attention: str):
        super().__init__()
        self.cache = (PlainCache(CONFIG, MAX_SEQ_LEN, kv_cache) if attention == "plain"
                      else BufferCache(CONFIG, MAX_SEQ_LEN, kv_cache, attention))

    def forward(self, q, k, v, input_pos):
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + q.shape[2] <= MAX_SEQ_LEN)
        return self.cache.attend(0, q, k, v, start_pos)


def export(kv_cache: str, attention: str, out) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    T = 3
    example = (torch.randn(1, HEADS, T, HEAD_DIM), torch.randn(1, KV_HEADS, T, HEAD_DIM),
               torch.randn(1, KV_HEADS, T, HEAD_DIM), torch.tensor([0]))
    t = torch.export.Dim("tokens", min=1, max=PREFILL)
    with torch.no_grad():
        ep = torch.export.export(AttentionOnly(kv_cache, attention), example, strict=False,
                                 dynamic_shapes=({2: t}, {2: t}, {2: t}, None))
    program = to_edge_transform_and_lower(
        ep, partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
    ).to_executorch(ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                                            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    out.write_bytes(program.buffer)


class AttentionSession(Session):
    """One attention program behind the Session API, so runtime.bench times it like a model: a "token" is
    one position of q, k, v (random, drawn once per length, before any timing); logits are not produced."""
    engine = "executorch (attention only)"

    def __init__(self, path, name: str, kv_cache: str):
        from runtime.executorch import _runtime
        self.method = _runtime().load_program(path).load_method("forward")
        self.inputs = {n: [torch.randn(1, HEADS, n, HEAD_DIM), torch.randn(1, KV_HEADS, n, HEAD_DIM),
                           torch.randn(1, KV_HEADS, n, HEAD_DIM)] for n in (1, PREFILL)}
        super().__init__(CONFIG, None, MAX_SEQ_LEN, None, quant=name, kv_cache=kv_cache, path=str(path))

    def _forward(self, ids):
        for start in range(0, len(ids), PREFILL):
            n = min(PREFILL, len(ids) - start)
            qkv = self.inputs.get(n) or [x[:, :, :n].contiguous() for x in self.inputs[PREFILL]]
            self.method.execute([*qkv, torch.tensor([self.n_past + start])])
        return torch.zeros(0).numpy()

    def _reset(self):
        pass  # positions are written before they are read: a new fill overwrites the old one

    def kv_cache_bytes(self):
        per = HEAD_DIM * (4 if self.kv_cache == "fp32" else 1) + (0 if self.kv_cache == "fp32" else 4)
        return 2 * KV_HEADS * self.n_past * per


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("--json", default=RESULTS / "executorch_attention.json",
                   help="where to write results (default %(default)s)")
    args = p.parse_args()
    from runtime.et_kernels import build, load_kernels
    from runtime.executorch import _runtime, set_threads
    _runtime()  # registers the llama:: and quantized_decomposed:: ops
    build()  # the install's step, a no-op when the op library is up to date
    load_kernels()
    threads = set_threads(args.threads)
    ATTN_WORK.mkdir(parents=True, exist_ok=True)
    openers = []
    for kv, attention in VARIANTS:
        name = f"{kv}-{attention}"
        out = ATTN_WORK / f"{name}.pte"
        export(kv, attention, out)
        openers.append((name, lambda o=out, n=name, kv=kv: AttentionSession(o, n, kv)))
    protocol = dict(repetitions=args.repetitions, progress=False)
    prefill = bench_interleaved(openers, n_prompt=PREFILL, n_gen=0, **protocol)
    decode = bench_interleaved(openers, n_prompt=0, n_gen=DECODE, depth=DEPTH, **protocol)
    result = {"command": " ".join(["python -m benchmarks.bench_executorch_attention", *sys.argv[1:]]),
              "threads": threads, "shape": f"{HEADS} heads / {KV_HEADS} kv heads / head_dim {HEAD_DIM}, one layer",
              "max_seq_len": MAX_SEQ_LEN}
    for pp, tg in zip(prefill, decode):
        result[pp["label"]] = {f"prefill{PREFILL}_us_median": round(pp["median_ns"] / 1e3, 1),
                               f"decode_at_depth{DEPTH}_us_median": round(tg["median_ns"] / DECODE / 1e3, 1)}
        print(pp["label"], result[pp["label"]], flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
