"""GGUF / llama.cpp: export the lfm2-350m preset (random weights) and measure our runtime's overhead.

    python -m benchmarks.bench_gguf [-t 1 2] [-p 256] [-n 64] [-r 6] [--quants q8_0 q4_0] [--json PATH]

1. The checkpoint is benchmarks.common's (benchmarks/work/gguf/lfm2-350m), built if missing.
2. Exports it with `edge export gguf` to each quant in a child process, recording wall time, peak RSS of
   that process (os.wait4) against the fp32 checkpoint size, and the file size.
3. Loads each file twice: through our `LlamaCppSession` and as a bare llama.cpp context driven by the
   plain C API (benchmarks.peers.RawLlamaSession: llama_batch_get_one + llama_decode + llama_synchronize,
   as llama-bench does), with the same context parameters, and times both with runtime.bench, interleaved
   (ours, raw, ours, raw ... per repetition). Reported: median tokens/s of each, and ours' speed relative
   to raw (`*_ours_over_raw`: ratio of medians; `paired_*`: median of the per-repetition ratios), i.e. the
   runtime's overhead; target: decode within 3%. On a loaded shared machine those 350M ratios scatter by
   several percent, so the script also measures the session's extra time per decode step on the tiny
   preset (ours minus raw per repetition of a 256-token decode, divided by 256, median) and reports what
   it implies for each 350M decode rate.

Writes benchmarks/results/gguf.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import llama_cpp

from benchmarks.common import EDGE, RESULTS, WORK, checkpoint, run_child, tiny_checkpoint
from benchmarks.peers import RawLlamaSession
from edge.files import write_json
from runtime import load
from runtime.bench import bench_interleaved, cpu_info

GGUF_WORK = WORK / "gguf"


def ours_and_raw(path, threads: int, max_seq_len: int, **protocol) -> tuple[dict, dict]:
    """runtime.bench records of our session and of the C API on one file, interleaved: {test: record} each."""
    records = bench_interleaved([("ours", lambda: load(path, n_threads=threads, max_seq_len=max_seq_len)),
                                 ("raw", lambda: RawLlamaSession(path, threads, max_seq_len))], **protocol)
    by = {"ours": {}, "raw": {}}
    for r in records:
        by[r["label"]]["pp" if r["n_prompt"] else "tg"] = r
    return by["ours"], by["raw"]


def step_overhead_us(path, steps: int = 256, reps: int = 4) -> float:
    """Median extra time per decode step of our session over the C API, in microseconds, on a tiny model
    whose step takes ~0.3 ms: a figure load noise cannot hide, unlike 3% of a 350M step."""
    ours, raw = ours_and_raw(path, 1, steps + 8, n_prompt=0, n_gen=steps, repetitions=reps, progress=False)
    return round(statistics.median((o - r) / steps / 1e3 for o, r in
                                   zip(ours["tg"]["samples_ns"], raw["tg"]["samples_ns"])), 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    ap.add_argument("-p", "--n-prompt", type=int, default=256, help="prefill tokens (default 256)")
    ap.add_argument("-n", "--n-gen", type=int, default=64, help="decode tokens (default 64)")
    ap.add_argument("-r", "--repetitions", type=int, default=6, help="repetitions per test (default 6)")
    ap.add_argument("--quants", nargs="+", default=["q8_0", "q4_0"], help="weight formats (default q8_0 q4_0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=RESULTS / "gguf.json", help="where to write results (default %(default)s)")
    args = ap.parse_args()

    model_dir = checkpoint()
    fp32_bytes = (model_dir / "model.safetensors").stat().st_size
    exports = {}
    for quant in args.quants:
        out = GGUF_WORK / f"lfm2-350m-{quant}.gguf"
        out.unlink(missing_ok=True)  # measure a fresh export every run
        exports[quant] = run_child([*EDGE, "export", "gguf", str(model_dir), "-o", str(out), "--quant", quant])
        exports[quant].update(file_mb=round(out.stat().st_size / 2**20, 1),
                              peak_rss_over_fp32_checkpoint=round(exports[quant]["peak_rss_mb"] * 2**20 / fp32_bytes, 3))
        print(f"export {quant}: {exports[quant]}", flush=True)

    tiny = GGUF_WORK / "tiny-q8_0.gguf"
    if not tiny.exists():
        run_child([*EDGE, "export", "gguf", str(tiny_checkpoint(GGUF_WORK / "tiny")), "-o", str(tiny), "--quant", "q8_0"])
    overhead_us = step_overhead_us(tiny)
    print(f"\nour session's extra time per decode step (tiny model, 1 thread): {overhead_us} us", flush=True)

    runs = []
    protocol = dict(n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions, seed=args.seed)
    for threads in args.threads:
        for quant in args.quants:
            path = GGUF_WORK / f"lfm2-350m-{quant}.gguf"
            ours, raw = ours_and_raw(path, threads, max(args.n_prompt, args.n_gen) + 16, **protocol)
            r = dict(model_filename=path.name, model_size=path.stat().st_size, n_threads=threads, quant=quant,
                     n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions)
            for test in ("pp", "tg"):
                r[f"{test}_ours_median_ts"] = round(ours[test]["median_ts"], 2)
                r[f"{test}_raw_median_ts"] = round(raw[test]["median_ts"], 2)
                r[f"{test}_ours_samples_ts"] = [round(x, 2) for x in ours[test]["samples_ts"]]
                r[f"{test}_raw_samples_ts"] = [round(x, 2) for x in raw[test]["samples_ts"]]
                # ours' speed relative to raw: 1.0 = no overhead, 0.97 = 3% slower
                r[f"{test}_ours_over_raw"] = round(ours[test]["median_ts"] / raw[test]["median_ts"], 4)
                r[f"paired_{test}_ours_over_raw"] = round(statistics.median(
                    o / w for o, w in zip(ours[test]["samples_ts"], raw[test]["samples_ts"])), 4)
            r["kv_cache_bytes_at_prompt"] = ours["pp"]["kv_cache_bytes"]
            r["tg_implied_overhead_from_tiny_step"] = round(overhead_us * 1e-6 * r["tg_raw_median_ts"], 5)
            runs.append(r)
            print(f"{path.name:<24} t{threads}  pp ours {r['pp_ours_median_ts']:8.1f} raw {r['pp_raw_median_ts']:8.1f} "
                  f"({r['pp_ours_over_raw']:.3f})   tg ours {r['tg_ours_median_ts']:7.2f} raw "
                  f"{r['tg_raw_median_ts']:7.2f} ({r['tg_ours_over_raw']:.3f})", flush=True)
    write_json(args.json, dict(
        command=" ".join(["python -m benchmarks.bench_gguf", *sys.argv[1:]]), preset="lfm2-350m",
        checkpoint_fp32_mb=round(fp32_bytes / 2**20, 1), exports=exports,
        decode_step_overhead_us_tiny=overhead_us, runs=runs,
        host=dict(cpu_info(), llama_cpp_python=llama_cpp.__version__, load_average_1_5_15=os.getloadavg()),
        note="tokens/s are medians of interleaved repetitions (runtime.bench) on a shared machine; compare ratios"))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
