"""Peak memory of `edge export` against the fp32 checkpoint's size (issue 15: "exporters that scale").

Each export runs in a fresh child process (`python -m benchmarks.bench_export_memory --child ...`), so its
peak RSS is its own: the kernel's high-water mark (VmHWM) of the child, which also includes whatever the
exporter spawns (getrusage(RUSAGE_CHILDREN)). Reported per (checkpoint, format, weights + KV): peak RSS,
peak RSS / fp32 checkpoint bytes, the peak above the process after its imports (what the export itself
added), wall time, CPU seconds (user + system, the child's and its own children's: a shared machine
stretches the wall time, not this) and the artifact's size. The checkpoints are `edge init --preset ...` directories,
made here when missing.

    python -m benchmarks.bench_export_memory --models DIR/lfm2-350m DIR/lfm2-1.2b [--formats onnx] \\
        [--json benchmarks/results/export_memory.json]

Run it under a memory limit on a shared machine (a cgroup): an exporter that needs more is killed, and
the record says so (rc, no size) instead of taking the machine down.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# (format, quant, kv cache, output suffix): every format's 4-bit weights + 8-bit KV, then its 8-bit weights
CASES = [
    ("gguf", "q4_0", "q8_0", ".gguf"),    # with its default importance matrix: the fp32 model's forward pass first
    ("gguf", "iq4_xs", "q8_0", ".gguf"),  # the GGUF 4-bit pick: f32 GGUF, then llama.cpp's quantizer
    ("gguf", "q8_0", None, ".gguf"),
    ("executorch", "8da4w", "int8", ".pte"),
    ("executorch", "8da8w", None, ".pte"),
    ("onnx", "int4", "int8", ""),   # no suffix: the onnxruntime-genai model folder (external data past 2 GiB)
    ("onnx", "int8", None, ""),
]
FORMAT_MODULES = {"gguf": "export.gguf", "executorch": "export.executorch", "onnx": "export.onnx"}


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(model_dir: str, fmt: str, out: str, quant: str, kv_cache: str | None) -> None:
    """Import the exporter, note the RSS, export, print one JSON line with the high-water marks."""
    import importlib

    from export import export_model

    importlib.import_module(FORMAT_MODULES[fmt])
    if fmt == "executorch":
        importlib.import_module(FORMAT_MODULES[fmt]).load_custom_ops()
    imports_kb = status_kb("VmRSS")
    cpu_at_start = sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
    started = time.perf_counter()
    export_model(fmt, model_dir, out, quant=quant, kv_cache=kv_cache)
    wall = time.perf_counter() - started
    peak_kb = max(status_kb("VmHWM"), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    # CPU seconds beside the wall time: on a shared machine the wall time says more about the neighbours
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime")) - cpu_at_start
    print(json.dumps({"peak_rss_kb": peak_kb, "imports_rss_kb": imports_kb, "wall_s": wall, "cpu_s": cpu}))


def run_case(model_dir: Path, fmt: str, quant: str, kv_cache: str | None, suffix: str, work: Path,
             timeout: float) -> dict:
    out = work / f"{model_dir.name}-{fmt}-{quant}-{kv_cache or 'default'}{suffix}"
    ckpt = checkpoint_bytes(model_dir)
    record = {"model": model_dir.name, "format": fmt, "quant": quant, "kv_cache": kv_cache or "default",
              "checkpoint_bytes": ckpt}
    cmd = [sys.executable, "-m", "benchmarks.bench_export_memory", "--child", str(model_dir), fmt, str(out), quant,
           kv_cache or ""]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", "", str(e)
    record["total_wall_s"] = round(time.perf_counter() - started, 1)
    line = next((s for s in reversed(stdout.splitlines()) if s.startswith("{")), None)
    if rc != 0 or line is None:  # killed (the memory limit: -9), timed out or failed: say so
        record.update(rc=rc, error=(stderr.strip().splitlines() or ["no output"])[-1][:300])
    else:
        got = json.loads(line)
        peak = got["peak_rss_kb"] * 1024
        record.update(rc=0, peak_rss_gb=round(peak / 1e9, 3), ratio=round(peak / ckpt, 3),
                      export_ratio=round((peak - got["imports_rss_kb"] * 1024) / ckpt, 3),
                      imports_rss_gb=round(got["imports_rss_kb"] * 1024 / 1e9, 3),
                      wall_s=round(got["wall_s"], 1), cpu_s=round(got.get("cpu_s", 0), 1),
                      artifact_bytes=tree_bytes(out))
    if out.is_dir():
        shutil.rmtree(out, ignore_errors=True)
    else:
        out.unlink(missing_ok=True)
    return record


def ensure_checkpoint(model_dir: Path) -> None:
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "edge.cli", "init", str(model_dir), "--preset", model_dir.name],
                       check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", type=Path, default=[Path("/tmp/export-memory/lfm2-350m")],
                   help="checkpoint dirs; a missing one is made with `edge init --preset <its name>`")
    p.add_argument("--formats", nargs="+", default=list(FORMAT_MODULES), choices=list(FORMAT_MODULES))
    p.add_argument("--quants", nargs="+", help="only these quants (e.g. int4 q4_0 8da4w)")
    p.add_argument("--work", type=Path, default=Path("/tmp/export-memory/out"), help="where artifacts go (deleted)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per export")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/export_memory.json"),
                   help="records are merged into this file (same model/format/quant/kv replaced)")
    p.add_argument("--label", default="", help="a note stored with each record (e.g. the commit measured)")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model_dir, fmt, out, quant, kv_cache = args.child
        return child(model_dir, fmt, out, quant, kv_cache or None)
    args.work.mkdir(parents=True, exist_ok=True)
    saved = json.loads(args.json.read_text()) if args.json.exists() else {}
    saved = saved if isinstance(saved, dict) else {"records": saved}  # notes beside the records are kept
    records = saved.get("records", [])
    for model_dir in args.models:
        ensure_checkpoint(model_dir)
        for fmt, quant, kv_cache, suffix in CASES:
            if fmt not in args.formats or (args.quants and quant not in args.quants):
                continue
            r = run_case(model_dir, fmt, quant, kv_cache, suffix, args.work, args.timeout)
            r["label"], r["loadavg"] = args.label, os.getloadavg()[0]
            print(json.dumps(r), flush=True)
            key = lambda x: (x["model"], x["format"], x["quant"], x["kv_cache"], x.get("label", ""))  # noqa: E731
            records = [x for x in records if key(x) != key(r)] + [r]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**saved, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
