"""Decode cost against context: the lfm2-350m hybrid next to an all-attention model of the same size.

    python -m benchmarks.bench_context [-t 2] [-n 16] [-r 2] [--depths 0 1024 2048 4096 8192]

Why: a hybrid keeps a KV cache in 6 of its 16 layers (the gated short convolutions hold 2 columns of state
each, whatever the context), so its decode slows and its cache grows far less with context than a
transformer's. This measures that, in each engine, with and without the 8-bit cache.

1. Checkpoints under benchmarks/work/context/ (random weights, built once and reused):
   `hybrid`    = `edge init --preset lfm2-350m` (attention at layers 2,5,8,10,12,14);
   `attention` = the same width, depth, heads (16 q / 8 kv) and vocab with 15 of its 16 layers attention,
                 its FFN widened so that the parameter count matches: the transformer a user would otherwise
                 deploy at this size. Layer 0 stays a conv layer because llama.cpp's lfm2 graph aborts on a
                 model without recurrent state; the same model runs in every engine. It shares the
                 hybrid's tokenizer.
2. Each is exported at 4-bit weights to every format, with the plain and the 8-bit KV cache (GGUF picks
   its cache type at load: f16 / q8_0), max_seq_len covering the deepest test.
3. Per engine, the four artifacts run interleaved (runtime.bench.bench_depths): per repetition each is
   filled once, step by step to every depth, and `-n` single-token decodes are timed at each.

Writes benchmarks/results/context.json and context.png (decode ms/token and KV-cache MiB against depth).
The machine may be shared: compare curves measured in the same run, not across runs.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work" / "context"
RESULTS = ROOT / "benchmarks" / "results"
EDGE = [sys.executable, "-m", "edge.cli"]

# engine -> (format, suffix, 4-bit quant, [(label, KV cache at export, load options)])
ENGINES = {
    "llamacpp": ("gguf", ".gguf", "q4_0", [("f16", "f16", {"kv_cache": "f16"}),
                                           ("q8_0", "f16", {"kv_cache": "q8_0"})]),
    "executorch": ("executorch", ".pte", "8da4w", [("fp32", "fp32", {}), ("int8", "int8", {})]),
    "onnxruntime": ("onnx", ".onnx", "int4", [("fp32", "fp32", {}), ("int8", "int8", {})]),
}


def matched_attention_config(hybrid):
    """Attention everywhere but layer 0 (see above), FFN width chosen so the parameter count is the hybrid's
    (to within one step of the FFN's rounding)."""
    base = hybrid.replace(layer_types=["conv"] + ["full_attention"] * (hybrid.num_hidden_layers - 1))
    candidates = (base.replace(intermediate_size=ff) for ff in range(hybrid.intermediate_size,
                                                                     hybrid.intermediate_size * 2, 8))
    return min(candidates, key=lambda c: abs(c.n_params() - hybrid.n_params()))


def checkpoints(seed: int) -> dict[str, Path]:
    hybrid, attention = WORK / "hybrid", WORK / "attention"
    if not (hybrid / "model.safetensors").exists():
        subprocess.run([*EDGE, "init", str(hybrid), "--preset", "lfm2-350m", "--seed", str(seed)], check=True)
    if not (attention / "model.safetensors").exists():
        from edge.checkpoint import save_model
        from edge.config import HybridConfig
        from edge.model import HybridLM

        config = matched_attention_config(HybridConfig.load(hybrid))
        save_model(HybridLM(config).init_weights(seed), attention)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (hybrid / name).exists():
                shutil.copy(hybrid / name, attention / name)
    return {"hybrid": hybrid, "attention": attention}


def artifacts(models: dict[str, Path], engines: list[str], max_seq_len: int) -> dict[tuple[str, str, str], tuple[Path, dict]]:
    """(model, engine, kv label) -> (artifact, load options); each export once, in a child process."""
    out = {}
    for model, model_dir in models.items():
        for engine in engines:
            fmt, suffix, quant, caches = ENGINES[engine]
            for label, kv, options in caches:
                path = WORK / f"{model}-{quant}-kv{kv}-ctx{max_seq_len}{suffix}"
                if not path.exists():
                    subprocess.run([*EDGE, "export", fmt, str(model_dir), "-o", str(path), "--quant", quant,
                                    "--kv-cache", kv, "--max-seq-len", str(max_seq_len)], check=True)
                out[(model, engine, label)] = (path, options)
    return out


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in ENGINES if any(r["engine"] == e for r in records)]
    fig, axes = plt.subplots(1, len(engines) + 1, figsize=(5 * (len(engines) + 1), 4.2), squeeze=False)
    axes = axes[0]
    styles = {"hybrid": "-", "attention": "--"}

    def curves(ax, engine, value):
        """One line per (model, KV cache) of `engine`, `value(record)` against depth."""
        for (model, kv) in sorted({(r["model"], r["kv_label"]) for r in records if r["engine"] == engine}):
            rs = sorted((r for r in records if (r["engine"], r["model"], r["kv_label"]) == (engine, model, kv)),
                        key=lambda r: r["n_depth"])
            ax.plot([r["n_depth"] for r in rs], [value(r) for r in rs], styles[model], marker="o",
                    label=f"{model}, KV {kv}")

    for ax, engine in zip(axes, engines):
        curves(ax, engine, lambda r: r["ms_per_token"])
        ax.set(title=f"{engine}: decode", xlabel="context depth (tokens)", ylabel="ms / token")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax, first = axes[-1], engines[0]
    curves(ax, first, lambda r: r["kv_cache_bytes"] / 2**20)
    ax.set(title=f"KV cache ({first}; grouped, 8 kv heads)", xlabel="context depth (tokens)", ylabel="MiB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"lfm2-350m hybrid vs all-attention at equal parameters, 4-bit weights ({records[0]['cpu']}, "
                 f"{records[0]['n_threads']} threads)")
    fig.tight_layout()
    from edge.files import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-t", "--threads", type=int, default=2, help="threads per engine (default 2)")
    p.add_argument("-n", "--n-gen", type=int, default=16, help="decodes timed at each depth (default 16)")
    p.add_argument("-r", "--repetitions", type=int, default=2, help="fills per artifact (default 2)")
    p.add_argument("--depths", type=int, nargs="+", default=[0, 1024, 2048, 4096, 8192])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from edge.config import HybridConfig
    from edge.files import write_json
    from runtime import load
    from runtime.bench import bench_depths

    models = checkpoints(args.seed)
    max_seq_len = -(-(max(args.depths) + args.n_gen + 1) // 256) * 256
    built = artifacts(models, args.engines, max_seq_len)
    records = []
    for engine in args.engines:
        keys = {f"{model} {engine} kv {kv}": (model, kv) for (model, e, kv) in built if e == engine}
        openers = [(label, lambda p=built[(m, engine, kv)][0], o=built[(m, engine, kv)][1]:
                    load(p, n_threads=args.threads, **o)) for label, (m, kv) in keys.items()]
        for r in bench_depths(openers, depths=args.depths, n_gen=args.n_gen, repetitions=args.repetitions,
                              seed=args.seed):
            model, kv = keys[r["label"]]
            records.append({**r, "model": model, "kv_label": kv})
    print(f"{'model':10} {'engine':12} {'KV':5} " + " ".join(f"{'d' + str(d):>9}" for d in sorted(set(args.depths))))
    for (model, engine, kv) in built:
        rs = sorted((r for r in records if (r["model"], r["engine"], r["kv_label"]) == (model, engine, kv)),
                    key=lambda r: r["n_depth"])
        if rs:
            print(f"{model:10} {engine:12} {kv:5} " + " ".join(f"{r['ms_per_token']:7.1f}ms" for r in rs))
    params = {m: HybridConfig.load(d).n_params() for m, d in models.items()}
    write_json(RESULTS / "context.json", {"command": " ".join(sys.argv), "params": params,
                                          "max_seq_len": max_seq_len, "records": records})
    plot(records, RESULTS / "context.png")
    print(f"wrote {RESULTS / 'context.json'} and context.png")


if __name__ == "__main__":
    main()
