"""ExecuTorch attention A/B: llama:: custom kernels vs plain ATen ops, for the fp32 and the int8 KV cache.

    python benchmarks/bench_executorch_attention.py [-t 2] [-r 5]

A model with lfm2-350m's attention shape (hidden 1024, 16 heads, 8 KV heads, head_dim 64) but only two
layers, both attention, a small FFN and a 1024-token vocabulary, so attention dominates the time. Four
.pte files (fp32 weights): {fp32, int8} KV x {custom, plain} attention, max_seq_len 1024, prefill chunk
128. Measured interleaved with runtime.bench: pp128 at depth 0, and tg32 at depth 512 (decode reads a
long cache, which is where the kernels differ). Writes benchmarks/results/executorch_attention.json.
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

from edge.checkpoint import save_model  # noqa: E402
from edge.config import HybridConfig  # noqa: E402
from edge.model import HybridLM  # noqa: E402
from edge.tokenizer import default_corpus, save_tokenizer, train_tokenizer  # noqa: E402
from runtime.bench import _SessionBench, cpu_label  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "executorch_attention"
RESULTS = ROOT / "benchmarks" / "results" / "executorch_attention.json"
MAX_SEQ_LEN, DEPTH = 1024, 512


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    args = p.parse_args()
    from export.executorch import export
    from runtime.executorch import ExecuTorchSession

    model_dir = WORK / "attn2"
    if not (model_dir / "tokenizer.json").exists():
        config = HybridConfig(vocab_size=1024, hidden_size=1024, intermediate_size=384, num_hidden_layers=2,
                              num_attention_heads=16, num_key_value_heads=8, block_multiple_of=128,
                              layer_types=["full_attention"] * 2)
        save_model(HybridLM(config).init_weights(0), model_dir)
        save_tokenizer(train_tokenizer(default_corpus(), 1024), model_dir)
    sessions, export_s = {}, {}
    for kv in ("fp32", "int8"):
        for attention in ("custom", "plain"):
            name = f"{kv}-{attention}"
            out = WORK / f"{name}.pte"
            if not out.exists():
                t0 = time.time()
                export(model_dir, out, quant="fp32", kv_cache=kv, max_seq_len=MAX_SEQ_LEN, prefill_chunk=128,
                       attention=attention)
                export_s[name] = round(time.time() - t0, 1)
            sessions[name] = ExecuTorchSession(out, n_threads=args.threads)
    benches = {name: _SessionBench(s, n_prompt=128, n_gen=0, depth=0, repetitions=args.repetitions, seed=0)
               for name, s in sessions.items()}
    decode = {name: _SessionBench(s, n_prompt=0, n_gen=32, depth=DEPTH, repetitions=args.repetitions, seed=0)
              for name, s in sessions.items()}
    for b in [*benches.values(), *decode.values()]:
        b.warmup()
    for _ in range(args.repetitions):
        for name in sessions:
            benches[name].run("pp")
            decode[name].run("tg")
    result = {"cpu": cpu_label(), "threads": args.threads, "shape": "hidden 1024, 16 heads / 8 kv, head_dim 64, "
              "2 attention layers", "max_seq_len": MAX_SEQ_LEN, "export_seconds": export_s}
    for name in sessions:
        result[name] = {
            "pp128_ts_median": round(statistics.median(128e9 / ns for ns in benches[name].samples["pp"]), 1),
            f"tg32_at_depth{DEPTH}_ts_median": round(statistics.median(32e9 / ns for ns in decode[name].samples["tg"]), 1)}
        print(name, result[name], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
