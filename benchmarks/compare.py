"""One model in every format, side by side: ours vs each peer, each at its best harness, plus the roofline.

    python -m benchmarks.compare [--preset lfm2-350m|lfm2-700m|lfm2-1.2b] [-t 2] [-p 256] [-n 64] [-r 5]
                                 [--harness search|fixed] [--depth 4096] [--depth-gen 32] [--depth-reps 2]
                                 [--skip-depth] [--depth-only] [--no-peers] [--export-only] [--tiny]

1. The preset (default lfm2-350m) with random weights (benchmarks.common.checkpoint: tokenizer trained to
   the full 65536 entries), built once under benchmarks/work/gguf/PRESET.
2. Exports (each once, in a child process, under benchmarks/work/compare/ for lfm2-350m and
   benchmarks/work/compare-PRESET/ otherwise, max_seq_len covering the depth test) at comparable bit
   widths: GGUF q4_0 and q8_0, ExecuTorch 8da4w (fp32 and int8 KV), ONNX int4 (fp32 and int8 KV); the GGUF
   KV type is picked at load (f16 / q8_0 / q4_0). The peers' artifacts (benchmarks.peers), in the same
   folder and at the same context: ExecuTorch's own `export_llama --model lfm2_350m|lfm2_700m|lfm2_1_2b`
   .pte with its fp32 KV cache and with `--quantize_kv_cache` (int8), and onnxruntime-genai's builder
   model (`-p int4 -e cpu`) with its fp32 KV cache and with its int8 one
   (`kv_cache_quant_scheme=int8_per_channel`, calibrated scales: benchmarks.peers.build_genai_int8kv), and
   with `algo_config=rtn_last` (an 8-bit lm_head), its setting that meets docs/design.md §5's 4-bit bound
   (its default does not, nor does export_llama's 4-bit head: benchmarks/results/fidelity.md).
   `--export-only` builds all of these and measures nothing (with --skip-depth, only the depth-0 set).
3. Side by side at depth 0, interleaved A B A B per repetition with runtime.bench (llama-bench method):
   ours (runtime.load) and the peers wrapped as Sessions (benchmarks.peers): llama.cpp's plain C API on
   the same q4_0 GGUF, export_llama's .pte through executorch.runtime, onnxruntime-genai's Generator, and
   Hugging Face transformers' fp32 Lfm2ForCausalLM. `--harness search` (default) runs every system under
   each plausible harness setting (threads -t vs the engine's default; for ExecuTorch, ours and theirs,
   torch's pool held at one thread around `execute` or not, and the threadpool sized to -t or left at
   its default, which needs its own process; onnxruntime-genai fed token by token or decoding with its
   own `generate_next_token` loop, its K/V in one shared buffer appended in place (as our ONNX session keeps
   it) or in the builder's CPU default, a new present each step that the past is copied into;
   transformers' eager or sdpa attention; our llama.cpp session also at the
   C API's default thread count) and reports each system at its best setting, per test, saying which won;
   `--harness fixed` runs the first setting of each only. The summary gives best of ours over the best
   peer, and over the best peer setting within §5's 4-bit bound (UNDER_4BIT_BOUND: those measured under it).
4. Roofline: read bandwidth measured here (numpy sum over 1 GiB, best of 5, 1 and 2 threads), bytes per
   decoded token ≈ the artifact's bytes (every weight is read once per token; with tied embeddings the
   LM head reads the whole table) + its KV bytes; ceiling = bandwidth / bytes, and % achieved.
5. Depth test: decode (tg`--depth-gen`) after `--depth` tokens of context (refilled untimed before each
   repetition), one interleaved run of every system with each KV cache it offers, under the same harness
   settings as step 3: ours (q4_0.gguf with f16 / q8_0 / q4_0, 8da4w.pte / 8da4w-int8kv.pte, int4.onnx /
   int4-int8kv.onnx) against each peer at its long-context settings (llama.cpp C API with f16 and q8_0 K
   and V caches, q8_0 with flash attention on; export_llama fp32 and int8 KV; the genai builder fp32 and
   int8 KV; transformers left out: fp32 eager at depth 4096 would dominate the run's time). The JSON's
   depth.summary.tg gives best of ours, best peer and their ratio; depth.kv_ratios each system's quantized
   against its unquantized cache (KV bytes, decode speed).

Writes benchmarks/results/NAME.json and NAME.png, NAME `compare` for lfm2-350m and `compare-700m` /
`compare-1.2b` for the others (`--out NAME`); `--depth-only` writes NAME_depth.json.
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

from benchmarks import peers
from benchmarks.common import EDGE, ROOT, add_protocol_options, checkpoint, run_child, tiny_checkpoint
from benchmarks.common import RESULTS as RESULTS_ROOT
from benchmarks.common import WORK as WORK_ROOT
from benchmarks.peers import Candidate, harness_text, threads_label
from edge.config import PRESETS, HybridConfig
from edge.files import write_json
from runtime import load
from runtime.bench import bench_interleaved, cpu_info, format_table, read_bandwidth

WORK = WORK_ROOT / "compare"  # set per preset by main()
RESULTS = RESULTS_ROOT
PRESET = "lfm2-350m"

# name -> export arguments (format, quant, kv cache, extra flags)
EXPORTS = {
    "q4_0.gguf": ("gguf", "q4_0", "f16", []),
    "q8_0.gguf": ("gguf", "q8_0", "f16", []),
    "iq4_xs.gguf": ("gguf", "iq4_xs", "f16", []),  # the GGUF 4-bit pick (issue 27)
    "8da4w.pte": ("executorch", "8da4w", "fp32", ["--embedding-quant", "int4", "--prefill-chunk", "256"]),
    "8da4w-int8kv.pte": ("executorch", "8da4w", "int8", ["--embedding-quant", "int4", "--prefill-chunk", "256"]),
    "int4.onnx": ("onnx", "int4", "fp32", []),  # its default block (export/onnx.py)
    "int4-g32.onnx": ("onnx", "int4", "fp32", ["--group-size", "32"]),  # the default before issue 27
    "int4-int8kv.onnx": ("onnx", "int4", "int8", []),
}
# the peers' own artifacts: name -> KV cache (built by export_peers in the same folder)
PEER_ARTIFACTS = {"et-8da4w.pte": "fp32", "et-8da4w-int8kv.pte": "int8", "genai-int4": "fp32",
                  "genai-int4-int8kv": "int8", "genai-int4-rtn-last": "fp32"}
# Peer settings measured under docs/design.md §5's 4-bit bound (mean cos 0.98 vs transformers) on the random
# transformers-made checkpoint of benchmarks/bench_fidelity.py: the summary also ranks peers without them.
# Both peers' defaults keep a 4-bit lm_head: the genai builder's (symmetric blocks of 32) 0.976 / min 0.964,
# export_llama's (hqq groups of 32) 0.979 / 0.972; the builder's rtn_last (8-bit head) meets it (0.982 / 0.975),
# as do llama.cpp's q4_0 (0.985) and all of our defaults (tests/test_fidelity.py).
UNDER_4BIT_BOUND = {"peer: onnxruntime-genai int4": "mean cos 0.976", "peer: executorch export_llama 8da4w": "mean cos 0.979"}
ANCHOR = "peer: llama.cpp C API q4_0"  # measured in both processes when the ExecuTorch pool needs a second one
ANCHOR_SYSTEMS = (ANCHOR, f"{ANCHOR} kv f16")  # its name at depth 0 and in the depth test
OURS = ("q4_0.gguf", "iq4_xs.gguf", "q8_0.gguf", "8da4w-int8kv.pte", "int4.onnx", "int4-g32.onnx")  # side by side
# the depth test: (artifact, KV cache) of ours; the first of each engine is its unquantized cache
DEPTH_OURS = [("q4_0.gguf", "f16"), ("q4_0.gguf", "q8_0"), ("q4_0.gguf", "q4_0"), ("8da4w.pte", "fp32"),
              ("8da4w-int8kv.pte", "int8"), ("int4.onnx", "fp32"), ("int4-int8kv.onnx", "int8")]
DEPTH_0_EXPORTS = (*OURS, "et-8da4w.pte", "genai-int4", "genai-int4-rtn-last")  # what --skip-depth needs

ARTIFACTS: dict[str, Path] = {}  # name -> path: WORK / name unless --use NAME=PATH points elsewhere


def artifact(name: str) -> Path:
    return ARTIFACTS.get(name, WORK / name)


def results_name(preset: str) -> str:
    """`compare` for lfm2-350m (and the tiny smoke run), so earlier files keep their meaning."""
    return "compare" if preset in ("lfm2-350m", "tiny") else f"compare-{preset.removeprefix('lfm2-')}"


def export_all(model_dir: Path, max_seq_len: int, names=EXPORTS) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name in names:
        if name not in EXPORTS:
            continue
        fmt, quant, kv, flags = EXPORTS[name]
        out = artifact(name)
        if out.exists():
            continue
        print(f"exporting {name} ...", flush=True)
        stats[name] = run_child([*EDGE, "export", fmt, str(model_dir), "-o", str(out), "--quant", quant,
                                 "--kv-cache", kv, "--max-seq-len", str(max_seq_len), *flags])
    return stats


def export_peers(model_dir: Path, max_seq_len: int, names=PEER_ARTIFACTS) -> dict:
    """The peers' own artifacts at the same context as ours, built where missing (the genai int8 model
    after its fp32 one, whose KV it calibrates on); a peer whose toolchain is absent or fails is left out."""
    model = peers.EXPORT_LLAMA_MODELS[PRESET]
    builds = {
        "et-8da4w.pte": lambda out: peers.export_stock_pte(model_dir, out, model, peers.export_llama_flags(max_seq_len)),
        "et-8da4w-int8kv.pte": lambda out: peers.export_stock_pte(model_dir, out, model,
                                                                  peers.export_llama_flags(max_seq_len, True)),
        "genai-int4": lambda out: peers.build_genai(model_dir, out),
        "genai-int4-int8kv": lambda out: peers.build_genai_int8kv(model_dir, out, artifact("genai-int4")),
        "genai-int4-rtn-last": lambda out: peers.build_genai(model_dir, out, "--extra_options", "algo_config=rtn_last"),
    }
    has_genai = importlib.util.find_spec("onnxruntime_genai") is not None
    stats = {}
    for name in names:
        out = artifact(name)
        if name not in builds or out.exists() or (name.startswith("genai") and not has_genai):
            continue
        if name == "genai-int4-int8kv" and not artifact("genai-int4").exists():
            continue
        print(f"building the peer's {name} ...", flush=True)
        try:
            stats[name] = builds[name](out)
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


def candidates(model_dir: Path, args, max_seq_len: int, defaults: dict, et_pool: str,
               depth: bool = False) -> list[Candidate]:
    """Ours and each peer under each harness setting; the first setting of each is `--harness fixed`'s.

    et_pool "threads": ExecuTorch's threadpool sized to -t; "default": left at its size (another process:
    the pool is process-wide and cannot be resized once a method is loaded). depth: the depth test's set,
    every system with each of its KV caches, its name ending in "kv TYPE"."""
    t = args.threads
    fixed = args.harness == "fixed"
    et_threads = t if et_pool == "threads" else None
    pool = str(t) if et_pool == "threads" else f"default ({defaults['executorch_pool']})"

    def settings(values):
        return values[:1] if fixed else values

    def named(system, kv):
        return f"{system} kv {kv}" if depth else system

    def held(session_open, hold):  # the torch-thread hold around ExecuTorch's execute, on or off
        return lambda: peers.Harnessed(session_open(), lambda: peers.torch_thread_hold(hold == "on"))

    out = []
    for name, kv in DEPTH_OURS if depth else [(n, None) for n in OURS]:
        path = artifact(name)
        if not path.exists():
            continue
        if name.endswith(".pte"):
            for hold in settings(["on", "off"]):
                out.append(Candidate(named(f"ours: executorch {name}", kv), {"pool": pool, "torch hold": hold},
                                     held(lambda p=path: load(p, n_threads=et_threads), hold)))
            continue
        default = defaults["ours llama.cpp"] if name.endswith(".gguf") else None  # None: ORT's own default
        engine = "llamacpp" if name.endswith(".gguf") else "onnxruntime"
        options = {"kv_cache": kv} if kv and name.endswith(".gguf") else {}
        threads = peers.thread_settings(t, default)
        if engine == "llamacpp" and defaults["llama.cpp C API"] not in (t, default):
            threads.append(defaults["llama.cpp C API"])  # the thread counts the C API anchor gets, for one engine
        for n in settings(threads):
            out.append(Candidate(named(f"ours: {engine} {name}", kv), {"threads": threads_label(n, default)},
                                 lambda p=path, n=n, o=options: load(p, n_threads=n, **o)))
    if args.no_peers:
        return out
    q4 = artifact("q4_0.gguf")
    if q4.exists():
        default = defaults["llama.cpp C API"]
        for kv in ("f16", "q8_0") if depth else ("f16",):
            for n in settings(peers.thread_settings(t, default)):
                out.append(Candidate(named(ANCHOR, kv), {"threads": threads_label(n, default)},
                                     lambda n=n, kv=kv: peers.RawLlamaSession(q4, n, max_seq_len, kv)))
    config = HybridConfig.load(model_dir)
    for name in ("et-8da4w.pte", "et-8da4w-int8kv.pte") if depth else ("et-8da4w.pte",):
        path, kv = artifact(name), PEER_ARTIFACTS[name]
        if not path.exists():
            print(f"note: {path} missing; ExecuTorch's own export with {kv} KV skipped")
            continue
        for hold in settings(["on", "off"]):
            out.append(Candidate(named("peer: executorch export_llama 8da4w", kv), {"pool": pool, "torch hold": hold},
                                 held(lambda p=path, kv=kv: peers.StockPteSession(p, config, et_threads, kv), hold)))
    for name in ("genai-int4", "genai-int4-int8kv") if depth else ("genai-int4", "genai-int4-rtn-last"):
        path, kv = artifact(name), PEER_ARTIFACTS[name]
        system = "peer: onnxruntime-genai int4" + (" rtn_last" if name.endswith("-rtn-last") else "")
        if not path.exists() or importlib.util.find_spec("onnxruntime_genai") is None:
            print(f"note: {path} or onnxruntime_genai missing (pip install -e '.[bench]'); its builder model skipped")
            continue
        for n in settings(peers.thread_settings(t, None)):
            # first (--harness fixed): genai's own decode loop over one shared buffer, its fastest decode here
            for loop in settings(["generate", "append"]):
                for buffer in settings(["shared", "copy"]):  # copy: the builder's genai_config default on CPU
                    out.append(Candidate(named(system, kv),
                                         {"threads": threads_label(n, None), "loop": loop, "kv buffer": buffer},
                                         lambda p=path, n=n, loop=loop, b=buffer: peers.GenaiSession(
                                             p, model_dir, n, max_seq_len, loop, share_buffer=b == "shared")))
    if not depth and importlib.util.find_spec("transformers") is not None:
        default = defaults["torch"]
        for attention in settings(["eager", "sdpa"]):
            for n in settings(peers.thread_settings(t, default)):
                out.append(Candidate("peer: transformers fp32", {"attention": attention,
                                                                 "threads": threads_label(n, default)},
                                     lambda n=n, a=attention: peers.TransformersSession(model_dir, n, max_seq_len, a)))
    return out


def run_candidates(cands: list[Candidate], args, depth: bool = False) -> list[dict]:
    """One interleaved run: depth 0 pp`-p` and tg`-n`, or the depth test's tg`--depth-gen` at `--depth`."""
    test = (dict(n_prompt=0, n_gen=args.depth_gen, depth=args.depth, repetitions=args.depth_reps) if depth else
            dict(n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions))
    records = bench_interleaved([(c.label, c.open) for c in cands], **test)
    by_label = {c.label: c for c in cands}
    for r in records:
        c = by_label[r["label"]]
        r.update(system=c.system, harness=c.harness, ours=c.ours)
    return records


def default_pool_in_child(args, depth: bool = False) -> list[dict]:
    """The ExecuTorch systems with the threadpool at its default size, in a child process (the pool cannot
    change size under a loaded method), next to llama.cpp's C API at -t as an anchor across processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        cmd = [sys.executable, "-m", "benchmarks.compare", "--et-pool", "default", "--records-only", str(out),
               "--preset", args.preset, "-t", str(args.threads), "-p", str(args.n_prompt), "-n", str(args.n_gen),
               "-r", str(args.repetitions), "--harness", args.harness, "--skip-export", "--depth", str(args.depth),
               "--depth-gen", str(args.depth_gen), "--depth-reps", str(args.depth_reps),
               "--depth-only" if depth else "--skip-depth"]
        cmd += ["--tiny"] if args.tiny else []
        cmd += [f"--use={k}={v}" for k, v in ARTIFACTS.items()]
        subprocess.run(cmd, cwd=ROOT, check=True)
        return json.loads(out.read_text())


def anchor_tg(records: list[dict], threads: int) -> float | None:
    """The tg median of llama.cpp's C API (f16 KV) at -t threads: the same system measured in both processes."""
    return next((r["median_ts"] for r in records if r["n_gen"] and r["system"] in ANCHOR_SYSTEMS
                 and r["harness"]["threads"] == str(threads)), None)


def measure(model_dir: Path, args, max_seq_len: int, defaults: dict, depth: bool = False) -> dict:
    """One interleaved run of every candidate (plus, under --harness search, ExecuTorch's default-size
    pool in a child process); its records and each system at its best harness."""
    out = {}
    records = run_candidates(candidates(model_dir, args, max_seq_len, defaults, "threads", depth), args, depth)
    if args.harness == "search" and defaults["executorch_pool"] != args.threads:
        print(f"ExecuTorch's threadpool at its default size ({defaults['executorch_pool']}), in a child process ...",
              flush=True)
        child = default_pool_in_child(args, depth)
        out["default_pool_process"] = {
            "note": "ExecuTorch's pool cannot be resized under a loaded method, so its default size ran in a "
                    "second process; the llama.cpp C API anchor's tg median in each shows the drift between them",
            "anchor_tg_median_ts": {"this process": anchor_tg(records, args.threads),
                                    "default-pool process": anchor_tg(child, args.threads)}}
        records += [r for r in child if "executorch" in r["system"]]
    print(format_table(records))
    out["records"] = records
    out["harness_search"] = best_per_system(records)
    print_harness(out["harness_search"])
    print_best(out["harness_search"])
    return out


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
        faithful = {s: b for s, b in others.items() if s.rsplit(" kv ", 1)[0] not in UNDER_4BIT_BOUND}
        peer = max(others, key=lambda s: others[s]["median_ts"]) if others else None
        peer_in_bound = max(faithful, key=lambda s: faithful[s]["median_ts"]) if faithful else None
        hf = next((b["median_ts"] for s, b in others.items() if "transformers" in s), None)
        summary[test] = {
            "best_ours": {"system": top, **ours[top]},
            "best_peer": {"system": peer, **others[peer]} if peer else None,
            "best_ours_over_best_peer": ours[top]["median_ts"] / others[peer]["median_ts"] if peer else None,
            "best_peer_within_4bit_bound": ({"system": peer_in_bound, **faithful[peer_in_bound]}
                                            if peer_in_bound else None),
            "best_ours_over_best_peer_within_4bit_bound": (ours[top]["median_ts"] / faithful[peer_in_bound]["median_ts"]
                                                           if peer_in_bound else None),
            "each_ours_over_transformers": {s: b["median_ts"] / hf for s, b in ours.items()} if hf else None}
        line = f"{test}: best of ours {top} {ours[top]['median_ts']:.2f} t/s [{harness_text(ours[top]['harness'])}]"
        for label, best, key in (("best peer", peer, "best_ours_over_best_peer"),
                                 ("best peer within §5's 4-bit bound", peer_in_bound,
                                  "best_ours_over_best_peer_within_4bit_bound")):
            if best:
                line += (f"; {label} {best} {others[best]['median_ts']:.2f} t/s "
                         f"[{harness_text(others[best]['harness'])}]; ratio {summary[test][key]:.3f}")
        print(line)
    return summary


def print_best(search: dict) -> None:
    print("\neach system at its best harness (median t/s; the setting that won)")
    width = max(len(s) for s in search)
    for system, entry in search.items():
        cells = [f"{t} {b['median_ts']:8.2f} [{harness_text(b['harness'])}]" for t, b in entry["best"].items()]
        print(f"  {system:<{width}}  " + "   ".join(cells))


def kv_ratios(search: dict, records: list[dict]) -> dict:
    """Each depth-test system's quantized KV cache against the same system's unquantized one (the first
    listed, f16 or fp32), each at its best tg harness: KV bytes ratio and decode speed ratio."""
    by_label = {r["label"]: r for r in records}
    best = {s: by_label[e["best"]["tg"]["label"]] for s, e in search.items() if "tg" in e["best"]}
    families: dict[str, list[str]] = {}
    for system in best:
        families.setdefault(system.rsplit(" kv ", 1)[0], []).append(system)
    out = {}
    for family, systems in families.items():
        base = best[systems[0]]
        for system in systems[1:]:
            r = best[system]
            ratio = {"kv_bytes_ratio": r["kv_cache_bytes"] / base["kv_cache_bytes"],
                     "decode_speed_ratio": r["median_ts"] / base["median_ts"]}
            out[f"{family}: kv {r['kv_cache']} vs {base['kv_cache']}"] = ratio
            print(f"  {family}: KV {r['kv_cache']} holds {ratio['kv_bytes_ratio']:.2f}x the bytes of "
                  f"{base['kv_cache']}, decodes at {ratio['decode_speed_ratio']:.2f}x its speed")
    return out


def depth_test(model_dir: Path, args, max_seq_len: int, defaults: dict) -> dict:
    """Decode at `--depth`: every system with each of its KV caches, each under its harness settings, one
    interleaved run; best of ours against the best peer, and each system's quantized-KV ratios."""
    print(f"depth test: tg{args.depth_gen} @ d{args.depth}, {args.depth_reps} repetitions", flush=True)
    out = measure(model_dir, args, max_seq_len, defaults, depth=True)
    out["test"] = {"depth": args.depth, "n_gen": args.depth_gen, "repetitions": args.depth_reps}
    out["summary"] = summarize(out["harness_search"])
    out["kv_ratios"] = kv_ratios(out["harness_search"], out["records"])
    return out


# ---- main --------------------------------------------------------------------------------------
def main():
    global WORK, RESULTS, PRESET
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(p)
    p.add_argument("--preset", choices=[n for n in PRESETS if n != "tiny"], default="lfm2-350m",
                   help="the model measured (default lfm2-350m; --tiny for the smoke run)")
    p.add_argument("--harness", choices=("search", "fixed"), default="search",
                   help="search: every plausible harness setting per system, reporting the best (default); "
                        "fixed: -t threads, torch's pool held around execute, token-by-token feeding only")
    p.add_argument("--depth", type=int, default=4096, help="context of the depth test (default 4096)")
    p.add_argument("--depth-gen", type=int, default=32, help="decoded tokens at that depth")
    p.add_argument("--depth-reps", type=int, default=2)
    p.add_argument("--skip-depth", action="store_true", help="no depth test; the JSON keeps the last one measured")
    p.add_argument("--no-peers", action="store_true", help="ours only")
    p.add_argument("--export-only", action="store_true", help="build the checkpoint and artifacts, measure nothing")
    p.add_argument("--tiny", action="store_true", help="smoke-test this script on the tiny preset (minutes)")
    p.add_argument("--use", action="append", default=[], metavar="NAME=PATH",
                   help=f"take artifact NAME ({', '.join([*EXPORTS, *PEER_ARTIFACTS])}) from PATH instead of "
                        f"building it")
    p.add_argument("--skip-export", action="store_true", help="measure only the artifacts that exist")
    p.add_argument("--depth-only", action="store_true", help="only the depth test, written to NAME_depth.json")
    p.add_argument("--out", help="results name: benchmarks/results/NAME.json and NAME.png (default compare for "
                                 "lfm2-350m, compare-700m / compare-1.2b for the others)")
    p.add_argument("--et-pool", choices=("threads", "default"), default="threads", help=argparse.SUPPRESS)
    p.add_argument("--records-only", type=Path, help=argparse.SUPPRESS)  # the child of default_pool_in_child
    args = p.parse_args()
    for item in args.use:
        name, _, path = item.partition("=")
        if name not in (*EXPORTS, *PEER_ARTIFACTS) or not Path(path).exists():
            p.error(f"--use {item}: NAME must be one of {', '.join([*EXPORTS, *PEER_ARTIFACTS])} and PATH must exist")
        ARTIFACTS[name] = Path(path)

    defaults = process_defaults()  # before any ExecuTorch method sizes the pool
    PRESET = "tiny" if args.tiny else args.preset
    if args.tiny:  # its own work dir and results; the peers' artifacts built for the tiny model too
        WORK, RESULTS = WORK_ROOT / "compare-tiny", RESULTS_ROOT / "tiny"
        model_dir = tiny_checkpoint(WORK / "tiny")
    else:
        WORK = WORK_ROOT / ("compare" if PRESET == "lfm2-350m" else f"compare-{PRESET}")
        model_dir = checkpoint(PRESET)
    name = args.out or results_name(PRESET)
    # one export serves every run: room for the default depth test unless a deeper one is asked for
    max_seq_len = max(args.depth + max(args.n_prompt, args.n_gen, args.depth_gen + 1) + 64, 4608)
    exports = {}
    if not args.skip_export:
        needed = DEPTH_0_EXPORTS if args.skip_depth else (*EXPORTS, *PEER_ARTIFACTS)
        exports = export_all(model_dir, max_seq_len, [n for n in needed if n in EXPORTS])
        if not args.no_peers:
            exports |= export_peers(model_dir, max_seq_len, [n for n in needed if n in PEER_ARTIFACTS])
    if args.export_only:
        return
    if args.records_only:  # the default-pool child: ExecuTorch systems and the anchor, records to a file
        args.no_peers = False
        depth = args.depth_only
        cands = [c for c in candidates(model_dir, args, max_seq_len, defaults, "default", depth)
                 if "executorch" in c.system or (c.system in ANCHOR_SYSTEMS
                                                 and c.harness["threads"] == str(args.threads))]
        write_json(args.records_only, run_candidates(cands, args, depth))
        return
    result = {"command": " ".join(sys.argv), "preset": PRESET, "checkpoint": str(model_dir), "machine": cpu_info(),
              "load_average_1_5_15": os.getloadavg(), "harness": args.harness, "process_defaults": defaults,
              "exports": exports, "max_seq_len": max_seq_len,
              "artifacts": {n: str(artifact(n)) for n in [*EXPORTS, *PEER_ARTIFACTS] if artifact(n).exists()},
              "export_llama_model": peers.EXPORT_LLAMA_MODELS[PRESET],
              "genai_int8_kv": f"kv_cache_quant_scheme={peers.GENAI_KV_SCHEME} (benchmarks.peers.build_genai_int8kv)"}
    RESULTS.mkdir(parents=True, exist_ok=True)

    if args.depth_only:
        result["depth"] = depth_test(model_dir, args, max_seq_len, defaults)
        write_json(RESULTS / f"{name}_depth.json", result)
        print(f"wrote {RESULTS / f'{name}_depth.json'}")
        return

    print("measuring memory read bandwidth ...", flush=True)
    bw = read_bandwidth()
    result["bandwidth"] = bw
    result |= measure(model_dir, args, max_seq_len, defaults)
    search, records = result["harness_search"], result["records"]
    result["roofline"] = roofline(search, records, max(bw.values()))
    print(f"\nroofline: read bandwidth {bw['1_thread_gbs']:.1f} GB/s (1 thread), {bw['2_threads_gbs']:.1f} GB/s "
          f"(2 threads); decode ceiling = bandwidth / (artifact bytes + KV bytes)")
    for row in result["roofline"]:
        print(f"  {row['system']:<40} {row['bytes_per_token'] / 2**20:8.1f} MiB/token ceiling {row['ceiling_ts']:7.1f}"
              f" t/s  achieved {row['median_ts']:7.1f} t/s ({100 * row['fraction_of_ceiling']:.0f}%)")
    result["summary"] = summarize(search)

    out = RESULTS / f"{name}.json"
    plot(search, out.with_suffix(".png"), f"{PRESET} (random weights), {args.threads} threads, {records[0]['cpu']}")
    if not args.skip_depth:
        write_json(out, result)  # depth 0 is kept should the depth test fail
        result["depth"] = depth_test(model_dir, args, max_seq_len, defaults)
    elif out.exists():  # keep the last measured depth test, marked as such
        previous = json.loads(out.read_text())
        if "depth" in previous:
            result["depth"] = previous["depth"] | {"from_run": previous.get("command", "an earlier run")}
    write_json(out, result)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
