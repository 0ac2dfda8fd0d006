"""llama-bench-style CPU benchmark over any Session (docs/design.md §6); `edge bench` is `main` below.

Method (as llama-bench's `llama-bench.cpp`): one warm-up run, then `repetitions` runs of
  pp: `n_prompt` random ids in ONE prefill, after `depth` tokens already in the cache, and
  tg: `n_gen` single-token decodes, after `depth` (+1 prompt token) in the cache.
Every repetition starts from a reset cache; refilling the depth is not timed, nor are tokenization and
sampling (decode feeds pre-drawn random ids). A sample is the wall time of the whole test; t/s per
sample is (n_prompt + n_gen) / time. Records use llama-bench's JSON field names, plus ours.

Several artifacts in one call run interleaved (A B A B ... per repetition) so that their ratios hold
on a machine whose speed drifts: quote ratios of medians.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge.errors import EdgeError

DEPTH_CHUNK = 512  # the untimed depth fill goes in chunks this size, kind to engines with bounded prefill


# ---- the machine ----------------------------------------------------------------------------------
def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: VmHWM, not ru_maxrss, which Linux carries
    across fork and exec (a measuring child would report at least its parent's RSS at its start)."""
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory now (VmRSS), in MiB; falls back to the peak where /proc is missing."""
    now = _proc_status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


# the instruction sets the engines' int8/int4 kernels dispatch on: "AMD EPYC" names VMs with and without
# AVX-512, and two runs on "AMD EPYC" gave ExecuTorch figures 2-6x apart (benchmarks/RESULTS.md, 2026-11-30)
ISA_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm", "sve")


def cpu_info() -> dict:
    """CPU model name, the ISA_FLAGS it has, logical cores of the machine, and the cores this process may
    run on."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key == "model name" and not model:
                model = line.split(":", 1)[1].strip()
            elif key in ("flags", "Features") and not flags:  # x86, arm64
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if not model:
        import platform
        model = platform.processor() or platform.machine()
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": cores, "usable_cores": usable}


def cpu_label() -> str:
    info = cpu_info()
    details = [f"{info['cores']} cores", *info["isa"]]
    return f"{info['model']} ({', '.join(details)})"


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Memory read bandwidth for a decode roofline: best-of-`repeats` GB/s of summing a `gib` GiB float32
    array, on 1 and on 2 threads (numpy releases the GIL in reductions)."""
    data = np.ones(int(gib * 2**30) // 4, np.float32)
    data.sum()  # fault the pages in

    def best(n_threads):
        parts = np.array_split(data, n_threads)
        times = []
        for _ in range(repeats):
            threads = [threading.Thread(target=p.sum) for p in parts]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            times.append(time.perf_counter() - t0)
        return data.nbytes / min(times)

    return {"1_thread_gbs": best(1) / 1e9, "2_threads_gbs": best(2) / 1e9}


# ---- one session --------------------------------------------------------------------------------
def _fill_chunked(session, ids: list[int]) -> None:
    """Untimed context fill in DEPTH_CHUNK pieces."""
    for i in range(0, len(ids), DEPTH_CHUNK):
        session.prefill(ids[i:i + DEPTH_CHUNK])


def describe_test(n_prompt: int, n_gen: int, depth: int) -> str:
    name = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
    return f"{name} @ d{depth}" if depth else name


class _SessionBench:
    """The warm-up and the timed runs of one session; records are built from the samples at the end.

    Split into single repetitions so that `bench_artifacts` can interleave several sessions."""

    def __init__(self, session, *, n_prompt: int, n_gen: int, depth: int, repetitions: int, seed: int,
                 t0_ns: int | None = None):
        if n_prompt < 0 or n_gen < 0 or depth < 0:
            raise EdgeError(f"-p, -n and -d must not be negative (got {n_prompt}, {n_gen}, {depth})")
        if n_prompt == 0 and n_gen == 0:
            raise EdgeError("nothing to measure: both -p and -n are 0; give a prompt or a decode length")
        if repetitions < 1:
            raise EdgeError(f"-r must be at least 1, got {repetitions}")
        need = depth + max(n_prompt, n_gen + 1)
        if need > session.max_seq_len:
            raise EdgeError(f"{Path(session.path).name} holds {session.max_seq_len} tokens but the test needs "
                            f"{need} (depth {depth} + test); lower -d/-p/-n or export with a larger --max-seq-len")
        self.session, self.n_prompt, self.n_gen, self.depth = session, n_prompt, n_gen, depth
        self.repetitions = repetitions
        self.rng = np.random.default_rng(seed)
        self.t0_ns = time.perf_counter_ns() if t0_ns is None else t0_ns
        self.samples = {"pp": [], "tg": []}   # wall ns per repetition
        self.starts = {"pp": [], "tg": []}    # start of each sample, ns after t0 (shows the interleaving)
        self.kv_bytes = {"pp": None, "tg": None}

    def _ids(self, n: int) -> list[int]:
        return self.rng.integers(0, self.session.vocab_size, n).tolist()

    def _fill(self, n: int) -> None:
        """reset, then n random tokens into the cache (untimed)."""
        self.session.reset()
        _fill_chunked(self.session, self._ids(n))

    def warmup(self) -> None:
        # llama-bench: one full prompt run and a 1-token generation before timing anything
        self._fill(self.depth)
        if self.n_prompt:
            self.session.prefill(self._ids(self.n_prompt))
        if self.session.n_past + 1 > self.session.max_seq_len:
            self._fill(self.depth)  # no room left for the decode: refill rather than grow the check above
        self.session.decode(self._ids(1)[0])
        self.session.reset()

    def run(self, test: str) -> int:
        """One timed repetition of the pp or tg test; returns its wall ns."""
        s = self.session
        if test == "pp":
            self._fill(self.depth)
            ids = self._ids(self.n_prompt)
            start = time.perf_counter_ns()
            s.prefill(ids)
            ns = time.perf_counter_ns() - start
        else:
            self._fill(self.depth)
            s.prefill(self._ids(1))  # decode follows a prompt, as in real use
            ids = self._ids(self.n_gen)
            start = time.perf_counter_ns()
            for token in ids:
                s.decode(token)
            ns = time.perf_counter_ns() - start
        self.samples[test].append(ns)
        self.starts[test].append(start - self.t0_ns)
        self.kv_bytes[test] = int(s.kv_cache_bytes())
        return ns

    def tests(self) -> list[str]:
        return [t for t, n in (("pp", self.n_prompt), ("tg", self.n_gen)) if n]

    def records(self, *, load_ms: float | None = None, model_rss_mb: float | None = None) -> list[dict]:
        s = self.session
        path = Path(s.path) if s.path else None
        pp_ns = self.samples["pp"]
        ttft_ms = statistics.median(pp_ns) / 1e6 if pp_ns else None
        out = []
        for test in self.tests():
            n_prompt, n_gen = (self.n_prompt, 0) if test == "pp" else (0, self.n_gen)
            ns = self.samples[test]
            ts = [(n_prompt + n_gen) * 1e9 / x for x in ns]
            out.append({
                "model_filename": str(path) if path else "",
                "model_size": artifact_bytes(path) if path else 0,
                "model_n_params": s.config.n_params(),
                "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": self.depth,
                "n_threads": s.n_threads,
                "type_k": s.kv_cache, "type_v": s.kv_cache,
                "avg_ns": statistics.fmean(ns), "stddev_ns": _stdev(ns),
                "avg_ts": statistics.fmean(ts), "stddev_ts": _stdev(ts),
                "median_ns": statistics.median(ns), "median_ts": statistics.median(ts),
                "samples_ns": ns, "samples_ts": ts,
                "test": describe_test(n_prompt, n_gen, self.depth),
                "engine": s.engine, "quant": s.quant, "kv_cache": s.kv_cache,
                "ttft_ms": ttft_ms, "load_ms": load_ms,
                "peak_rss_mb": peak_rss_mb(), "model_rss_mb": model_rss_mb,
                "kv_cache_bytes": self.kv_bytes[test],
                "cpu": cpu_label(),
                "samples_start_ns": self.starts[test],
            })
        return out


def _stdev(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def artifact_bytes(path: Path) -> int:
    """Bytes on disk: a directory's files, or the file plus side files named after it (model.onnx.data)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if not path.exists():
        return 0
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".*")
                                     if p.is_file() and not p.name.endswith(".partial"))


def bench_session(session, *, n_prompt: int = 512, n_gen: int = 128, depth: int = 0, repetitions: int = 5,
                  seed: int = 0, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmark one open Session llama-bench style; one record per test (pp, tg).

    `progress`, if given, is called with a short label after the warm-up and after every timed run.
    The session is left reset. load_ms is None here (the caller opened the session)."""
    bench = _SessionBench(session, n_prompt=n_prompt, n_gen=n_gen, depth=depth, repetitions=repetitions,
                          seed=seed)
    bench.warmup()
    if progress:
        progress("warm-up")
    for test in bench.tests():
        for rep in range(repetitions):
            bench.run(test)
            if progress:
                progress(f"{test} {rep + 1}/{repetitions}")
    session.reset()
    return bench.records()


def bench_artifacts(paths: Sequence[str | Path], *, n_prompt: int = 512, n_gen: int = 128, depth: int = 0,
                    repetitions: int = 5, n_threads: int | None = 1, kv_cache: str | None = None, seed: int = 0,
                    progress: bool = True) -> list[dict]:
    """Load each artifact (timing the load), warm each up, then run the repetitions interleaved:
    for each repetition, for each test, A B C ... so every artifact sees the same machine drift.

    Every artifact gets the same random ids (same seed). Records come out in the order of `paths`."""
    import runtime

    paths = [Path(p) for p in paths]
    if not paths:
        raise EdgeError("no artifacts to benchmark; give at least one .gguf/.pte/.onnx or checkpoint directory")
    options = {"kv_cache": kv_cache} if kv_cache else {}
    missing = next((p for p in paths if not p.exists()), None)
    if missing is not None:
        raise EdgeError(f"{missing} does not exist; give an exported artifact or a checkpoint directory")
    for path in paths:
        runtime.engine_for(path)  # an unknown suffix fails here, before anything is loaded

    def opener(path):
        _import_engine(runtime, path)  # before the load timer: load_ms is opening the artifact, not importing torch
        return lambda: _load(runtime, path, n_threads, options)

    return bench_interleaved([(path.name, opener(path)) for path in paths], n_prompt=n_prompt, n_gen=n_gen,
                             depth=depth, repetitions=repetitions, seed=seed, progress=progress)


def bench_interleaved(openers: Sequence[tuple[str, Callable[[], object]]], *, n_prompt: int = 512,
                      n_gen: int = 128, depth: int = 0, repetitions: int = 5, seed: int = 0,
                      progress: bool = True) -> list[dict]:
    """The interleaved runner behind bench_artifacts, over (label, open-a-Session) pairs, so benchmark
    scripts can put peer engines wrapped as Sessions into the same A B A B rotation.
    Sessions are opened one after the other (load_ms times the opener), benchmarked, then closed (all of
    them, at once, if one fails to open or to run)."""
    t0 = time.perf_counter_ns()
    benches, loads, rss = [], [], []
    bar = _progress_bar(progress, total=len(openers) * (1 + repetitions * ((n_prompt > 0) + (n_gen > 0))))
    try:
        for label, open_session in openers:
            rss_before = current_rss_mb()
            start = time.perf_counter_ns()
            session = open_session()
            loads.append((time.perf_counter_ns() - start) / 1e6)
            bench = _SessionBench(session, n_prompt=n_prompt, n_gen=n_gen, depth=depth, repetitions=repetitions,
                                  seed=seed, t0_ns=t0)
            benches.append(bench)
            bar.set_description(f"warm-up {label}")
            bench.warmup()
            rss.append(current_rss_mb() - rss_before)  # weights + buffers this session brought in
            bar.update()
        for rep in range(repetitions):
            for test in benches[0].tests():
                for (label, _), bench in zip(openers, benches):
                    bar.set_description(f"{test} {rep + 1}/{repetitions} {label}")
                    bench.run(test)
                    bar.update()
    except BaseException:
        for bench in benches:
            bench.session.close()
        raise
    finally:
        bar.close()
    records = []
    for (label, _), bench, load_ms, model_rss in zip(openers, benches, loads, rss):
        records += [dict(r, label=label) for r in bench.records(load_ms=load_ms, model_rss_mb=model_rss)]
        bench.session.close()
    return records


def _import_engine(runtime, path: Path) -> None:
    """Import the engine's Python module (an engine that initialises itself lazily, on first load,
    still pays that in load_ms)."""
    runtime.backend_for(path)  # the checkpoint's reference, a model folder's, or the suffix's backend


def _load(runtime, path: Path, n_threads, options):
    try:
        return runtime.load(path, n_threads=n_threads, **options)
    except TypeError as e:
        if "kv_cache" in str(e):
            raise EdgeError(f"{path.name}: this engine fixes its KV cache at export time; drop --kv-cache "
                            f"(it applies to .gguf only)") from None
        raise


class _NoBar:
    def update(self, n=1): pass
    def set_description(self, s): pass
    def close(self): pass


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, file=sys.stderr, unit="run", leave=False, dynamic_ncols=True)


# ---- reporting ----------------------------------------------------------------------------------
def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_table(records: Sequence[dict]) -> str:
    """A markdown table shaped like llama-bench's, plus our columns, then a line with the machine."""
    header = ["model", "size", "params", "engine", "quant", "kv", "threads", "test", "t/s", "median t/s",
              "ttft ms", "load ms", "model RSS", "peak RSS", "KV bytes"]
    rows = []
    for r in records:
        rows.append([
            Path(r["model_filename"]).name, _size(r["model_size"]), _params(r["model_n_params"]), r["engine"],
            r["quant"], r["kv_cache"], str(r["n_threads"] or "-"), r["test"],
            f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}", f"{r['median_ts']:.2f}",
            "-" if r["ttft_ms"] is None else f"{r['ttft_ms']:.1f}",
            "-" if r["load_ms"] is None else f"{r['load_ms']:.0f}",
            "-" if r.get("model_rss_mb") is None else f"{r['model_rss_mb']:.0f} MiB",
            f"{r['peak_rss_mb']:.0f} MiB", _kv(r["kv_cache_bytes"]),
        ])
    right = {"size", "params", "threads", "t/s", "median t/s", "ttft ms", "load ms", "model RSS", "peak RSS",
             "KV bytes"}
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if h in right else c.ljust(w)
                                 for c, w, h in zip(cells, widths, header)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if h in right else "-" * w
                             for w, h in zip(widths, header)) + " |"
    reps = {len(r["samples_ns"]) for r in records}
    machine = records[0]["cpu"] if records else cpu_label()
    notes = (f"machine: {machine}; t/s = mean ± std over {'/'.join(map(str, sorted(reps)))} repetitions; "
             "ttft = median prefill latency of the pp test; model RSS = resident memory the artifact added "
             "(load + warm-up); peak RSS = the whole process's")
    return "\n".join([line(header), rule, *(line(r) for r in rows), "", notes])


def _kv(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(args, runner=None) -> None:
    """`edge bench ARTIFACT... [-p] [-n] [-d] [-r] [-t] [--kv-cache] [--json] [--seed]`; runner: what
    measures instead of bench_artifacts (the CLI's --device passes the device agent's)."""
    from edge.files import write_json

    if args.threads is not None and args.threads < 1:
        raise EdgeError(f"-t must be at least 1, got {args.threads}")
    options = dict(n_prompt=args.n_prompt, n_gen=args.n_gen, depth=args.depth, repetitions=args.repetitions,
                   n_threads=args.threads, kv_cache=args.kv_cache, seed=args.seed)
    if runner is not None:
        records = runner(args.artifacts, **options)
    else:
        records = bench_artifacts(args.artifacts, progress=True, **options)
    print(format_table(records))
    if args.json:
        write_json(args.json, records)
        print(f"wrote {len(records)} records to {args.json}")


def bench_depths(openers: Sequence[tuple[str, Callable[[], object]]], *, depths: Sequence[int], n_gen: int = 16,
                 repetitions: int = 2, seed: int = 0, progress: bool = True) -> list[dict]:
    """Decode cost against context depth: per repetition each session is reset once, filled step by step to
    each depth in turn (untimed, random ids), and `n_gen` single-token decodes are timed there. One fill to
    the deepest depth per repetition, where `bench_interleaved(depth=d)` refills from zero for every d.
    Sessions take turns per repetition (A B A B) as in bench_interleaved. One record per (session, depth),
    with llama-bench's field names; kv_cache_bytes is the cache's size at that depth."""
    depths = sorted(set(depths))
    if not depths or depths[0] < 0 or n_gen < 1 or repetitions < 1:
        raise EdgeError("give depths >= 0, -n >= 1 and -r >= 1")
    if any(b - a < n_gen for a, b in zip(depths, depths[1:])):  # the decodes at one depth carry into the next
        raise EdgeError(f"depths {depths} lie closer than the {n_gen} decodes timed at each; space them by at "
                        f"least -n or lower -n")
    rng = np.random.default_rng(seed)
    sessions, loads = [], []
    samples: dict[tuple[int, int], list[int]] = {}
    kv_bytes: dict[tuple[int, int], int] = {}
    bar = _progress_bar(progress, total=len(openers) * repetitions * len(depths))
    try:
        for label, open_session in openers:
            start = time.perf_counter_ns()
            session = open_session()
            sessions.append(session)
            loads.append((time.perf_counter_ns() - start) / 1e6)
            need = depths[-1] + 1 + n_gen
            if need > session.max_seq_len:
                raise EdgeError(f"{label} holds {session.max_seq_len} tokens but the deepest test needs {need}; "
                                f"export with a larger --max-seq-len")
        for _ in range(repetitions):
            for i, ((label, _), s) in enumerate(zip(openers, sessions)):
                s.reset()
                for depth in depths:
                    bar.set_description(f"{label} d{depth}")
                    _fill_chunked(s, rng.integers(0, s.vocab_size, depth + 1 - s.n_past).tolist())  # +1: a prompt token
                    ids = rng.integers(0, s.vocab_size, n_gen).tolist()
                    start = time.perf_counter_ns()
                    for token in ids:
                        s.decode(token)
                    samples.setdefault((i, depth), []).append(time.perf_counter_ns() - start)
                    kv_bytes[(i, depth)] = int(s.kv_cache_bytes())
                    bar.update()
                s.reset()
    except BaseException:
        for s in sessions:
            s.close()
        raise
    finally:
        bar.close()
    records = []
    for i, ((label, _), s) in enumerate(zip(openers, sessions)):
        for depth in depths:
            ns = samples[(i, depth)]
            ts = [n_gen * 1e9 / x for x in ns]
            records.append({
                "label": label, "model_filename": str(s.path or ""), "model_n_params": s.config.n_params(),
                "n_prompt": 0, "n_gen": n_gen, "n_depth": depth, "n_threads": s.n_threads,
                "test": describe_test(0, n_gen, depth), "engine": s.engine, "quant": s.quant,
                "kv_cache": s.kv_cache, "median_ns": statistics.median(ns), "median_ts": statistics.median(ts),
                "ms_per_token": statistics.median(ns) / n_gen / 1e6, "samples_ns": ns,
                "kv_cache_bytes": kv_bytes[(i, depth)], "load_ms": loads[i], "cpu": cpu_label(),
            })
        s.close()
    return records
