"""One model in every format, side by side: ours vs each peer, each at its best harness, plus the roofline.

    python -m benchmarks.compare [-t 2] [-p 256] [-n 64] [-r 5] [--harness search|fixed] [--depth 4096]
                                 [--depth-gen 32] [--depth-reps 2] [--skip-depth] [--no-peers] [--tiny]

1. The lfm2-350m preset with random weights (benchmarks.common.checkpoint: tokenizer trained to the full
   65536 entries), built once under benchmarks/work/gguf/lfm2-350m.
2. Exports (each once, in a child process, under benchmarks/work/compare/, max_seq_len covering the
   depth test) at comparable bit widths: GGUF q4_0 and q8_0, ExecuTorch 8da4w (fp32 and int8 KV),
   ONNX int4 (fp32 and int8 KV); the GGUF KV type is picked at load (f16 / q8_0 / q4_0). The peers'
   artifacts (benchmarks.peers): ExecuTorch's own export_llama .pte and onnxruntime-genai's builder
   model, shared with benchmarks.bench_executorch / bench_onnx.
3. Side by side, interleaved A B A B per repetition with runtime.bench (llama-bench method): ours
   (runtime.load) and the peers wrapped as Sessions (benchmarks.peers): llama.cpp's plain C API on the
   same q4_0 GGUF, export_llama's .pte through executorch.runtime, onnxruntime-genai's Generator, and
   Hugging Face transformers' fp32 Lfm2ForCausalLM. `--harness search` (default) runs every system under
   each plausible harness setting (threads -t vs the engine's default; for ExecuTorch, ours and theirs,
   torch's pool held at one thread around `execute` or not, and the threadpool sized to -t or left at
   its default, which needs its own process; onnxruntime-genai fed token by token or decoding with its
   own `generate_next_token` loop; transformers' eager or sdpa attention) and reports each system at its
   best setting, per test, saying which won; `--harness fixed` runs the first setting of each only.
4. Roofline: read bandwidth measured here (numpy sum over 1 GiB, best of 5, 1 and 2 threads), bytes per
   decoded token ≈ the artifact's bytes (every weight is read once per token; with tied embeddings the
   LM head reads the whole table) + its KV bytes; ceiling = bandwidth / bytes, and % achieved.
5. Depth test (ours): decode after `--depth` tokens of context, each engine with its unquantized and its
   quantized KV cache: KV bytes ratio and decode speed ratio.

Writes benchmarks/results/compare.json and compare.png (`--out NAME` for NAME.json / NAME.png).
The machine is shared: quote medians and ratios of one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import peers
from benchmarks.common import EDGE, ROOT, add_protocol_options, checkpoint, run_child, tiny_checkpoint
from benchmarks.common import RESULTS as RESULTS_ROOT
from benchmarks.common import WORK as WORK_ROOT
from benchmarks.peers import Candidate, harness_text, threads_label
from edge.config import HybridConfig
from edge.files import write_json
from runtime import load
from runtime.bench import bench_interleaved, cpu_info, format_table, read_bandwidth

WORK = WORK_ROOT / "compare"
RESULTS = RESULTS_ROOT
STOCK_PTE = WORK_ROOT / "executorch" / "et-lfm2_350m-8da4w.pte"  # shared with benchmarks.bench_executorch
GENAI = WORK_ROOT / "onnx" / "genai-int4"                         # shared with benchmarks.bench_onnx

# name -> export arguments (format, quant, kv cache, extra flags)
EXPORTS = {
    "q4_0.gguf": ("gguf", "q4_0", "f16", []),
    "q8_0.gguf": ("gguf", "q8_0", "f16", []),
    "8da4w.pte": ("executorch", "8da4w", "fp32", ["--embedding-quant", "int4", "--group-size", "32",
                                                  "--prefill-chunk", "256"]),
    "8da4w-int8kv.pte": ("executorch", "8da4w", "int8", ["--embedding-quant", "int4", "--group-size", "32",
                                                         "--prefill-chunk", "256"]),
    "int4.onnx": ("onnx", "int4", "fp32", []),  # the default block 128 (4.28 bits per weight)
    "int4-int8kv.onnx": ("onnx", "int4", "int8", []),
}
ANCHOR = "peer: llama.cpp C API q4_0"  # measured in both processes when the ExecuTorch pool needs a second one
OURS = ("q4_0.gguf", "q8_0.gguf", "8da4w-int8kv.pte", "int4.onnx")  # the side-by-side set, where exported

ARTIFACTS: dict[str, Path] = {}  # name -> path: WORK / name unless --use NAME=PATH points elsewhere


def artifact(name: str) -> Path:
    return ARTIFACTS.get(name, WORK / name)


def export_all(model_dir: Path, max_seq_len: int, names=EXPORTS) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name in names:
        fmt, quant, kv, flags = EXPORTS[name]
        out = artifact(name)
        if out.exists():
            continue
        print(f"exporting {name} ...", flush=True)
        stats[name] = run_child([*EDGE, "export", fmt, str(model_dir), "-o", str(out), "--quant", quant,
                                 "--kv-cache", kv, "--max-seq-len", str(max_seq_len), *flags])
    return stats


def export_peers(model_dir: Path) -> dict:
    """The peers' own artifacts, built where missing; a peer whose toolchain is absent is left out."""
    stats = {}
    builds = [("export_llama", STOCK_PTE, peers.export_stock_pte)]
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        builds.append(("genai_builder", GENAI, peers.build_genai))
    for name, out, build in builds:
        if out.exists():
            continue
        print(f"building {out.name} with {name} ...", flush=True)
        try:
            stats[name] = build(model_dir, out)
        except SystemExit as e:  # run_child's failure: the comparison goes on without this peer
            print(f"note: {e}; that peer is skipped")
    return stats


# ---- every system under each harness setting ---------------------------------------------------------
def process_defaults() -> dict:
    """The thread counts each engine takes when not told: read before anything sizes a pool."""
    import torch
    from executorch.extension.pybindings import portable_lib
    return {"executorch_pool": portable_lib._threadpool_get_thread_count(), "torch": torch.get_num_threads(),
            "llama.cpp C API": peers.default_c_api_threads(), "ours llama.cpp": max((os.cpu_count() or 2) // 2, 1)}


def candidates(model_dir: Path, args, max_seq_len: int, defaults: dict, et_pool: str) -> list[Candidate]:
    """Ours and each peer under each harness setting; the first setting of each is `--harness fixed`'s.

    et_pool "threads": ExecuTorch's threadpool sized to -t; "default": left at its size (another process:
    the pool is process-wide and cannot be resized once a method is loaded)."""
    t = args.threads
    fixed = args.harness == "fixed"
    et_threads = t if et_pool == "threads" else None
    pool = str(t) if et_pool == "threads" else f"default ({defaults['executorch_pool']})"

    def settings(values):
        return values[:1] if fixed else values

    out = []
    for name in OURS:
        path = artifact(name)
        if not path.exists():
            continue
        if name.endswith(".pte"):
            for hold in settings(["on", "off"]):
                out.append(Candidate(f"ours: executorch {name}", {"pool": pool, "torch hold": hold},
                                     lambda p=path, h=hold: peers.Harnessed(
                                         load(p, n_threads=et_threads), lambda: peers.torch_thread_hold(h == "on"))))
            continue
        default = defaults["ours llama.cpp"] if name.endswith(".gguf") else None  # None: ORT's own default
        engine = "llamacpp" if name.endswith(".gguf") else "onnxruntime"
        for n in settings(peers.thread_settings(t, default)):
            out.append(Candidate(f"ours: {engine} {name}", {"threads": threads_label(n, default)},
                                 lambda p=path, n=n: load(p, n_threads=n)))
    if args.no_peers:
        return out
    q4 = artifact("q4_0.gguf")
    if q4.exists():
        default = defaults["llama.cpp C API"]
        for n in settings(peers.thread_settings(t, default)):
            out.append(Candidate(ANCHOR, {"threads": threads_label(n, default)},
                                 lambda n=n: peers.RawLlamaSession(q4, n, max_seq_len)))
    config = HybridConfig.load(model_dir)
    if STOCK_PTE.exists():
        for hold in settings(["on", "off"]):
            out.append(Candidate("peer: executorch export_llama 8da4w", {"pool": pool, "torch hold": hold},
                                 lambda h=hold: peers.Harnessed(peers.StockPteSession(STOCK_PTE, config, et_threads),
                                                                lambda: peers.torch_thread_hold(h == "on"))))
    else:
        print(f"note: {STOCK_PTE} missing; ExecuTorch's own export skipped")
    if GENAI.exists() and importlib.util.find_spec("onnxruntime_genai") is not None:
        for n in settings(peers.thread_settings(t, None)):
            for loop in settings(["append", "generate"]):
                out.append(Candidate("peer: onnxruntime-genai int4", {"threads": threads_label(n, None), "loop": loop},
                                     lambda n=n, loop=loop: peers.GenaiSession(GENAI, model_dir, n,
                                                                               min(max_seq_len, 4096), loop)))
    else:
        print(f"note: {GENAI} or onnxruntime_genai missing (pip install -e '.[bench]'); its builder model skipped")
    if importlib.util.find_spec("transformers") is not None:
        default = defaults["torch"]
        for attention in settings(["eager", "sdpa"]):
            for n in settings(peers.thread_settings(t, default)):
                out.append(Candidate("peer: transformers fp32", {"attention": attention,
                                                                 "threads": threads_label(n, default)},
                                     lambda n=n, a=attention: peers.TransformersSession(model_dir, n, max_seq_len, a)))
    return out


def run_candidates(cands: list[Candidate], args) -> list[dict]:
    records = bench_interleaved([(c.label, c.open) for c in cands], n_prompt=args.n_prompt, n_gen=args.n_gen,
                                repetitions=args.repetitions)
    by_label = {c.label: c for c in cands}
    for r in records:
        c = by_label[r["label"]]
        r.update(system=c.system, harness=c.harness, ours=c.ours)
    return records


def default_pool_in_child(args, defaults: dict) -> dict:
    """The ExecuTorch systems with the threadpool at its default size, in a child process (the pool cannot
    change size under a loaded method), next to llama.cpp's C API at -t as an anchor across processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        cmd = [sys.executable, "-m", "benchmarks.compare", "--et-pool", "default", "--records-only", str(out),
               "-t", str(args.threads), "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions),
               "--harness", args.harness, "--skip-export", "--skip-depth"]
        cmd += ["--tiny"] if args.tiny else []
        cmd += [f"--use={k}={v}" for k, v in ARTIFACTS.items()]
        subprocess.run(cmd, cwd=ROOT, check=True)
        return json.loads(out.read_text())


def anchor_tg(records: list[dict], threads: int) -> float | None:
    """The tg median of llama.cpp's C API at -t threads: the same system measured in both processes."""
    return next((r["median_ts"] for r in records if r["n_gen"] and r["system"] == ANCHOR
                 and r["harness"]["threads"] == str(threads)), None)


def best_per_system(records: list[dict]) -> dict:
    """For each system and test, the harness setting with the highest median t/s, and every setting tried."""
    out = {}
    for r in records:
        test = "pp" if r["n_prompt"] else "tg"
        entry = out.setdefault(r["system"], {"ours": r["ours"], "settings": {}, "best": {}})
        entry["settings"].setdefault(harness_text(r["harness"]), {})[test] = r["median_ts"]
        best = entry["best"].get(test)
        if best is None or r["median_ts"] > best["median_ts"]:
            entry["best"][test] = {"harness": r["harness"], "median_ts": r["median_ts"], "label": r["label"]}
    return out


def print_harness(search: dict) -> None:
    print("\nharness search: median t/s of every setting; * = the best of its system for that test")
    width = max(len(s) for s in search)
    for system, entry in search.items():
        for setting, medians in entry["settings"].items():
            cells = []
            for test in ("pp", "tg"):
                if test in medians:
                    star = "*" if harness_text(entry["best"][test]["harness"]) == setting else " "
                    cells.append(f"{test} {medians[test]:8.2f}{star}")
            print(f"  {system:<{width}}  {'  '.join(cells)}   [{setting}]")
            system = ""


# ---- the roofline -------------------------------------------------------------------------------
def roofline(search: dict, records: list[dict], bandwidth_gbs: float) -> list[dict]:
    """Each system's best decode against its ceiling: bandwidth / (artifact bytes + KV bytes) per token."""
    by_label = {r["label"]: r for r in records if r["n_gen"]}
    rows = []
    for system, entry in search.items():
        if "tg" not in entry["best"]:
            continue
        r = by_label[entry["best"]["tg"]["label"]]
        bytes_per_token = r["model_size"] + r["kv_cache_bytes"]
        ceiling = bandwidth_gbs * 1e9 / bytes_per_token
        rows.append({"system": system, "harness": r["harness"], "model_filename": Path(r["model_filename"]).name,
                     "bytes_per_token": bytes_per_token, "ceiling_ts": ceiling, "median_ts": r["median_ts"],
                     "fraction_of_ceiling": r["median_ts"] / ceiling})
    return rows


# ---- reporting ----------------------------------------------------------------------------------
def plot(search: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s, e in search.items() if "pp" in e["best"] and "tg" in e["best"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.6 * len(systems) + 1.5))
    for ax, test, name in ((axes[0], "pp", "prefill (pp) t/s"), (axes[1], "tg", "decode (tg) t/s")):
        values = [search[s]["best"][test]["median_ts"] for s in systems]
        ax.barh(systems, values, color=["tab:blue" if search[s]["ours"] else "tab:gray" for s in systems])
        ax.invert_yaxis()
        ax.set_title(name + " — median, each system at its best harness")
        for y, (s, v) in enumerate(zip(systems, values)):
            ax.text(v, y, f" {v:.0f} [{harness_text(search[s]['best'][test]['harness'])}]", va="center",
                    fontsize=7)
    axes[1].set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summarize(search: dict) -> dict:
    """Best of ours against the best peer, each system at its best harness; and ours against transformers."""
    summary = {}
    for test in ("pp", "tg"):
        best = {s: e["best"][test] for s, e in search.items() if test in e["best"]}
        ours = {s: b for s, b in best.items() if search[s]["ours"]}
        others = {s: b for s, b in best.items() if not search[s]["ours"]}
        if not ours:
            continue
        top = max(ours, key=lambda s: ours[s]["median_ts"])
        peer = max(others, key=lambda s: others[s]["median_ts"]) if others else None
        hf = next((b["median_ts"] for s, b in others.items() if "transformers" in s), None)
        summary[test] = {
            "best_ours": {"system": top, **ours[top]},
            "best_peer": {"system": peer, **others[peer]} if peer else None,
            "best_ours_over_best_peer": ours[top]["median_ts"] / others[peer]["median_ts"] if peer else None,
            "each_ours_over_transformers": {s: b["median_ts"] / hf for s, b in ours.items()} if hf else None}
        line = f"{test}: best of ours {top} {ours[top]['median_ts']:.2f} t/s [{harness_text(ours[top]['harness'])}]"
        if peer:
            line += (f"; best peer {peer} {others[peer]['median_ts']:.2f} t/s [{harness_text(others[peer]['harness'])}]"
                     f"; ratio {summary[test]['best_ours_over_best_peer']:.3f}")
        print(line)
    return summary


def print_best(search: dict) -> None:
    print("\neach system at its best harness (median t/s; the setting that won)")
    width = max(len(s) for s in search)
    for system, entry in search.items():
        cells = [f"{t} {b['median_ts']:8.2f} [{harness_text(b['harness'])}]" for t, b in entry["best"].items()]
        print(f"  {system:<{width}}  " + "   ".join(cells))


# ---- main --------------------------------------------------------------------------------------
def main():
    global WORK, RESULTS, STOCK_PTE, GENAI
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(p)
    p.add_argument("--harness", choices=("search", "fixed"), default="search",
                   help="search: every plausible harness setting per system, reporting the best (default); "
                        "fixed: -t threads, torch's pool held around execute, token-by-token feeding only")
    p.add_argument("--depth", type=int, default=4096, help="context of the quantized-KV decode test")
    p.add_argument("--depth-gen", type=int, default=32, help="decoded tokens at that depth")
    p.add_argument("--depth-reps", type=int, default=2)
    p.add_argument("--skip-depth", action="store_true", help="no depth test; the JSON keeps the last one measured")
    p.add_argument("--no-peers", action="store_true", help="ours only")
    p.add_argument("--export-only", action="store_true", help="build the checkpoint and artifacts, measure nothing")
    p.add_argument("--tiny", action="store_true", help="smoke-test this script on the tiny preset (minutes)")
    p.add_argument("--use", action="append", default=[], metavar="NAME=PATH",
                   help=f"take artifact NAME ({', '.join(EXPORTS)}) from PATH instead of exporting it")
    p.add_argument("--skip-export", action="store_true", help="measure only the artifacts that exist")
    p.add_argument("--depth-only", action="store_true", help="only the depth test, written to compare_depth.json")
    p.add_argument("--out", default="compare", help="results name: benchmarks/results/NAME.json and NAME.png")
    p.add_argument("--et-pool", choices=("threads", "default"), default="threads", help=argparse.SUPPRESS)
    p.add_argument("--records-only", type=Path, help=argparse.SUPPRESS)  # the child of default_pool_in_child
    args = p.parse_args()
    for item in args.use:
        name, _, path = item.partition("=")
        if name not in EXPORTS or not Path(path).exists():
            p.error(f"--use {item}: NAME must be one of {', '.join(EXPORTS)} and PATH must exist")
        ARTIFACTS[name] = Path(path)

    defaults = process_defaults()  # before any ExecuTorch method sizes the pool
    if args.tiny:  # its own work dir and results; the peers' artifacts built for the tiny model too
        WORK, RESULTS = WORK.with_name("compare-tiny"), RESULTS / "tiny"
        STOCK_PTE, GENAI = WORK / "et-tiny-8da4w.pte", WORK / "genai-int4"
        model_dir = tiny_checkpoint(WORK / "tiny")
    else:
        model_dir = checkpoint()
    # one export serves every run: room for the default depth test unless a deeper one is asked for
    max_seq_len = max(args.depth + max(args.n_prompt, args.n_gen) + 64, 4608)
    exports = {}
    if not args.skip_export:
        exports = export_all(model_dir, max_seq_len)
        if not args.no_peers:
            exports |= export_peers(model_dir)
    if args.export_only:
        return
    if args.records_only:  # the default-pool child: ExecuTorch systems and the anchor, records to a file
        args.no_peers = False
        cands = [c for c in candidates(model_dir, args, max_seq_len, defaults, "default")
                 if "executorch" in c.system or (c.system == ANCHOR and c.harness["threads"] == str(args.threads))]
        write_json(args.records_only, run_candidates(cands, args))
        return
    result = {"command": " ".join(sys.argv), "machine": cpu_info(), "load_average_1_5_15": os.getloadavg(),
              "harness": args.harness, "process_defaults": defaults, "exports": exports}

    if args.depth_only:
        result["depth"] = depth_test(args, max_seq_len)
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_json(RESULTS / "compare_depth.json", result)
        print(f"wrote {RESULTS / 'compare_depth.json'}")
        return

    print("measuring memory read bandwidth ...", flush=True)
    bw = read_bandwidth()
    result["bandwidth"] = bw

    result["artifacts"] = {name: str(artifact(name)) for name in EXPORTS if artifact(name).exists()}
    result["peer_artifacts"] = {"export_llama": str(STOCK_PTE), "genai": str(GENAI)}
    records = run_candidates(candidates(model_dir, args, max_seq_len, defaults, "threads"), args)
    if args.harness == "search" and defaults["executorch_pool"] != args.threads:
        print(f"ExecuTorch's threadpool at its default size ({defaults['executorch_pool']}), in a child process ...",
              flush=True)
        child = default_pool_in_child(args, defaults)
        result["default_pool_process"] = {
            "note": "ExecuTorch's pool cannot be resized under a loaded method, so its default size ran in a "
                    "second process; the llama.cpp C API anchor's tg median in each shows the drift between them",
            "anchor_tg_median_ts": {"this process": anchor_tg(records, args.threads),
                                    "default-pool process": anchor_tg(child, args.threads)}}
        records += [r for r in child if "executorch" in r["system"]]
    print(format_table(records))
    result["records"] = records
    search = best_per_system(records)
    result["harness_search"] = search
    print_harness(search)
    print_best(search)
    result["roofline"] = roofline(search, records, max(bw.values()))
    print(f"\nroofline: read bandwidth {bw['1_thread_gbs']:.1f} GB/s (1 thread), {bw['2_threads_gbs']:.1f} GB/s "
          f"(2 threads); decode ceiling = bandwidth / (artifact bytes + KV bytes)")
    for row in result["roofline"]:
        print(f"  {row['system']:<40} {row['bytes_per_token'] / 2**20:8.1f} MiB/token ceiling {row['ceiling_ts']:7.1f}"
              f" t/s  achieved {row['median_ts']:7.1f} t/s ({100 * row['fraction_of_ceiling']:.0f}%)")
    result["summary"] = summarize(search)

    out = RESULTS / f"{args.out}.json"
    if not args.skip_depth:
        result["depth"] = depth_test(args, max_seq_len)
    elif out.exists():  # keep the last measured depth test, marked as such
        previous = json.loads(out.read_text())
        if "depth" in previous:
            result["depth"] = previous["depth"] | {"from_run": previous.get("command", "an earlier run")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    plot(search, out.with_suffix(".png"), f"{'tiny' if args.tiny else 'lfm2-350m'} (random weights), "
         f"{args.threads} threads, {records[0]['cpu']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def depth_test(args, max_seq_len: int) -> dict:
    """Decode at `--depth` with each engine's unquantized and quantized KV cache."""
    pairs = {
        "llamacpp": [("q4_0.gguf", {"kv_cache": "f16"}), ("q4_0.gguf", {"kv_cache": "q8_0"}),
                     ("q4_0.gguf", {"kv_cache": "q4_0"})],
        "executorch": [("8da4w.pte", {}), ("8da4w-int8kv.pte", {})],
        "onnxruntime": [("int4.onnx", {}), ("int4-int8kv.onnx", {})],
    }
    openers = []
    need = args.depth + args.depth_gen + 1
    for engine, variants in list(pairs.items()):
        usable = []
        for name, options in variants:
            path = artifact(name)
            if path.exists():
                session = load(path, n_threads=args.threads, **options)
                if session.max_seq_len >= need:
                    usable.append((name, options))
                session.close()
        if len(usable) < 2:
            print(f"note: depth test of {engine} skipped: it needs two of {[n for n, _ in variants]} "
                  f"exported with max_seq_len >= {need}")
            del pairs[engine]
            continue
        pairs[engine] = usable
        for name, options in usable:
            openers.append((f"{name} {options}", lambda n=name, o=options: load(artifact(n), n_threads=args.threads,
                                                                               **o)))
    print(f"depth test: tg{args.depth_gen} @ d{args.depth}, {args.depth_reps} repetitions", flush=True)
    records = bench_interleaved(openers, n_prompt=0, n_gen=args.depth_gen, depth=args.depth,
                                repetitions=args.depth_reps)
    print(format_table(records))
    out = {"records": records, "ratios": {}}
    for engine in pairs:
        rows = [r for r in records if r["engine"] == engine]
        base = rows[0]
        for r in rows[1:]:
            ratio = {"kv_bytes_ratio": r["kv_cache_bytes"] / base["kv_cache_bytes"],
                     "decode_speed_ratio": r["median_ts"] / base["median_ts"]}
            out["ratios"][f"{engine} {r['kv_cache']} vs {base['kv_cache']}"] = ratio
            print(f"  {engine}: KV {r['kv_cache']} holds {ratio['kv_bytes_ratio']:.2f}x the bytes of "
                  f"{base['kv_cache']}, decodes at {ratio['decode_speed_ratio']:.2f}x its speed")
    return out


if __name__ == "__main__":
    main()
