"""ExecuTorch attention A/B: custom kernels vs plain ATen ops, for the fp32 and the int8 KV cache.

    python benchmarks/bench_executorch_attention.py [-t 2] [-r 5]

The exporter's own cache module (export/executorch.py BufferCache) is exported alone with lfm2-350m's
attention shape (16 query heads, 8 KV heads, head_dim 64), max_seq_len 1024, and lowered with the
XNNPACK partitioner like the full model: forward(q, k, v, input_pos) stores k, v and returns the
attention of q. Variants: fp32-custom (update_cache + llama::custom_sdpa), int8-custom (update_cache +
our edge::int8_sdpa, runtime/kernels/int8_sdpa.cpp), int8-llama (update_cache + ExecuTorch's
llama::custom_quantized_sdpa), and {fp32, int8}-plain (slice copy_ + dequantized prefix + masked SDPA). Timed with
executorch.runtime, interleaved: a 128-token prefill at position 0, and 32 single-token decodes after
512 positions are filled (decode reads a long cache, where the kernels differ most). Attention of one
layer only, so these are microseconds per call; the full model has 6 such layers.
Writes benchmarks/results/executorch_attention.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from edge.config import HybridConfig  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "executorch_attention"
RESULTS = ROOT / "benchmarks" / "results" / "executorch_attention.json"
MAX_SEQ_LEN, DEPTH, PREFILL, DECODE = 1024, 512, 128, 32
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 64


class AttentionOnly(nn.Module):
    def __init__(self, kv_cache: str, attention: str):
        super().__init__()
        from export.executorch import BufferCache
        config = HybridConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                              num_hidden_layers=1, layer_types=["full_attention"], vocab_size=256)
        self.cache = BufferCache(config, MAX_SEQ_LEN, kv_cache, attention)

    def forward(self, q, k, v, input_pos):
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + q.shape[2] <= MAX_SEQ_LEN)
        return self.cache.attend(0, q, k, v, start_pos)


def export(kv_cache: str, attention: str, out: Path) -> float:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    t0 = time.time()
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
    return round(time.time() - t0, 1)


def qkv(T: int):
    return [torch.randn(1, HEADS, T, HEAD_DIM), torch.randn(1, KV_HEADS, T, HEAD_DIM),
            torch.randn(1, KV_HEADS, T, HEAD_DIM)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    args = p.parse_args()
    from export.executorch import load_custom_ops
    from runtime.executorch import _runtime, set_threads
    load_custom_ops()
    threads = set_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    methods, export_s = {}, {}
    from runtime.et_kernels import build, load_kernels
    build()  # the install's step, a no-op when the op library is up to date
    load_kernels()
    for kv, attention in (("fp32", "custom"), ("fp32", "plain"), ("int8", "custom"), ("int8", "llama"),
                          ("int8", "plain")):
        name = f"{kv}-{attention}"
        out = WORK / f"{name}.pte"
        export_s[name] = export(kv, attention, out)
        methods[name] = _runtime().load_program(out).load_method("forward")
    samples = {name: {"prefill": [], "decode": []} for name in methods}
    for _ in range(args.repetitions + 1):  # the first round is the warm-up
        for name, m in methods.items():
            start = time.perf_counter_ns()
            m.execute([*qkv(PREFILL), torch.tensor([0])])
            samples[name]["prefill"].append(time.perf_counter_ns() - start)
            for pos in range(0, DEPTH, PREFILL):  # fill to DEPTH, untimed
                m.execute([*qkv(PREFILL), torch.tensor([pos])])
            steps = [qkv(1) for _ in range(DECODE)]
            start = time.perf_counter_ns()
            for i, step in enumerate(steps):
                m.execute([*step, torch.tensor([DEPTH + i])])
            samples[name]["decode"].append((time.perf_counter_ns() - start) / DECODE)
    result = {"threads": threads, "shape": f"{HEADS} heads / {KV_HEADS} kv heads / head_dim {HEAD_DIM}, one layer",
              "max_seq_len": MAX_SEQ_LEN, "export_seconds": export_s}
    for name, s in samples.items():
        result[name] = {f"prefill{PREFILL}_us_median": round(statistics.median(s["prefill"][1:]) / 1e3, 1),
                        f"decode_at_depth{DEPTH}_us_median": round(statistics.median(s["decode"][1:]) / 1e3, 1)}
        print(name, result[name], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
