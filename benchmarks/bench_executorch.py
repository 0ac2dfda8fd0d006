"""ExecuTorch: our .pte vs ExecuTorch's own LFM2 export path, lfm2-350m preset with random weights.

    python -m benchmarks.bench_executorch [-t 2] [-p 256] [-n 64] [-r 5] [--skip-export] [--json PATH]

1. The checkpoint is benchmarks.common's (benchmarks/work/gguf/lfm2-350m), built if missing.
2. Ours: `edge export executorch --quant 8da4w --kv-cache int8 --embedding-quant int4 --group-size 32
   --max-seq-len 512 --prefill-chunk 256` in a child process (wall time, peak RSS); the int8 cache is read
   by our edge::int8_sdpa kernel (runtime/kernels/int8_sdpa.cpp).
3. Theirs: the same weights through `executorch.examples.models.lfm2.convert_weights`, then
   `python -m executorch.examples.models.llama.export_llama --model lfm2_350m -qmode 8da4w -G 32 -kv
   --use_sdpa_with_kv_cache -X --xnnpack-extended-ops --max_seq_length 512 --max_context_length 512`
   (benchmarks.peers.export_stock_pte; fp32 KV cache and fp32 embedding, as the issue measured it).
4. Both files are loaded in this process (one threadpool of -t threads) and measured with runtime.bench,
   interleaved ours/theirs, each through `runtime.executorch.execute` (the same harness for both;
   benchmarks.compare tries the other harness settings). pp256 is one forward call in both (prefill
   chunk 256 / their max_seq_length 512). Reported: median tokens/s and ratios.

Writes benchmarks/results/executorch.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from benchmarks.common import EDGE, RESULTS, WORK, add_protocol_options, checkpoint, run_child
from benchmarks.peers import EXPORT_LLAMA_FLAGS, StockPteSession, export_stock_pte
from edge.config import HybridConfig
from edge.files import write_json
from runtime.bench import bench_interleaved, cpu_label

ET_WORK = WORK / "executorch"
OURS = ET_WORK / "ours-8da4w-int8kv.pte"
THEIRS = ET_WORK / "et-lfm2_350m-8da4w.pte"  # benchmarks.compare's ExecuTorch peer too
OUR_FLAGS = ["--quant", "8da4w", "--kv-cache", "int8", "--embedding-quant", "int4", "--group-size", "32",
             "--max-seq-len", "512", "--prefill-chunk", "256"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(p)
    p.add_argument("--skip-export", action="store_true", help="reuse the .pte files already under work/")
    p.add_argument("--json", default=RESULTS / "executorch.json", help="where to write results (default %(default)s)")
    args = p.parse_args()
    ET_WORK.mkdir(parents=True, exist_ok=True)
    model_dir = checkpoint()
    prior = json.loads(open(args.json).read()) if os.path.exists(args.json) else {}
    exports = prior.get("exports", {})
    if not (args.skip_export and OURS.exists()):
        exports["ours"] = run_child([*EDGE, "export", "executorch", str(model_dir), "-o", str(OURS), *OUR_FLAGS],
                                    ET_WORK / "ours_export.log")
        print("ours exported:", exports["ours"], flush=True)
    if not (args.skip_export and THEIRS.exists()):
        exports["theirs"] = export_stock_pte(model_dir, THEIRS)
        print("theirs exported:", exports["theirs"], flush=True)

    from runtime.executorch import ExecuTorchSession
    config = HybridConfig.load(model_dir)
    records = bench_interleaved([("ours", lambda: ExecuTorchSession(OURS, n_threads=args.threads)),
                                 ("theirs", lambda: StockPteSession(THEIRS, config, args.threads))],
                                n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions)
    result = {"command": " ".join(["python -m benchmarks.bench_executorch", *sys.argv[1:]]), "cpu": cpu_label(),
              "load_average_1min_at_end": round(os.getloadavg()[0], 2), "threads": records[0]["n_threads"],
              "n_prompt": args.n_prompt, "n_gen": args.n_gen, "repetitions": args.repetitions,
              "checkpoint": str(model_dir), "ours_export_flags": OUR_FLAGS, "their_export_flags": EXPORT_LLAMA_FLAGS,
              "exports": exports}
    for name, path in (("ours", OURS), ("theirs", THEIRS)):
        rec = {("pp" if r["n_prompt"] else "tg"): r for r in records if r["label"] == name}
        result[name] = {"file": path.name, "file_mb": round(path.stat().st_size / 1e6, 1),
                        "pp_ts_median": round(rec["pp"]["median_ts"], 2), "tg_ts_median": round(rec["tg"]["median_ts"], 2),
                        "pp_ts_samples": [round(x, 2) for x in rec["pp"]["samples_ts"]],
                        "tg_ts_samples": [round(x, 2) for x in rec["tg"]["samples_ts"]],
                        "kv_cache_bytes_at_tg": rec["tg"]["kv_cache_bytes"]}
    result["ratio_ours_over_theirs"] = {
        k: round(result["ours"][f"{k}_ts_median"] / result["theirs"][f"{k}_ts_median"], 3) for k in ("pp", "tg")}
    result["ratio_ours_over_theirs"]["file_size"] = round(result["ours"]["file_mb"] / result["theirs"]["file_mb"], 3)
    # same logits? (random weights, so agreement of the two programs is a useful sanity check)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 16).tolist()
    a = ExecuTorchSession(OURS).prefill(ids)
    b = StockPteSession(THEIRS, config, args.threads).prefill(ids)
    result["logits_cosine_ours_vs_theirs"] = round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 5)
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("ours", "theirs")}, indent=2))
    for name in ("ours", "theirs"):
        r = result[name]
        print(f"{name:7s} {r['file_mb']:7.1f} MB  pp{args.n_prompt} {r['pp_ts_median']:8.2f} t/s  "
              f"tg{args.n_gen} {r['tg_ts_median']:7.2f} t/s")


if __name__ == "__main__":
    main()
