"""ONNX: our int4/int8 .onnx vs llama.cpp (GGUF q4_0/q8_0, same weights) vs onnxruntime-genai's builder.

    python -m benchmarks.bench_onnx [-t 2] [-p 256] [-n 64] [-r 5] [--only NAME...] [--skip-export] [--json PATH]

1. The checkpoint is benchmarks.common's (benchmarks/work/gguf/lfm2-350m), built if missing.
2. Exports, each in a child process (wall time and peak RSS recorded): `edge export onnx --quant int4`
   (our default block 32, and `--group-size 128`) and `--quant int8` (fp32 KV), `edge export gguf
   --quant q4_0` and `q8_0`, and `python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p int4 -e cpu`
   (the peer ONNX pipeline, benchmarks.peers.build_genai; its default block 32, and
   `--extra_options block_size=128`).
3. runtime.bench, every engine interleaved per repetition, `-t` threads each: onnxruntime-genai through
   its own Generator (benchmarks.peers.GenaiSession, token by token, its K/V in one shared buffer as ours
   keeps it), llama.cpp and ours through
   runtime.load. Medians of tokens/s. Where a decode step's time goes inside ORT (per op, and ORT's run
   against the whole step): benchmarks.profile_onnx.
4. Ratios: of the medians, and the median of per-repetition ratios (`paired_*`: each repetition's
   ours/peer figures run back to back, so a load change between repetitions cancels out; on a shared
   machine these are the figures to quote).

Writes benchmarks/results/onnx.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import EDGE, RESULTS, WORK, add_protocol_options, checkpoint, run_child
from benchmarks.peers import GenaiSession, build_genai
from edge.files import write_json
from runtime import load
from runtime.bench import artifact_bytes, bench_interleaved, cpu_info

ONNX_WORK = WORK / "onnx"


def artifacts(model_dir: Path) -> dict[str, Callable[[], dict]]:
    """name -> its export (the output is ONNX_WORK / name), returning wall time and peak RSS."""
    def genai(name, *extra):
        return lambda: build_genai(model_dir, ONNX_WORK / name, *extra)

    def edge(name, fmt, quant, *extra):
        return lambda: run_child([*EDGE, "export", fmt, str(model_dir), "-o", str(ONNX_WORK / name), "--quant", quant,
                                  *extra])

    return {
        "genai-int4": genai("genai-int4"),  # the builder's default: block 32
        "ours-int4.onnx": edge("ours-int4.onnx", "onnx", "int4", "--kv-cache", "fp32"),  # our default: block 32
        "q4_0.gguf": edge("q4_0.gguf", "gguf", "q4_0"),
        "ours-int4-g128.onnx": edge("ours-int4-g128.onnx", "onnx", "int4", "--kv-cache", "fp32", "--group-size", "128"),
        "genai-int4-g128": genai("genai-int4-g128", "--extra_options", "block_size=128"),
        "q8_0.gguf": edge("q8_0.gguf", "gguf", "q8_0"),
        "ours-int8.onnx": edge("ours-int8.onnx", "onnx", "int8", "--kv-cache", "fp32"),
    }  # benchmarked in this order: compared pairs sit next to each other


def opener(name: str, model_dir: Path, threads: int, max_len: int):
    path = ONNX_WORK / name
    if name.startswith("genai"):
        return lambda: GenaiSession(path, model_dir, threads, max_len, share_buffer=True)
    return lambda: load(path, n_threads=threads, max_seq_len=max_len)


def engine_of(name: str) -> str:
    return "onnxruntime-genai" if name.startswith("genai") else ("llama.cpp" if name.endswith(".gguf")
                                                                 else "onnxruntime (ours)")


PAIRS = (("ours-int4.onnx", "genai-int4", "ours_int4_over_genai_int4"),
         ("ours-int4.onnx", "q4_0.gguf", "ours_int4_over_llamacpp_q4_0"),
         ("ours-int4-g128.onnx", "genai-int4-g128", "ours_int4_g128_over_genai_int4_g128"),
         ("ours-int8.onnx", "q8_0.gguf", "ours_int8_over_llamacpp_q8_0"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(ap)
    ap.add_argument("--only", nargs="+", help="benchmark only these artifacts (names as in the table)")
    ap.add_argument("--skip-export", action="store_true", help="reuse artifacts already under benchmarks/work/onnx")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=RESULTS / "onnx.json", help="where to write results (default %(default)s)")
    args = ap.parse_args()

    model_dir = checkpoint()
    ONNX_WORK.mkdir(parents=True, exist_ok=True)
    plan = {k: v for k, v in artifacts(model_dir).items() if not args.only or k in args.only}
    exports = {}
    for name, export in plan.items():
        if args.skip_export and (ONNX_WORK / name).exists():
            continue
        exports[name] = export() | {"file_mb": round(artifact_bytes(ONNX_WORK / name) / 2**20, 1)}
        print(f"export {name}: {exports[name]}", flush=True)

    load_before = os.getloadavg()  # the machine is shared: the load says how far to trust absolute figures
    max_len = args.n_prompt + args.n_gen + 16
    records = bench_interleaved([(name, opener(name, model_dir, args.threads, max_len)) for name in plan],
                                n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions,
                                seed=args.seed)
    samples = {name: {} for name in plan}
    runs = []
    print(f"\n{'artifact':<20} {'pp t/s':>8} {'tg t/s':>8} {'MiB':>7}")
    for r in records:
        samples[r["label"]]["pp" if r["n_prompt"] else "tg"] = r["samples_ts"]
    for name, s in samples.items():
        r = dict(artifact=name, engine=engine_of(name), file_mb=round(artifact_bytes(ONNX_WORK / name) / 2**20, 1),
                 n_threads=args.threads, n_prompt=args.n_prompt, n_gen=args.n_gen,
                 pp_median_ts=round(statistics.median(s["pp"]), 2), tg_median_ts=round(statistics.median(s["tg"]), 2),
                 pp_samples_ts=[round(x, 2) for x in s["pp"]], tg_samples_ts=[round(x, 2) for x in s["tg"]])
        runs.append(r)
        print(f"{name:<20} {r['pp_median_ts']:>8.1f} {r['tg_median_ts']:>8.2f} {r['file_mb']:>7.1f}")
    ratios = {}
    for ours, peer, label in PAIRS:
        if ours in samples and peer in samples:
            for test in ("pp", "tg"):
                a, b = samples[ours][test], samples[peer][test]
                ratios[f"{test}_{label}"] = round(statistics.median(a) / statistics.median(b), 3)
                ratios[f"paired_{test}_{label}"] = round(statistics.median(x / y for x, y in zip(a, b)), 3)
    print(json.dumps(ratios, indent=1))
    import onnxruntime
    write_json(args.json, dict(
        command=" ".join(["python -m benchmarks.bench_onnx", *sys.argv[1:]]), preset="lfm2-350m (random weights)",
        exports=exports, runs=runs, ratios=ratios,
        host=dict(cpu_info(), onnxruntime=onnxruntime.__version__,
                  load_average_1_5_15_before=[round(x, 2) for x in load_before],
                  load_average_1_5_15_after=[round(x, 2) for x in os.getloadavg()]),
        note="medians of interleaved repetitions (runtime.bench) on a shared 2-core machine; compare ratios"))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
