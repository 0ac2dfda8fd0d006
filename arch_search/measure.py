"""Measure a candidate on this machine through the real exporter and the real runtime (never a formula).

For one candidate: its checkpoint (written by the candidate source: random weights, or a parent's
inherited ones; latency and memory do not depend on their values) is exported (target format, weight quant,
KV-cache type), then the artifact is loaded with `runtime.load` and time it with `runtime.bench.bench_session` (the one timer of the
project; llama-bench protocol: warm-up, repetitions, median). Reported per candidate:
  prefill_ms@N   median ms to prefill N prompt tokens (empty cache), for every N a budget names
  decode_ms      median ms per generated token with `decode_depth` tokens already in the cache
  peak_rss_mb    peak resident memory of the process that loaded and ran the artifact
  kv_bytes       KV-cache bytes at the budget context (`decode_depth` tokens)
  artifact_mb    size of the exported artifact
plus the protocol: repetitions, samples, coefficient of variation (CV = stddev/mean) per test, and how
many attempts it took: a test whose CV exceeds `max_cv` is re-run (up to `max_attempts`) and the
attempt with the lowest CV is kept; the record says `noisy` if even that one is above.

Every step runs in a CHILD process with a time limit (`python -m arch_search.measure export|bench`),
so a crash, an engine abort or a hang costs one candidate (reported with the reason), not the search.
Export and timing are separate children so that the peak RSS is the runtime's, not the exporter's.
The timing step goes through a transport (device/transport.py): this machine's child process, or a device
agent, which runs the same `bench` child on the device.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge.formats import FORMATS
from runtime.isolate import RESULT, SETTINGS, child_main, model_name, run_child

CONTEXT_ROUND = 256  # artifacts are exported for the context the measurements need, rounded up to this


@dataclass
class MeasureSettings:
    target: str = "gguf"
    quant: str | None = None            # None: the format's default
    kv_cache: str | None = None
    prefill_tokens: tuple[int, ...] = (512,)
    decode_depth: int = 512             # the budget context: tokens in the cache while decoding
    n_gen: int = 32                     # decoded tokens per timed repetition
    repetitions: int = 3
    threads: int = 1
    max_cv: float = 0.10
    max_attempts: int = 3
    timeout_s: float = 600.0            # per child process
    seed: int = 0                       # random weights and random prompt ids

    @property
    def max_seq_len(self) -> int:
        need = max(*self.prefill_tokens, self.decode_depth + self.n_gen + 1)
        return CONTEXT_ROUND * math.ceil(need / CONTEXT_ROUND)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens"] = list(self.prefill_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MeasureSettings":
        d = dict(d)
        d["prefill_tokens"] = tuple(d.get("prefill_tokens", (512,)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---- parent side ---------------------------------------------------------------------------------
def measure(checkpoint: str | Path, settings: MeasureSettings, workdir: str | Path, keep: bool = False,
            transport=None) -> dict:
    """Export `checkpoint` (an HF checkpoint directory) in a child process here, then time the artifact
    through `transport` (a device.transport.Transport: default this machine, in a child process); return
    the figures.

    Raises MeasureFailed with a one-line reason. `workdir` receives the artifact; it is deleted afterwards
    (with the checkpoint, when that lies inside it) unless `keep`."""
    if transport is None:
        from device.transport import LocalTransport
        transport = LocalTransport()
    workdir = Path(workdir)
    started = time.perf_counter()
    try:
        artifact = export_artifact(checkpoint, settings, workdir)
        export_s = time.perf_counter() - started
        result = transport.measure_candidate(artifact, settings)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["export_s"] = round(export_s, 3)
    result["measure_s"] = round(time.perf_counter() - started, 3)
    return result


def export_artifact(checkpoint: str | Path, settings: MeasureSettings, workdir: str | Path) -> Path:
    """Export `checkpoint` as settings.target into the work folder, in a child process with the time
    limit (an exporter that crashes or hangs fails this candidate only)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / SETTINGS).write_text(json.dumps(settings.to_dict()))
    run_child("arch_search.measure", ["export", str(workdir), str(Path(checkpoint).resolve())], settings.timeout_s,
              "export")
    return workdir / model_name(FORMATS[settings.target].suffix)


# ---- child side ----------------------------------------------------------------------------------
def child_export(workdir: Path, checkpoint: Path) -> None:
    import torch

    from export import export_model

    settings = MeasureSettings.from_dict(json.loads((workdir / SETTINGS).read_text()))
    torch.set_num_threads(max(1, settings.threads))
    export_model(settings.target, checkpoint, workdir / model_name(FORMATS[settings.target].suffix),
                 quant=settings.quant, kv_cache=settings.kv_cache, max_seq_len=settings.max_seq_len)


def child_bench(workdir: Path) -> None:
    import numpy as np

    import runtime
    from runtime.bench import artifact_bytes, bench_session, peak_rss_mb

    settings = MeasureSettings.from_dict(json.loads((workdir / SETTINGS).read_text()))
    artifact = workdir / model_name(FORMATS[settings.target].suffix)
    started = time.perf_counter()
    session = runtime.load(artifact, n_threads=settings.threads)
    load_ms = (time.perf_counter() - started) * 1e3

    def timed(**test) -> dict:
        """bench_session for one test, re-run while its CV is above max_cv; keep the steadiest attempt."""
        attempts = []
        for _ in range(settings.max_attempts):
            (record,) = bench_session(session, repetitions=settings.repetitions, seed=settings.seed, **test)
            record["cv"] = record["stddev_ns"] / record["avg_ns"] if record["avg_ns"] else 0.0
            attempts.append(record)
            if record["cv"] <= settings.max_cv:
                break
        best = min(attempts, key=lambda r: r["cv"])
        return {"median_ms": best["median_ns"] / 1e6, "samples_ms": [ns / 1e6 for ns in best["samples_ns"]],
                "cv": round(best["cv"], 4), "attempts": len(attempts), "noisy": best["cv"] > settings.max_cv}

    result: dict = {"prefill": {}, "engine": session.engine, "quant": session.quant,
                    "kv_cache": session.kv_cache, "load_ms": round(load_ms, 1)}
    for n in settings.prefill_tokens:
        result["prefill"][str(n)] = timed(n_prompt=n, n_gen=0, depth=0)
    decode = timed(n_prompt=0, n_gen=settings.n_gen, depth=settings.decode_depth)
    decode["ms_per_token"] = decode["median_ms"] / settings.n_gen
    result["decode"] = decode
    # the KV cache's size at the budget context, and at every other context measured (it grows with it)
    session.reset()
    contexts = sorted({settings.decode_depth, *settings.prefill_tokens})
    ids = np.random.default_rng(settings.seed).integers(0, session.vocab_size, contexts[-1]).tolist()
    result["kv_bytes_at"] = {}
    for context in contexts:
        for start in range(session.n_past, context, 512):
            session.prefill(ids[start:min(start + 512, context)])
        result["kv_bytes_at"][str(context)] = int(session.kv_cache_bytes())
    result["kv_bytes"] = result["kv_bytes_at"][str(settings.decode_depth)]
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)  # the child's own peak (VmHWM)
    result["artifact_mb"] = round(artifact_bytes(artifact) / 2**20, 3)
    session.close()
    result["noisy"] = decode["noisy"] or any(p["noisy"] for p in result["prefill"].values())
    with open(workdir / (RESULT + ".partial"), "w") as f:
        json.dump(result, f)
    os.replace(workdir / (RESULT + ".partial"), workdir / RESULT)


def summary(result: dict, settings: MeasureSettings) -> dict:
    """The flat figures budgets and tables use."""
    out = {"decode_ms": result["decode"]["ms_per_token"], "peak_rss_mb": result["peak_rss_mb"],
           "kv_mb": result["kv_bytes"] / 2**20, "artifact_mb": result["artifact_mb"]}
    for n, p in result["prefill"].items():
        out[f"prefill_ms@{n}"] = p["median_ms"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m arch_search.measure",
                                description="child process steps of a candidate measurement")
    sub = p.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export")
    e.add_argument("workdir", type=Path)
    e.add_argument("checkpoint", type=Path)
    b = sub.add_parser("bench")
    b.add_argument("workdir", type=Path)
    args = p.parse_args(argv)
    if args.step == "export":
        return child_main(lambda: child_export(args.workdir, args.checkpoint))
    return child_main(lambda: child_bench(args.workdir))


if __name__ == "__main__":
    sys.exit(main())
