"""ExecuTorch: our .pte vs ExecuTorch's own LFM2 export path, lfm2-350m preset with random weights.

    python benchmarks/bench_executorch.py [-t 2] [-p 256] [-n 64] [-r 5] [--skip-export]

1. The checkpoint is bench_gguf's (benchmarks/work/gguf/lfm2-350m, `edge init --preset lfm2-350m` with the
   tokenizer trained to the full 65536 tokens on the Python standard library's source); built if missing.
2. Ours: `edge export executorch --quant 8da4w --kv-cache int8 --embedding-quant int4 --group-size 32
   --max-seq-len 512 --prefill-chunk 256` in a child process (wall time, peak RSS); the int8 cache is read
   by our edge::int8_sdpa kernel (runtime/kernels/int8_sdpa.cpp).
3. Theirs: the same weights through `executorch.examples.models.lfm2.convert_weights`, then
   `python -m executorch.examples.models.llama.export_llama --model lfm2_350m -qmode 8da4w -G 32 -kv
   --use_sdpa_with_kv_cache -X --xnnpack-extended-ops --max_seq_length 512 --max_context_length 512`
   (the issue's flags; fp32 KV cache and fp32 embedding, as the issue measured it).
4. Both files are loaded in this process (one threadpool of -t threads) and measured llama-bench style
   with runtime.bench (warm-up, then pp and tg repetitions interleaved ours/theirs). pp256 is one forward
   call in both (prefill chunk 256 / their max_seq_length 512). Reported: median tokens/s and ratios.

Writes benchmarks/results/executorch.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_gguf import add_protocol_options  # noqa: E402
from edge.config import HybridConfig  # noqa: E402
from runtime.bench import _SessionBench, cpu_label  # noqa: E402
from runtime.executorch import execute  # noqa: E402
from runtime.session import Session  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "executorch"
MODEL_DIR = ROOT / "benchmarks" / "work" / "gguf" / "lfm2-350m"  # shared with bench_gguf / bench_onnx
RESULTS = ROOT / "benchmarks" / "results" / "executorch.json"
OURS = WORK / "ours-8da4w-int8kv.pte"
THEIRS = WORK / "et-lfm2_350m-8da4w.pte"
THEIR_FLAGS = ["-qmode", "8da4w", "-G", "32", "-kv", "--use_sdpa_with_kv_cache", "-X", "--xnnpack-extended-ops",
               "--max_seq_length", "512", "--max_context_length", "512",
               "-m", '{"get_bos_id": 1, "get_eos_ids": [7]}']
OUR_FLAGS = ["--quant", "8da4w", "--kv-cache", "int8", "--embedding-quant", "int4", "--group-size", "32",
             "--max-seq-len", "512", "--prefill-chunk", "256"]


def run_child(cmd: list[str], log: Path) -> dict:
    """Run a command (output to log); return its wall time and peak RSS (this child only, from wait4)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=WORK, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed (see {log}): {' '.join(cmd)}")
    return dict(seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=round(usage.ru_maxrss / 1024, 1))


def checkpoint() -> Path:
    if not (MODEL_DIR / "tokenizer.json").exists():
        from bench_gguf import checkpoint as build  # the one helper that builds the 65536-token checkpoint
        return build()
    return MODEL_DIR


def export_ours(model_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "edge.cli", "export", "executorch", str(model_dir), "-o", str(OURS), *OUR_FLAGS]
    return run_child(cmd, WORK / "ours_export.log")


def export_theirs(model_dir: Path) -> dict:
    config = HybridConfig.load(model_dir)
    params = WORK / "et_params.json"
    params.write_text(json.dumps({
        "dim": config.hidden_size, "ffn_dim_multiplier": 1, "hidden_dim": config.ffn_dim,
        "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
        "n_layers": config.num_hidden_layers, "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "use_scaled_rope": False, "vocab_size": config.vocab_size, "use_hf_rope": True, "use_qk_norm": True,
        "qk_norm_before_rope": True, "layer_types": config.layer_types}))
    ckpt = WORK / "et_weights.pth"
    convert = run_child([sys.executable, "-m", "executorch.examples.models.lfm2.convert_weights",
                         str(model_dir), str(ckpt)], WORK / "et_convert.log")
    cmd = [sys.executable, "-m", "executorch.examples.models.llama.export_llama", "--model", "lfm2_350m",
           "-c", str(ckpt), "-p", str(params), *THEIR_FLAGS, "-o", str(WORK), "-n", THEIRS.name]
    result = run_child(cmd, WORK / "et_export.log")
    result["convert_seconds"] = convert["seconds"]
    return result


class StockPteSession(Session):
    """export_llama's .pte (forward(tokens, input_pos) -> last logits) behind the Session API, run by
    executorch.runtime exactly as ours is, so the comparison measures the programs, not the harness."""
    engine = "executorch (export_llama)"

    def __init__(self, path: Path, config: HybridConfig, n_threads: int):
        from runtime.executorch import _runtime, set_threads
        threads = set_threads(n_threads)
        program = _runtime().load_program(path)
        self.chunk = program.load_method("get_max_seq_len").execute([])[0] - 1  # its dynamic-T bound
        max_ctx = program.load_method("get_max_context_len").execute([])[0]
        self.forward = program.load_method("forward")
        super().__init__(config, None, max_ctx, threads, quant="8da4w", kv_cache="fp32", path=str(path))

    def _forward(self, ids):
        for start in range(0, len(ids), self.chunk):
            tokens = torch.tensor([ids[start:start + self.chunk]], dtype=torch.long)
            logits = execute(self.forward, [tokens, torch.tensor([self.n_past + start], dtype=torch.long)])[0]
        return logits.reshape(-1).numpy()

    def _reset(self):
        pass  # its attention reads positions < start_pos + T only; its conv state is not cleared (timing only)

    def kv_cache_bytes(self):
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * 4


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(p)
    p.add_argument("--skip-export", action="store_true", help="reuse the .pte files already under work/")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = checkpoint()
    prior = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    exports = prior.get("exports", {})
    if not (args.skip_export and OURS.exists()):
        exports["ours"] = export_ours(model_dir)
        print("ours exported:", exports["ours"], flush=True)
    if not (args.skip_export and THEIRS.exists()):
        exports["theirs"] = export_theirs(model_dir)
        print("theirs exported:", exports["theirs"], flush=True)

    from runtime.executorch import ExecuTorchSession
    ours = ExecuTorchSession(OURS, n_threads=args.threads)
    theirs = StockPteSession(THEIRS, ours.config, args.threads)
    benches = {name: _SessionBench(s, n_prompt=args.n_prompt, n_gen=args.n_gen, depth=0,
                                   repetitions=args.repetitions, seed=0)
               for name, s in (("ours", ours), ("theirs", theirs))}
    for b in benches.values():
        b.warmup()
    for rep in range(args.repetitions):
        for test in ("pp", "tg"):
            for name, b in benches.items():  # interleaved: ours, theirs, ours, theirs ...
                b.run(test)
    result = {"cpu": cpu_label(), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
              "threads": ours.n_threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
              "repetitions": args.repetitions, "checkpoint": str(model_dir.relative_to(ROOT)),
              "ours_export_flags": OUR_FLAGS, "their_export_flags": THEIR_FLAGS, "exports": exports}
    for name, b in benches.items():
        path = OURS if name == "ours" else THEIRS
        pp = [args.n_prompt * 1e9 / ns for ns in b.samples["pp"]]
        tg = [args.n_gen * 1e9 / ns for ns in b.samples["tg"]]
        result[name] = {"file": path.name, "file_mb": round(path.stat().st_size / 1e6, 1),
                        "pp_ts_median": round(statistics.median(pp), 2), "tg_ts_median": round(statistics.median(tg), 2),
                        "pp_ts_samples": [round(x, 2) for x in pp], "tg_ts_samples": [round(x, 2) for x in tg],
                        "kv_cache_bytes_at_tg": b.kv_bytes["tg"]}
    result["ratio_ours_over_theirs"] = {
        k: round(result["ours"][f"{k}_ts_median"] / result["theirs"][f"{k}_ts_median"], 3) for k in ("pp", "tg")}
    result["ratio_ours_over_theirs"]["file_size"] = round(result["ours"]["file_mb"] / result["theirs"]["file_mb"], 3)
    # same logits? (random weights, so agreement of the two programs is a useful sanity check)
    ids = np.random.default_rng(1).integers(0, ours.vocab_size, 16).tolist()
    fresh_ours, fresh_theirs = ExecuTorchSession(OURS), StockPteSession(THEIRS, ours.config, args.threads)
    a, b = fresh_ours.prefill(ids), fresh_theirs.prefill(ids)
    result["logits_cosine_ours_vs_theirs"] = round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 5)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("ours", "theirs")}, indent=2))
    for name in ("ours", "theirs"):
        r = result[name]
        print(f"{name:7s} {r['file_mb']:7.1f} MB  pp{args.n_prompt} {r['pp_ts_median']:8.2f} t/s  "
              f"tg{args.n_gen} {r['tg_ts_median']:7.2f} t/s")


if __name__ == "__main__":
    main()
