"""Per-op time of an ONNX decoder in ONNX Runtime: where a decode (or prefill) step goes.

    python -m benchmarks.profile_onnx MODEL.onnx [MODEL2.onnx ...] [-t 2] [--steps 48] [--prompt 0]

Drives each model with a plain InferenceSession loop from its I/O names (ours: past_key_values.* /
past_conv.*; onnxruntime-genai's builder: past_key_values.* / past.{i}.conv + attention_mask), with
ORT's profiler on, and prints kernel time per op type over the timed runs: `--prompt 0` times
`--steps` single-token decode steps (after 8 untimed ones), `--prompt N` times prefills of N tokens.
Times come from ORT's profiler only (kernels and each whole `model_run`); wall-clock throughput is
runtime.bench's job (benchmarks.bench_onnx). Used to find what separates our graph from the builder's.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort

WARMUP = 8


def past_name(output: str) -> str:
    """The input that takes an output's value in the next step (both naming conventions)."""
    if output.startswith("present_conv."):
        return output.replace("present_conv.", "past_conv.")
    if output.endswith(".conv"):
        return output.replace("present.", "past.")
    return output.replace("present.", "past_key_values.")


def empty_inputs(session, head_dim: int) -> dict[str, np.ndarray]:
    """Zero conv states and length-0 K/V; the builder names its head dim `kv_cache_dim`."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    feeds = {}
    for i in session.get_inputs():
        if i.name in ("input_ids", "attention_mask"):
            continue
        named = {"batch_size": 1, "kv_cache_dim": head_dim}
        shape = [named.get(d, 0) if isinstance(d, str) or d is None else d for d in i.shape]
        feeds[i.name] = np.zeros(shape, types[i.type])
    return feeds


def run_steps(session, feeds, ids, names, n_past):
    feeds = dict(feeds, input_ids=np.array([ids], np.int64))
    if any(i.name == "attention_mask" for i in session.get_inputs()):
        feeds["attention_mask"] = np.ones((1, n_past + len(ids)), np.int64)
    outputs = dict(zip(names, session.run(names, feeds)))
    return {past_name(n): v for n, v in outputs.items() if n != "logits"}


def profile(path: str, threads: int, steps: int, prompt: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    genai_config = os.path.join(os.path.dirname(path), "genai_config.json")
    head_dim = json.load(open(genai_config))["model"]["decoder"]["head_size"] if os.path.exists(genai_config) else 0
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)
    vocab = 65536
    for rep in range(WARMUP + steps if prompt == 0 else 3 + steps):
        if prompt:
            state, n_past, ids = empty_inputs(session, head_dim), 0, rng.integers(0, vocab, prompt).tolist()
        elif rep == 0:
            state, n_past = empty_inputs(session, head_dim), 0
        if not prompt:
            ids = [int(rng.integers(0, vocab))]
        state = run_steps(session, state, ids, names, n_past)
        n_past += len(ids)
    trace = json.load(open(session.end_profiling()))
    runs = [e for e in trace if e.get("name") == "model_run"]
    skip = WARMUP if not prompt else 3
    start = runs[skip]["ts"]
    per_op = collections.Counter()
    count = collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    run_us = [e["dur"] for e in runs[skip:]]
    return per_op, count, np.median(run_us) / 1e3, sum(run_us) / len(run_us) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=0, help="0: decode steps; N: prefills of N tokens")
    args = ap.parse_args()
    for path in args.models:
        per_op, count, median_ms, run_ms = profile(path, args.threads, args.steps, args.prompt)
        n = args.steps
        total = sum(per_op.values()) / n / 1e3
        print(f"\n{path}: ORT run median {median_ms:.2f} ms, mean {run_ms:.2f} ms, kernels {total:.2f} ms, "
              f"{sum(count.values()) // n} kernels/step")
        for op, us in per_op.most_common():
            print(f"  {op:<36} {us / n / 1e3:8.3f} ms  {count[op] // n:4d}x")


if __name__ == "__main__":
    main()
