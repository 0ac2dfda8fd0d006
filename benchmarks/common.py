"""What the benchmark scripts share: paths, the lfm2-350m checkpoint, child processes, protocol options."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"          # artifacts (git-ignored), reused across runs
RESULTS = ROOT / "benchmarks" / "results"    # committed JSON / PNG
EDGE = [sys.executable, "-m", "edge.cli"]
MODEL_DIR = WORK / "gguf" / "lfm2-350m"      # the one 350M checkpoint every script measures


def run_child(cmd: list[str], log: Path | None = None, cwd: Path = ROOT) -> dict:
    """Run a command (its output to `log` if given); return its wall time and peak RSS (this child only,
    from wait4). Exits with the command line on failure."""
    t0 = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, **({"stdout": f, "stderr": subprocess.STDOUT} if log else {}))
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed{f' (see {log})' if log else ''}: {' '.join(map(str, cmd))}")
    return dict(seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(usage.ru_maxrss / 1024, 1))


def add_protocol_options(p) -> None:
    """The issues' side-by-side protocol (2 threads, pp256, tg64, 5 repetitions) as overridable options."""
    p.add_argument("-t", "--threads", type=int, default=2, help="threads per engine (default 2)")
    p.add_argument("-p", "--n-prompt", type=int, default=256, help="prefill tokens (default 256)")
    p.add_argument("-n", "--n-gen", type=int, default=64, help="decode tokens (default 64)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions per test (default 5)")


def checkpoint(preset: str = "lfm2-350m") -> Path:
    """An LFM2 preset with random weights, built once under work/gguf/PRESET (MODEL_DIR for lfm2-350m):
    `edge init --preset PRESET` with the tokenizer trained to the preset's full 65536 tokens on the Python
    standard library's source (the default corpus is too small for that many)."""
    model_dir = WORK / "gguf" / preset
    if (model_dir / "tokenizer.json").exists() and (model_dir / "model.safetensors").exists():
        return model_dir
    corpus = model_dir.parent / "corpus.txt"
    if not corpus.exists():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("\n".join(p.read_text(errors="replace") for p in files))
    run_child([*EDGE, "init", str(model_dir), "--preset", preset, "--corpus", str(corpus)])
    return model_dir


def tiny_checkpoint(directory: Path) -> Path:
    """The tiny preset (random weights, the default corpus's tokenizer), for smoke runs of the scripts."""
    if not (directory / "tokenizer.json").exists():
        run_child([*EDGE, "init", str(directory), "--preset", "tiny"])
    return directory
