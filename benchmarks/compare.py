"""One model in every format, side by side: our three engines vs llama.cpp and transformers, plus the roofline.

    python benchmarks/compare.py [-t 2] [-p 256] [-n 64] [-r 5] [--depth 4096] [--depth-gen 32]
                                 [--depth-reps 2] [--skip-depth] [--no-peers]

1. The lfm2-350m preset with random weights: the checkpoint benchmarks/bench_gguf.py builds under
   benchmarks/work/gguf/lfm2-350m (tokenizer trained to the full 65536 entries) — reused, not duplicated.
2. Exports (each once, in a child process, under benchmarks/work/compare/, max_seq_len covering the
   depth test) at comparable bit widths: GGUF q4_0 and q8_0, ExecuTorch 8da4w (fp32 and int8 KV),
   ONNX int4 (fp32 and int8 KV). The GGUF KV type is picked at load (f16 / q8_0 / q4_0).
3. Side by side, interleaved A B A B per repetition with runtime.bench (llama-bench method, `-t`
   threads each): ours, llama.cpp driven by its plain C API on the same q4_0 GGUF (llama-cpp-python's
   low-level bindings, no Session code), ExecuTorch's own export_llama .pte and onnxruntime-genai's
   builder model where benchmarks/bench_executorch.py / bench_onnx.py left them, and Hugging Face
   transformers' eager fp32 Lfm2ForCausalLM (its own cache, logits of the last position only).
4. Roofline: read bandwidth measured here (numpy sum over 1 GiB, best of 5, 1 and 2 threads), bytes per
   decoded token ≈ the artifact's bytes (every weight is read once per token; with tied embeddings the
   LM head reads the whole table) + its KV bytes; ceiling = bandwidth / bytes, and % achieved.
5. Depth test: decode after `--depth` tokens of context, each engine with its unquantized and its
   quantized KV cache: KV bytes ratio and decode speed ratio.

Writes benchmarks/results/compare.json and compare.png. The machine is shared: quote medians and ratios.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from bench_gguf import add_protocol_options, checkpoint, run_child  # noqa: E402  (the one builder of the 65536-token checkpoint)
from edge.files import write_json  # noqa: E402
from runtime import load  # noqa: E402
from runtime.bench import bench_interleaved, cpu_info, format_table  # noqa: E402
from runtime.session import Session  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "compare"
RESULTS = ROOT / "benchmarks" / "results"
EDGE = [sys.executable, "-m", "edge.cli"]
ET_PEER = ROOT / "benchmarks" / "work" / "executorch" / "et-lfm2_350m-8da4w.pte"
GENAI_PEER = ROOT / "benchmarks" / "work" / "onnx" / "genai-int4"

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


ARTIFACTS: dict[str, Path] = {}  # name -> path: WORK / name unless --use NAME=PATH points elsewhere


def artifact(name: str) -> Path:
    return ARTIFACTS.get(name, WORK / name)


def export_all(model_dir: Path, max_seq_len: int) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, (fmt, quant, kv, flags) in EXPORTS.items():
        out = artifact(name)
        if out.exists():
            continue
        print(f"exporting {name} ...", flush=True)
        stats[name] = run_child([*EDGE, "export", fmt, str(model_dir), "-o", str(out), "--quant", quant,
                                 "--kv-cache", kv, "--max-seq-len", str(max_seq_len), *flags])
    return stats


# ---- peers wrapped as Sessions, so they join the same interleaved rotation ------------------------
class RawLlamaSession(Session):
    """llama.cpp through its plain C API (llama_batch_get_one + llama_decode + llama_synchronize, as
    llama-bench does) on the same GGUF and context parameters as our session; no logits copied out."""
    engine = "llama.cpp (C API)"

    def __init__(self, path: Path, n_threads: int, max_seq_len: int):
        from bench_gguf import RawLlama

        ours = load(path, n_threads=n_threads, max_seq_len=max_seq_len)
        self.raw = RawLlama(ours, path)
        super().__init__(ours.config, None, max_seq_len, n_threads, quant=ours.quant, kv_cache=ours.kv_cache,
                         path=str(path))
        ours.close()

    def _forward(self, ids):
        self.raw.eval(ids)
        return np.zeros(0, np.float32)

    def _reset(self):
        self.raw.reset()

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * 2  # f16

    def close(self):
        self.raw.close()


class TransformersSession(Session):
    """Hugging Face transformers' eager Lfm2ForCausalLM in fp32 with its own hybrid cache."""
    engine = "transformers eager"

    def __init__(self, model_dir: Path, n_threads: int, max_seq_len: int):
        import torch
        from transformers import Lfm2ForCausalLM

        from edge.config import HybridConfig

        torch.set_num_threads(n_threads)
        self.torch = torch
        self.model = Lfm2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        self.cache = None
        super().__init__(HybridConfig.load(model_dir), None, max_seq_len, n_threads, quant="fp32",
                         kv_cache="fp32", path=str(model_dir))

    def _forward(self, ids):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), cache=self.cache, use_cache=True,
                             logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[0, -1].numpy()

    def _reset(self):
        self.cache = None

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * 4


def peer_openers(model_dir: Path, threads: int, max_seq_len: int, with_peers: bool) -> list:
    openers = [("llama.cpp C API q4_0", lambda: RawLlamaSession(artifact("q4_0.gguf"), threads, max_seq_len))]
    if not with_peers:
        return openers
    if ET_PEER.exists():
        from bench_executorch import StockPteSession

        from edge.config import HybridConfig
        openers.append(("executorch export_llama 8da4w",
                        lambda: StockPteSession(ET_PEER, HybridConfig.load(model_dir), threads)))
    else:
        print(f"note: {ET_PEER} missing (run benchmarks/bench_executorch.py); ExecuTorch's own export skipped")
    if not GENAI_PEER.exists():
        print(f"note: {GENAI_PEER} missing (run benchmarks/bench_onnx.py); onnxruntime-genai's model skipped")
    elif importlib.util.find_spec("onnxruntime_genai") is None:
        print("note: onnxruntime_genai is not installed (pip install -e '.[bench]'); its builder model skipped")
    else:
        openers.append(("onnxruntime-genai int4",
                        lambda: GenaiSession(GENAI_PEER, model_dir, threads, min(max_seq_len, 4096))))
    openers.append(("transformers eager fp32", lambda: TransformersSession(model_dir, threads, max_seq_len)))
    return openers


class GenaiSession(Session):
    """onnxruntime-genai's Generator over its builder's int4 model (it cannot rewind: a new one per reset)."""
    engine = "onnxruntime-genai"

    def __init__(self, path: Path, model_dir: Path, threads: int, max_seq_len: int):
        from bench_onnx import Genai

        from edge.config import HybridConfig
        self.genai = Genai(path, threads, max_seq_len)
        super().__init__(HybridConfig.load(model_dir), None, max_seq_len, threads, quant="int4", kv_cache="fp32",
                         path=str(path))

    def _forward(self, ids):
        self.genai.prefill(ids)
        return np.zeros(0, np.float32)

    def _reset(self):
        self.genai.reset()

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * 4


# ---- the roofline -------------------------------------------------------------------------------
def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Best-of-`repeats` bytes/s of summing a `gib` GiB float32 array, on 1 and on 2 threads."""
    data = np.ones(int(gib * 2**30) // 4, np.float32)
    data.sum()  # fault the pages in

    def best(n_threads):
        parts = np.array_split(data, n_threads)
        times = []
        for _ in range(repeats):
            threads = [threading.Thread(target=p.sum) for p in parts]  # numpy releases the GIL in reductions
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            times.append(time.perf_counter() - t0)
        return data.nbytes / min(times)

    return {"1_thread_gbs": best(1) / 1e9, "2_threads_gbs": best(2) / 1e9}


def roofline(records: list[dict], bandwidth_gbs: float) -> list[dict]:
    rows = []
    for r in records:
        if r["n_gen"] == 0:
            continue
        bytes_per_token = r["model_size"] + r["kv_cache_bytes"]
        ceiling = bandwidth_gbs * 1e9 / bytes_per_token
        rows.append({"model_filename": Path(r["model_filename"]).name, "engine": r["engine"],
                     "bytes_per_token": bytes_per_token, "ceiling_ts": ceiling, "median_ts": r["median_ts"],
                     "fraction_of_ceiling": r["median_ts"] / ceiling})
    return rows


# ---- main --------------------------------------------------------------------------------------
def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label_of(r) for r in records if r["n_prompt"]]
    pp = [r["median_ts"] for r in records if r["n_prompt"]]
    tg = [r["median_ts"] for r in records if r["n_gen"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(labels) + 1.5))
    for ax, values, title in ((axes[0], pp, "prefill (pp) t/s"), (axes[1], tg, "decode (tg) t/s")):
        ax.barh(labels, values, color="tab:blue")
        ax.invert_yaxis()
        ax.set_title(title + " — median")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}", va="center")
    axes[1].set_yticklabels([])
    fig.suptitle(f"lfm2-350m (random weights), {records[0]['n_threads']} threads, {records[0]['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


OUR_ENGINES = {"llamacpp", "executorch", "onnxruntime"}  # runtime.load's engines; everything else is a peer


def label_of(r: dict) -> str:
    who = "ours: " if r["engine"] in OUR_ENGINES else ""
    return f"{who}{r['engine']} {r['quant']} kv {r['kv_cache']}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(p)
    p.add_argument("--depth", type=int, default=4096, help="context of the quantized-KV decode test")
    p.add_argument("--depth-gen", type=int, default=32, help="decoded tokens at that depth")
    p.add_argument("--depth-reps", type=int, default=2)
    p.add_argument("--skip-depth", action="store_true", help="no depth test; the JSON keeps the last one measured")
    p.add_argument("--no-peers", action="store_true", help="only ours and llama.cpp's C API")
    p.add_argument("--export-only", action="store_true", help="build the checkpoint and artifacts, measure nothing")
    p.add_argument("--tiny", action="store_true", help="smoke-test this script on the tiny preset (minutes)")
    p.add_argument("--use", action="append", default=[], metavar="NAME=PATH",
                   help=f"take artifact NAME ({', '.join(EXPORTS)}) from PATH instead of exporting it")
    p.add_argument("--skip-export", action="store_true", help="measure only the artifacts that exist")
    p.add_argument("--depth-only", action="store_true", help="only the depth test, written to compare_depth.json")
    args = p.parse_args()
    for item in args.use:
        name, _, path = item.partition("=")
        if name not in EXPORTS or not Path(path).exists():
            p.error(f"--use {item}: NAME must be one of {', '.join(EXPORTS)} and PATH must exist")
        ARTIFACTS[name] = Path(path)

    global WORK, RESULTS
    if args.tiny:  # a separate work dir and result name, peers built for the 350M model left out
        WORK, RESULTS = WORK.with_name("compare-tiny"), RESULTS / "tiny"
        model_dir = WORK / "tiny"
        if not (model_dir / "tokenizer.json").exists():
            run_child([*EDGE, "init", str(model_dir), "--preset", "tiny"])
    else:
        model_dir = checkpoint()
    # one export serves every run: room for the default depth test unless a deeper one is asked for
    max_seq_len = max(args.depth + max(args.n_prompt, args.n_gen) + 64, 4608)
    exports = {} if args.skip_export else export_all(model_dir, max_seq_len)
    if args.export_only:
        return
    result = {"command": " ".join(sys.argv), "machine": cpu_info(), "exports": exports}

    if args.depth_only:
        result["depth"] = depth_test(args, max_seq_len)
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_json(RESULTS / "compare_depth.json", result)
        print(f"wrote {RESULTS / 'compare_depth.json'}")
        return

    print("measuring memory read bandwidth ...", flush=True)
    bw = read_bandwidth()
    result["bandwidth"] = bw
    bandwidth = max(bw.values())

    ours = [(name, (lambda n=name: load(artifact(n), n_threads=args.threads)))
            for name in ("q4_0.gguf", "q8_0.gguf", "8da4w-int8kv.pte", "int4.onnx") if artifact(name).exists()]
    result["artifacts"] = {name: str(artifact(name)) for name in EXPORTS if artifact(name).exists()}
    peers = peer_openers(model_dir, args.threads, max_seq_len, not (args.no_peers or args.tiny))
    if args.tiny:
        peers.append(("transformers eager fp32", lambda: TransformersSession(model_dir, args.threads, max_seq_len)))
    records = bench_interleaved(ours + peers,
                                n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions)
    print(format_table(records))
    result["records"] = records
    result["roofline"] = roofline(records, bandwidth)
    print(f"\nroofline: read bandwidth {bw['1_thread_gbs']:.1f} GB/s (1 thread), {bw['2_threads_gbs']:.1f} GB/s "
          f"(2 threads); decode ceiling = bandwidth / (artifact bytes + KV bytes)")
    for row in result["roofline"]:
        print(f"  {row['model_filename']:<28} {row['engine']:<26} {row['bytes_per_token'] / 2**20:8.1f} MiB/token "
              f"ceiling {row['ceiling_ts']:7.1f} t/s  achieved {row['median_ts']:7.1f} t/s "
              f"({100 * row['fraction_of_ceiling']:.0f}%)")
    summarize(records, result)

    if not args.skip_depth:
        result["depth"] = depth_test(args, max_seq_len)
    elif (RESULTS / "compare.json").exists():  # keep the last measured depth test, marked as such
        previous = json.loads((RESULTS / "compare.json").read_text())
        if "depth" in previous:
            result["depth"] = previous["depth"] | {"from_run": previous.get("command", "an earlier run")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "compare.json", result)
    plot(records, RESULTS / "compare.png")
    print(f"wrote {RESULTS / 'compare.json'} and {RESULTS / 'compare.png'}")


def summarize(records: list[dict], result: dict) -> None:
    """Ratios of medians against the best peer and against transformers eager."""
    med = {(r["model_filename"], r["engine"], r["quant"], r["kv_cache"], "pp" if r["n_prompt"] else "tg"):
           r["median_ts"] for r in records}
    ours_engines = OUR_ENGINES
    summary = {}
    for test in ("pp", "tg"):
        ours = {k: v for k, v in med.items() if k[-1] == test and k[1] in ours_engines}
        peers = {k: v for k, v in med.items() if k[-1] == test and k[1] not in ours_engines}
        best_ours = max(ours.items(), key=lambda kv: kv[1])
        best_peer = max(peers.items(), key=lambda kv: kv[1]) if peers else None
        hf = next((v for k, v in peers.items() if k[1] == "transformers eager"), None)
        summary[test] = {"best_ours": [Path(best_ours[0][0]).name, best_ours[1]],
                         "best_peer": [best_peer[0][1], best_peer[1]] if best_peer else None,
                         "best_ours_over_best_peer": best_ours[1] / best_peer[1] if best_peer else None,
                         "each_ours_over_transformers": {Path(k[0]).name: v / hf for k, v in ours.items()}
                         if hf else None}
        print(f"{test}: best of ours {summary[test]['best_ours']}, best peer {summary[test]['best_peer']}, "
              f"ratio {summary[test]['best_ours_over_best_peer']}")
    result["summary"] = summary


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
