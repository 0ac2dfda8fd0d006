"""ONNX: our int4/int8 .onnx vs llama.cpp (GGUF q4_0/q8_0, same weights) vs onnxruntime-genai's builder.

    python benchmarks/bench_onnx.py [-t 2] [-p 256] [-n 64] [-r 5] [--skip-export]

1. The lfm2-350m preset with random weights: the checkpoint bench_gguf.py builds under
   benchmarks/work/gguf/lfm2-350m (tokenizer trained to the full 65536 entries on the Python standard
   library's source, which the default corpus is too small for) — imported from there, not duplicated.
2. Exports, each in a child process (wall time and peak RSS recorded): `edge export onnx --quant int4`
   (our default block 128, and `--group-size 32`) and `--quant int8` (fp32 KV), `edge export gguf
   --quant q4_0` and `q8_0`, and `python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p int4 -e cpu`
   (the peer ONNX pipeline; its default block 32, and `--extra_options block_size=128`).
3. One warm-up, then `-r` repetitions of pp (one prefill of `-p` random ids from an empty cache) and
   tg (`-n` single-token decodes of random ids from an empty cache), every engine interleaved per
   repetition (A B C ... C B A ...), `-t` threads each. Medians of tokens/s. onnxruntime-genai is driven
   through its own Generator (append_tokens), llama.cpp through runtime.load (LlamaCppSession), ours
   through runtime.load (OnnxSession). Also reported for ours: the share of a decode step spent
   outside ORT's run (the Python loop + IO binding; target <= 5%).
4. Ratios: of the medians, and the median of per-repetition ratios (`paired_*`: each repetition's
   ours/peer figures run back to back, so a load change between repetitions cancels out; on a shared
   machine these are the figures to quote).

Writes benchmarks/results/onnx.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from bench_gguf import add_protocol_options, checkpoint, run_child  # noqa: E402  (the one builder of the 65536-token checkpoint)
from runtime import load  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "onnx"
RESULTS = ROOT / "benchmarks" / "results" / "onnx.json"
EDGE = [sys.executable, "-m", "edge.cli"]


def artifacts(model_dir: Path) -> dict[str, list[str]]:
    """name -> export command (the output is WORK / name)."""
    def genai(name, *extra):
        return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(WORK / name),
                "-p", "int4", "-e", "cpu", "-c", str(WORK / "genai-cache"), *extra]

    def edge(name, fmt, quant, *extra):
        return [*EDGE, "export", fmt, str(model_dir), "-o", str(WORK / name), "--quant", quant, *extra]

    return {
        "genai-int4": genai("genai-int4"),  # the builder's default: block 32
        "ours-int4-g32.onnx": edge("ours-int4-g32.onnx", "onnx", "int4", "--kv-cache", "fp32", "--group-size", "32"),
        "q4_0.gguf": edge("q4_0.gguf", "gguf", "q4_0"),
        "ours-int4.onnx": edge("ours-int4.onnx", "onnx", "int4", "--kv-cache", "fp32"),  # our default: block 128
        "genai-int4-g128": genai("genai-int4-g128", "--extra_options", "block_size=128"),
        "q8_0.gguf": edge("q8_0.gguf", "gguf", "q8_0"),
        "ours-int8.onnx": edge("ours-int8.onnx", "onnx", "int8", "--kv-cache", "fp32"),
    }  # run in this order, reversed every other repetition: compared pairs sit next to each other


def time_pp_tg(reset, prefill, decode, prompt, gen):
    """(prefill seconds, decode seconds) of one repetition, each from an empty cache, llama-bench style."""
    reset()
    t0 = time.perf_counter_ns()
    prefill(prompt)
    t_pp = time.perf_counter_ns() - t0
    reset()
    t0 = time.perf_counter_ns()
    for token in gen:
        decode(token)
    return t_pp / 1e9, (time.perf_counter_ns() - t0) / 1e9


def size_mb(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


class Ours:
    """A runtime.load session (our .onnx, or .gguf through llama.cpp)."""

    def __init__(self, path: Path, threads: int, max_len: int):
        self.session = load(path, n_threads=threads, max_seq_len=max_len)
        self.sync = getattr(self.session, "synchronize", lambda: None)

    def reset(self):
        self.session.reset()

    def prefill(self, ids):
        self.session.prefill(ids)
        self.sync()

    def decode(self, token):
        self.session.decode(token)
        self.sync()


class Genai:
    """onnxruntime-genai's own Generator over the builder's model (LFM2 cannot rewind: a new one per run)."""

    def __init__(self, path: Path, threads: int, max_len: int):
        import onnxruntime_genai as og
        self.og = og
        config = og.Config(str(path))
        config.clear_providers()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.max_len = max_len
        self.reset()

    def reset(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_len, batch_size=1)
        self.gen = self.og.Generator(self.model, params)

    def prefill(self, ids):
        self.gen.append_tokens(ids)
        self.gen.get_logits()  # make sure the logits exist

    def decode(self, token):
        self.gen.append_tokens([token])
        self.gen.get_logits()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(ap)
    ap.add_argument("--only", nargs="+", help="benchmark only these artifacts (names as in the table)")
    ap.add_argument("--skip-export", action="store_true", help="reuse artifacts already under benchmarks/work/onnx")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=RESULTS, help="where to write results (default %(default)s)")
    args = ap.parse_args()

    model_dir = checkpoint()
    WORK.mkdir(parents=True, exist_ok=True)
    plan = {k: v for k, v in artifacts(model_dir).items() if not args.only or k in args.only}
    exports = {}
    for name, cmd in plan.items():
        out = WORK / name
        if args.skip_export and out.exists():
            continue
        exports[name] = run_child(cmd)
        exports[name]["file_mb"] = size_mb(out)
        print(f"export {name}: {exports[name]}", flush=True)

    max_len = args.n_prompt + args.n_gen + 16
    load_before = os.getloadavg()  # the machine is shared: the load says how far to trust absolute figures
    engines = {}
    for name in plan:
        t0 = time.perf_counter()
        engines[name] = (Genai if name.startswith("genai") else Ours)(WORK / name, args.threads, max_len)
        print(f"loaded {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, 65536, args.n_prompt).tolist()
    gen = rng.integers(0, 65536, args.n_gen).tolist()
    for e in engines.values():  # warm-up
        time_pp_tg(e.reset, e.prefill, e.decode, prompt[:32], gen[:4])
    samples = {name: {"pp": [], "tg": [], "tg_outside_ort": []} for name in engines}
    for rep in range(args.repetitions):
        for name, e in (reversed(engines.items()) if rep % 2 else engines.items()):
            session = getattr(e, "session", None)
            engine_ns = getattr(session, "engine_ns", None)
            t_pp, t_tg = time_pp_tg(e.reset, e.prefill, e.decode, prompt, gen)
            samples[name]["pp"].append(args.n_prompt / t_pp)
            samples[name]["tg"].append(args.n_gen / t_tg)
            if engine_ns is not None:  # ORT time of this repetition's pp + tg; recover tg's share
                e.reset()
                before = session.engine_ns
                t0 = time.perf_counter_ns()
                for token in gen:
                    e.decode(token)
                total = time.perf_counter_ns() - t0
                samples[name]["tg_outside_ort"].append(1 - (session.engine_ns - before) / total)
        print(f"rep {rep + 1}: " + "  ".join(f"{n} pp {s['pp'][-1]:.0f} tg {s['tg'][-1]:.1f}"
                                              for n, s in samples.items()), flush=True)

    runs = []
    print(f"\n{'artifact':<20} {'pp t/s':>8} {'tg t/s':>8} {'MiB':>7}  outside-ORT share of a decode step")
    for name, s in samples.items():
        r = dict(artifact=name, engine="onnxruntime-genai" if name.startswith("genai") else
                 ("llama.cpp" if name.endswith(".gguf") else "onnxruntime (ours)"),
                 file_mb=size_mb(WORK / name), n_threads=args.threads, n_prompt=args.n_prompt, n_gen=args.n_gen,
                 pp_median_ts=round(statistics.median(s["pp"]), 2), tg_median_ts=round(statistics.median(s["tg"]), 2),
                 pp_samples_ts=[round(x, 2) for x in s["pp"]], tg_samples_ts=[round(x, 2) for x in s["tg"]])
        if s["tg_outside_ort"]:
            r["tg_outside_ort_share_median"] = round(statistics.median(s["tg_outside_ort"]), 4)
        runs.append(r)
        share = f"{100 * r['tg_outside_ort_share_median']:.2f}%" if "tg_outside_ort_share_median" in r else ""
        print(f"{name:<20} {r['pp_median_ts']:>8.1f} {r['tg_median_ts']:>8.2f} {r['file_mb']:>7.1f}  {share}")
    ratios = {}
    for ours, peer, label in (("ours-int4.onnx", "genai-int4", "ours_int4_over_genai_int4"),
                              ("ours-int4.onnx", "genai-int4-g128", "ours_int4_over_genai_int4_g128"),
                              ("ours-int4.onnx", "q4_0.gguf", "ours_int4_over_llamacpp_q4_0"),
                              ("ours-int4-g32.onnx", "genai-int4", "ours_int4_g32_over_genai_int4"),
                              ("ours-int4-g32.onnx", "q4_0.gguf", "ours_int4_g32_over_llamacpp_q4_0"),
                              ("ours-int8.onnx", "q8_0.gguf", "ours_int8_over_llamacpp_q8_0")):
        if ours in samples and peer in samples:
            for test in ("pp", "tg"):
                a, b = samples[ours][test], samples[peer][test]
                ratios[f"{test}_{label}"] = round(statistics.median(a) / statistics.median(b), 3)
                ratios[f"paired_{test}_{label}"] = round(statistics.median(x / y for x, y in zip(a, b)), 3)
    print(json.dumps(ratios, indent=1))
    import onnxruntime
    result = dict(command=" ".join(["benchmarks/bench_onnx.py", *sys.argv[1:]]), preset="lfm2-350m (random weights)",
                  exports=exports, runs=runs, ratios=ratios,
                  host=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                            onnxruntime=onnxruntime.__version__,
                            load_average_1_5_15_before=[round(x, 2) for x in load_before],
                            load_average_1_5_15_after=[round(x, 2) for x in os.getloadavg()]),
                  note="medians of interleaved repetitions on a shared 2-core machine; compare ratios, not absolutes")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
