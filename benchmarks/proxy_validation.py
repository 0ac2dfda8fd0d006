"""Does a quality proxy rank architectures the way training them would? (issue 25; docs/design.md §8)

    python -m benchmarks.proxy_validation                     # every phase that is not done yet, then the report
    python -m benchmarks.proxy_validation --phase truth       # ground truth | proxies | latency | search | report
    python -m benchmarks.proxy_validation --phase proxies --proxy lm:50 --proxy mad

Ground truth: a fixed sample of architectures from the `tiny` search space (ARCHS: stratified over the
number and positions of attention blocks, depth, width, KV groups and conv kernel; LFM2's layout scaled
down, all-but-one-conv and all-but-one-attention among them), each trained from scratch for the same
token budget (TRUTH) on the Python standard library's sources (edge.corpus: split by module, a BPE of
TRUTH["vocab"] trained on the training split), and scored on held-out modules by
  loss@L        mean next-token loss over windows of L tokens (L = 512 and the training length);
  copy_loss     the loss on the second occurrence of a 32-token span copied within a held-out window
                (at least 64 tokens after the first), against `first_loss`, the same tokens at their first
                occurrence: `recall` = first_loss - copy_loss, in nats (0: no in-context copying).
Training windows are plain text. Pilots that copied 12-38% of each training window's tokens from earlier in
the window (spans of 32 and 128 tokens, up to 0.8M training tokens, lr 3e-3 and 1e-2, batch 1 and 4) never
taught a 6-layer hybrid to copy (copy_loss stayed at first_loss), nor did half of each batch made of random-token
rows that only copying predicts, at 3x the steps (benchmarks/recall_pilot.py), so at this budget the recall
columns are measured and reported, not built into the training (benchmarks/RESULTS.md). A subset is
trained again with another seed: the seed-to-seed rank correlation is the ceiling any proxy can reach.

Proxies: each registered proxy (arch_search/proxies.py) on the same architectures, with its seconds.
Latency: each architecture measured as the search measures candidates (GGUF, llama.cpp, 1 thread).
Search: `edge search` with the default proxy at one decode budget; its best trained like the ground truth,
beside the best LFM2 layout and the best all-attention-but-one architecture within the budget.
Report: Kendall tau and Spearman of each proxy against the ground truth with bootstrap intervals, overall
and within latency bands, the best-under-budget gaps, the seed ceiling (benchmarks/results/proxy_validation/report.md).

Every finished item is saved at once (benchmarks/results/proxy_validation/PHASE.json, atomically): an
interrupted run resumes where it stopped and loses nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from arch_search.space import Candidate, lfm2_layout
from arch_search.tasks import MAD_TASKS
from benchmarks.common import RESULTS, WORK
from edge.files import atomic_path, write_json

RECORDS = RESULTS / "proxy_validation"   # one JSON per phase (phases may run at once, in separate processes)
REPORT = RECORDS / "report.md"
WORKDIR = WORK / "proxy_validation"

TRUTH = dict(vocab=2048, seq_len=1024, batch=4, steps=200, lr=3e-3, copies=0, copy_len=32, min_gap=64,
             eval_windows=32, seeds=(0,), seed_repeat=(1,),
             # the seed ceiling's subset: spread over the quality range and the cheaper to train
             repeat_subset=("lfm2-d4-w64", "conv1-attn7-d8-w64", "mqa-d6-w128-ffn3x", "conv5-attn1-d6-w128",
                            "shallow-d2-w192", "d3-w128-attn-mid"))
# the architectures: (name, depth, heads (x 32 = width), kv heads, FFN width, attention layers, conv kernel)
_ARCHS = [
    ("lfm2-d6-w128", 6, 4, 2, 512, lfm2_layout(6), 3),
    ("lfm2-d8-w128", 8, 4, 2, 512, lfm2_layout(8), 3),
    ("lfm2-d4-w64", 4, 2, 1, 256, lfm2_layout(4), 3),
    ("conv5-attn1-d6-w128", 6, 4, 2, 512, (5,), 3),
    ("conv3-attn1-d4-w192", 4, 6, 2, 768, (3,), 4),
    ("conv1-attn5-d6-w128", 6, 4, 2, 512, (1, 2, 3, 4, 5), 3),
    ("conv1-attn7-d8-w64", 8, 2, 1, 256, (1, 2, 3, 4, 5, 6, 7), 2),
    ("mqa-d6-w128-ffn3x", 6, 4, 1, 384, (1, 4), 2),
    ("mha-alt-d8-w128-ffn2x", 8, 4, 4, 256, (1, 3, 5, 7), 3),
    ("early-attn-d4-w128", 4, 4, 1, 512, (0,), 3),
    ("late-attn-d4-w128", 4, 4, 1, 512, (3,), 3),
    ("shallow-d2-w192", 2, 6, 2, 768, (1,), 3),
    ("deep-narrow-d8-w64", 8, 2, 1, 320, (3, 7), 4),
    ("attn-first-half-d6-w64", 6, 2, 1, 256, (0, 1, 2), 3),
    ("d5-w160-kv1", 5, 5, 1, 640, (2, 4), 3),
    ("d3-w128-attn-mid", 3, 4, 2, 512, (1,), 3),
]


# smaller all-attention-but-one designs for the search check (item 4), so that one fits any budget
_ALL_ATTENTION_BUT_ONE = [
    ("conv1-attn3-d4-w128", 4, 4, 2, 512, (1, 2, 3), 3),
    ("conv1-attn2-d3-w128", 3, 4, 2, 512, (1, 2), 3),
    ("conv1-attn3-d4-w64", 4, 2, 1, 256, (1, 2, 3), 3),
    ("conv1-attn2-d3-w64", 3, 2, 1, 256, (1, 2), 3),
]


def archs(vocab: int, table=_ARCHS) -> dict[str, Candidate]:
    return {name: Candidate(depth=d, hidden=32 * h, heads=h, kv_heads=kv, ffn=ffn, attention=tuple(attn), l_cache=L,
                            vocab_size=vocab)
            for name, d, h, kv, ffn, attn, L in table}


# ---- records --------------------------------------------------------------------------------------
def load(part: str) -> dict:
    path = RECORDS / f"{part}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(part: str, data: dict) -> None:
    RECORDS.mkdir(parents=True, exist_ok=True)
    write_json(RECORDS / f"{part}.json", data)


def record(part: str, name: str, value) -> None:
    """Add one finished item to a phase's records under a lock: several processes may fill one phase
    (e.g. proxies split across workers with --proxy)."""
    import fcntl

    WORKDIR.mkdir(parents=True, exist_ok=True)
    with open(WORKDIR / f"{part}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(part)
        data[name] = value
        save(part, data)


def key(*parts) -> str:
    return "|".join(str(p) for p in parts)


# ---- data -----------------------------------------------------------------------------------------
def tokenizer_path() -> Path:
    """A BPE of TRUTH["vocab"] ids trained on the stdlib's training split (built once)."""
    from edge.corpus import stdlib_text
    from edge.tokenizer import train_tokenizer

    path = WORKDIR / f"tokenizer-{TRUTH['vocab']}.json"
    if not path.exists():
        WORKDIR.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            train_tokenizer(stdlib_text("train"), TRUTH["vocab"]).save(str(tmp))
    return path


def token_ids(split: str) -> np.ndarray:
    """The stdlib split tokenized with the validation tokenizer: the ids the `lm` proxy trains and scores on."""
    from arch_search.proxies import corpus_ids

    train, heldout = corpus_ids(None, str(tokenizer_path()))
    return heldout if split == "heldout" else train


def with_copies(windows: np.ndarray, rng: np.random.Generator, copies: int) -> tuple[np.ndarray, list]:
    """Copy `copies` spans of copy_len tokens from the first half of each window to a later place (at least
    min_gap after its source); returns the windows and, per window, the (source, destination) pairs."""
    windows = windows.copy()
    n_len, span, gap = windows.shape[1] - 1, TRUTH["copy_len"], TRUTH["min_gap"]
    placed = []
    for w in windows:
        pairs = []
        for _ in range(copies):
            a = int(rng.integers(0, n_len // 2 - span))
            b = int(rng.integers(a + span + gap, n_len - span))
            w[b:b + span] = w[a:a + span]
            pairs.append((a, b))
        placed.append(pairs)
    return windows, placed


def training_batches(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = token_ids("train")
    rng = np.random.default_rng(seed)
    n, length = steps * TRUTH["batch"], TRUTH["seq_len"] + 1
    starts = rng.integers(0, len(ids) - length, n)
    windows, _ = with_copies(np.stack([ids[s:s + length] for s in starts]), rng, TRUTH["copies"])
    return windows[:, :-1], windows[:, 1:]


def eval_sets() -> dict:
    """Fixed held-out windows: plain at 512 and at the training length, and the copy test."""
    ids = token_ids("heldout")
    rng = np.random.default_rng(12345)
    out = {}
    for length in sorted({512, TRUTH["seq_len"]}):
        n = min(TRUTH["eval_windows"] * TRUTH["seq_len"] // length, len(ids) // (length + 1))
        out[f"loss@{length}"] = ids[:n * (length + 1)].reshape(n, length + 1)
    starts = rng.integers(0, len(ids) - TRUTH["seq_len"] - 1, TRUTH["eval_windows"])
    plain = np.stack([ids[s:s + TRUTH["seq_len"] + 1] for s in starts])
    out["copy"] = with_copies(plain, rng, 1)
    return out


def score_truth(model, sets: dict) -> dict:
    from edge.train import token_losses

    out = {name: round(float(token_losses(model, windows).mean()), 4)
           for name, windows in sets.items() if name.startswith("loss@")}
    windows, placed = sets["copy"]
    losses = token_losses(model, windows)
    span = TRUTH["copy_len"]
    # position t scores token t+1: a span's tokens 2..span are predicted at its positions 1..span-1 (the
    # first token of a copy cannot be foreseen)
    first = np.mean([losses[i, a:a + span - 1].mean() for i, ((a, b),) in enumerate(placed)])
    second = np.mean([losses[i, b:b + span - 1].mean() for i, ((a, b),) in enumerate(placed)])
    out.update(first_loss=round(float(first), 4), copy_loss=round(float(second), 4),
               recall=round(float(first - second), 4))
    return out


# ---- phases ---------------------------------------------------------------------------------------
def phase_truth(names: list[str], threads: int) -> None:
    import torch

    from edge.train import train_fresh

    torch.set_num_threads(threads)
    protocol = {**TRUTH, **{k: list(TRUTH[k]) for k in ("seeds", "seed_repeat", "repeat_subset")}}
    records = load("ground_truth")
    if records.get("runs") and records["protocol"] != protocol:
        sys.exit(f"{RECORDS / 'ground_truth.json'} was trained with another protocol ({records['protocol']}); "
                 "move it away to start over")
    records["protocol"] = protocol
    truth = records.setdefault("runs", {})
    sample = archs(TRUTH["vocab"])
    sets = eval_sets()
    repeat = [n for n in names if n in TRUTH["repeat_subset"]]
    jobs = [(n, s) for s in TRUTH["seeds"] for n in names] + [(n, s) for s in TRUTH["seed_repeat"] for n in repeat]
    for i, (name, seed) in enumerate(jobs):
        if key(name, seed) in truth:
            continue
        config = sample[name].to_config()
        inputs, labels = training_batches(TRUTH["steps"], seed)
        started = time.perf_counter()
        model, final = train_fresh(config, inputs, labels, TRUTH["steps"], TRUTH["batch"], TRUTH["lr"], seed, threads,
                                   progress=f"[{i + 1}/{len(jobs)}] {name} seed {seed}")
        train_s = time.perf_counter() - started
        scores = score_truth(model, sets)
        truth[key(name, seed)] = {"arch": name, "seed": seed, **scores, "final_train_loss": round(final, 4),
                                  "train_s": round(train_s, 1),
                                  "params_m": round(config.n_params(include_embeddings=False) / 1e6, 4)}
        save("ground_truth", records)
        print(f"{name} seed {seed}: " + ", ".join(f"{k} {v}" for k, v in scores.items()) + f" ({train_s:.0f} s)",
              flush=True)


def phase_proxies(names: list[str], specs: list[str], threads: int) -> None:
    import torch

    from arch_search.proxies import ProxyContext, parse_proxy, score

    torch.set_num_threads(threads)
    values = load("proxies")
    sample = archs(TRUTH["vocab"])
    ctx = ProxyContext(tokenizer_path=tokenizer_path(), vocab_size=TRUTH["vocab"], seed=0, threads=threads)
    for spec in specs:
        proxy = parse_proxy(spec)
        for name in names:
            if key(proxy.spec(), name) in values:
                continue
            value, details = score(proxy, sample[name].to_config(), ctx)
            seconds = details.pop("quality_s")
            record("proxies", key(proxy.spec(), name), {"proxy": proxy.spec(), "arch": name, "value": value,
                                                        "direction": proxy.direction, "seconds": seconds,
                                                        "details": details})
            print(f"{proxy.spec()} {name}: {value:.4g} ({seconds:.1f} s)", flush=True)


def phase_latency(names: list[str], sample: dict[str, Candidate] | None = None) -> None:
    from arch_search.candidates import RandomBackbones
    from arch_search.measure import MeasureSettings, measure, summary

    latency = load("latency")
    settings = MeasureSettings(target="gguf", prefill_tokens=(512,), decode_depth=512)
    source = RandomBackbones("tiny", tokenizer_path(), TRUTH["vocab"])
    sample = sample or archs(TRUTH["vocab"])
    for name in names:
        if name in latency:
            continue
        work = WORKDIR / "measure" / name
        result = measure(source.write_checkpoint(sample[name], work / "checkpoint"), settings, work)
        latency[name] = {**{k: round(v, 4) for k, v in summary(result, settings).items()},
                         "noisy": result["noisy"], "cpu": _cpu()}
        save("latency", latency)
        print(f"{name}: decode {latency[name]['decode_ms']:.3f} ms/token", flush=True)


def _cpu() -> str:
    from device.probe import describe
    d = describe()
    return f"{d.get('cpu', '?')} ({' '.join(d.get('isa', []))})"


# ---- statistics -----------------------------------------------------------------------------------
def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either ranking count as neither concordant nor discordant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denominator = np.sqrt((dx != 0).sum() * (dy != 0).sum())
    return float((dx * dy).sum() / denominator) if denominator else float("nan")


def spearman(x, y) -> float:
    def ranks(v):
        v = np.asarray(v, float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for u in np.unique(v):  # average ranks for ties
            r[v == u] = r[v == u].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1]) if rx.std() and ry.std() else float("nan")


def bootstrap(stat, x, y, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of stat(x, y) over architectures resampled with replacement."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, float), np.asarray(y, float)
    draws = [stat(x[s], y[s]) for s in (rng.integers(0, len(x), len(x)) for _ in range(reps))]
    draws = [d for d in draws if np.isfinite(d)]
    return (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))) if draws else (float("nan"),) * 2


# ---- the search, checked (item 4 of issue 25) ----------------------------------------------------
def phase_search(quality: str, trials: int, budget_ms: float | None, threads: int) -> None:
    """`edge search` with `quality` at one decode budget; its best, the best LFM2 layout and the best
    all-attention-but-one architecture within the budget, each trained as the ground truth is."""
    import torch

    from edge.train import train_fresh

    done = load("search")
    latency = load("latency")
    if budget_ms is None:  # the median architecture's decode time: half of the sample fits
        budget_ms = round(float(np.median([latency[n]["decode_ms"] for n in archs(TRUTH["vocab"])])), 3)
    if done.get("quality") != quality or done.get("budget_ms") != budget_ms or done.get("trials") != trials:
        done = {"quality": quality, "budget_ms": budget_ms, "trials": trials, "trained": {}}
    out = WORKDIR / "search"
    if "front" not in done:
        import subprocess
        cmd = [sys.executable, "-m", "edge.cli", "search", "--target", "gguf", "--space", "tiny", "--quality", quality,
               "--budget", f"decode_ms@512={budget_ms}", "--trials", str(trials), "--out", str(out), "--tokenizer",
               str(tokenizer_path()), "--study", f"pv-{quality.replace(':', '-')}-{budget_ms}", "-t", str(threads)]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit("the search failed (see above)")
        trials_json = json.loads((out / "trials.json").read_text())
        done["front"] = json.loads((out / "front.json").read_text())["front"]
        done["seed_layouts"] = [t for t in trials_json if t.get("seed_layout")]
        save("search", done)
    maximize = not done["front"] or parse_direction(quality) == "maximize"
    best = sorted(done["front"], key=lambda r: ((-r["quality"] if maximize else r["quality"]), r["decode_ms"]))[0]
    contenders = {"search best": (best["candidate"], best["decode_ms"])}
    for t in done["seed_layouts"]:
        if t.get("feasible"):
            contenders[f"LFM2 layout trial {t['trial']}"] = (t["candidate"], t["decode_ms"])
    sample = {**archs(TRUTH["vocab"]), **archs(TRUTH["vocab"], _ALL_ATTENTION_BUT_ONE)}
    phase_latency([n for n, _, *_ in _ALL_ATTENTION_BUT_ONE], sample)
    latency = load("latency")
    # (b): the all-attention-but-one design with the most parameters within the budget
    fits = [n for n, v in latency.items() if n.startswith("conv1-attn") and v["decode_ms"] <= budget_ms]
    if fits:
        name = max(fits, key=lambda n: sample[n].to_config().n_params(include_embeddings=False))
        contenders[f"all-attention-but-one {name}"] = (sample[name].to_dict(), latency[name]["decode_ms"])
    torch.set_num_threads(threads)
    sets = eval_sets()
    for label, (cand, ms) in contenders.items():
        if label in done["trained"]:
            continue
        config = Candidate.from_dict(cand, "tiny").to_config()
        inputs, labels = training_batches(TRUTH["steps"], 0)
        model, _ = train_fresh(config, inputs, labels, TRUTH["steps"], TRUTH["batch"], TRUTH["lr"], 0, threads,
                               progress=label)
        done["trained"][label] = {"candidate": cand, "decode_ms": ms, **score_truth(model, sets)}
        save("search", done)
        print(f"{label}: {done['trained'][label]}", flush=True)


def parse_direction(spec: str) -> str:
    from arch_search.proxies import parse_proxy
    return parse_proxy(spec).direction


# ---- the report -----------------------------------------------------------------------------------
PRIMARY = f"loss@{TRUTH['seq_len']}"


def report() -> tuple[str, dict]:
    runs = load("ground_truth").get("runs", {})
    truth = {v["arch"]: v for v in runs.values() if v["seed"] == TRUTH["seeds"][0]}
    latency = load("latency")
    names = [n for n in archs(TRUTH["vocab"]) if n in truth]
    if len(names) < 4:
        return "too few trained architectures for a report", {}
    lines = [f"Ground truth: {len(names)} architectures, {TRUTH['steps'] * TRUTH['batch'] * TRUTH['seq_len'] / 1e6:.2f}M "
             f"training tokens each ({TRUTH['steps']} steps of {TRUTH['batch']} x {TRUTH['seq_len']}), scored by "
             f"held-out {PRIMARY}; tau/Spearman > 0 means the proxy ranks as training does.", ""]
    # the seed ceiling
    repeat = {v["arch"]: v for v in runs.values() if v["seed"] in TRUTH["seed_repeat"]}
    both = [n for n in names if n in repeat]
    ceiling = None
    if len(both) >= 4:
        a, b = [truth[n][PRIMARY] for n in both], [repeat[n][PRIMARY] for n in both]
        noise = float(np.mean(np.abs(np.subtract(a, b))))
        losses = [truth[n][PRIMARY] for n in names]
        pairs = [(x, y) for i, x in enumerate(losses) for y in losses[i + 1:]]
        ceiling = {"n": len(both), "tau": kendall_tau(a, b), "spearman": spearman(a, b),
                   "tau_ci": bootstrap(kendall_tau, a, b), "noise_nats": round(noise, 4),
                   "pairs_within_noise": sum(abs(x - y) < noise for x, y in pairs), "pairs": len(pairs)}
        lines.append(f"Seed-to-seed ceiling ({len(both)} architectures trained with seeds {TRUTH['seeds'][0]} and "
                     f"{TRUTH['seed_repeat'][0]}): Kendall tau {ceiling['tau']:.2f} "
                     f"[{ceiling['tau_ci'][0]:.2f}, {ceiling['tau_ci'][1]:.2f}], Spearman {ceiling['spearman']:.2f}; "
                     f"the seed moves {PRIMARY} by {noise:.3f} nats on average, more than separates "
                     f"{ceiling['pairs_within_noise']} of the sample's {len(pairs)} pairs of architectures (a proxy "
                     "cannot be expected to order those).")
        lines.append("")
    bands = _bands(names, latency)
    budgets = _budgets(names, latency)
    head = ["proxy", "tau [95% CI]", "Spearman [95% CI]", *[f"tau in {b}" for b in bands], "s / candidate",
            *[f"gap @ {ms:.3g} ms" for ms in budgets]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_proxy: dict[str, dict] = {}
    for v in load("proxies").values():
        by_proxy.setdefault(v["proxy"], {})[v["arch"]] = v
    # MAD's suite (`mad:STEPS`, no task) is the mean of its six tasks, each seeded as when run alone: derived here
    tasks = [by_proxy.get(f"mad:{t}:100", {}) for t in MAD_TASKS]
    by_proxy["mad:100"] = {n: {"value": float(np.mean([t[n]["value"] for t in tasks])), "direction": "maximize",
                               "seconds": sum(t[n]["seconds"] for t in tasks)}
                           for n in names if all(n in t for t in tasks)}
    summary = {"ceiling": ceiling, "proxies": {}, "bands": {b: ns for b, ns in bands.items()}, "budgets_ms": budgets}
    for spec, values in sorted(by_proxy.items()):
        common = [n for n in names if n in values]
        if len(common) < len(names):
            continue
        sign = 1 if values[common[0]]["direction"] == "maximize" else -1
        x = np.array([sign * values[n]["value"] for n in common])
        y = -np.array([truth[n][PRIMARY] for n in common])
        row = {"tau": kendall_tau(x, y), "tau_ci": bootstrap(kendall_tau, x, y), "spearman": spearman(x, y),
               "spearman_ci": bootstrap(spearman, x, y),
               "seconds": float(np.median([values[n]["seconds"] for n in common]))}
        row["bands"] = {b: kendall_tau([sign * values[n]["value"] for n in ns], [-truth[n][PRIMARY] for n in ns])
                        for b, ns in bands.items()}
        row["gaps"] = {str(ms): _gap(ms, common, latency, truth, {n: sign * values[n]["value"] for n in common})
                       for ms in budgets}
        summary["proxies"][spec] = row
        cells = [spec, f"{row['tau']:.2f} [{row['tau_ci'][0]:.2f}, {row['tau_ci'][1]:.2f}]",
                 f"{row['spearman']:.2f} [{row['spearman_ci'][0]:.2f}, {row['spearman_ci'][1]:.2f}]",
                 *[f"{row['bands'][b]:.2f}" for b in bands], f"{row['seconds']:.1f}",
                 *[_gap_cell(row["gaps"][str(ms)]) for ms in budgets]]
        lines.append("| " + " | ".join(cells) + " |")
    summary["default"] = choose_default(summary["proxies"])
    lines += ["", f"Default by `choose_default` (the cheapest proxy with tau >= {TAU_OVERALL} overall and >= "
              f"{TAU_BAND} in every band): **{summary['default']}**.", "",
              "Ground truth per architecture (seed 0):", "",
              "| architecture | params (M) | decode ms | " + " | ".join(k for k in ("loss@512", PRIMARY, "first_loss",
                                                                                 "copy_loss", "recall")) + " |",
              "|---|---|---|---|---|---|---|---|"]
    for n in sorted(names, key=lambda n: truth[n][PRIMARY]):
        t = truth[n]
        ms = latency.get(n, {}).get("decode_ms", float("nan"))
        lines.append(f"| {n} | {t['params_m']:.2f} | {ms:.3f} | " + " | ".join(
            f"{t[k]:.3f}" for k in ("loss@512", PRIMARY, "first_loss", "copy_loss", "recall")) + " |")
    s = load("search")
    if s.get("trained"):
        lines += ["", f"Search check: `edge search --quality {s['quality']}` ({s['trials']} trials) at decode_ms@512 <= "
                  f"{s['budget_ms']} ms, each contender trained as the ground truth:", "",
                  f"| contender | candidate | decode ms | {PRIMARY} | recall |", "|---|---|---|---|---|"]
        for label, t in sorted(s["trained"].items(), key=lambda kv: kv[1][PRIMARY]):
            c = Candidate.from_dict(t["candidate"], "tiny")
            lines.append(f"| {label} | {c.describe()} | {t['decode_ms']:.3f} | {t[PRIMARY]:.3f} | {t['recall']:.3f} |")
    return "\n".join(lines), summary


TAU_OVERALL, TAU_BAND = 0.7, 0.5   # issue 25's bar for the search's default proxy


def choose_default(rows: dict[str, dict]) -> str | None:
    """`edge search`'s default --quality: the cheapest proxy (median seconds per candidate) whose Kendall tau
    reaches TAU_OVERALL over all architectures and TAU_BAND within every latency band; if none does, the one
    with the best overall tau."""
    if not rows:
        return None
    passing = [s for s, r in rows.items()
               if r["tau"] >= TAU_OVERALL and all(t >= TAU_BAND for t in r["bands"].values())]
    if passing:
        return min(passing, key=lambda s: (rows[s]["seconds"], -rows[s]["tau"]))
    return max(rows, key=lambda s: rows[s]["tau"])


def _bands(names: list[str], latency: dict) -> dict[str, list[str]]:
    """Three latency bands of (nearly) equal size, by measured decode ms."""
    timed = sorted((n for n in names if n in latency), key=lambda n: latency[n]["decode_ms"])
    if len(timed) < 9:
        return {}
    thirds = np.array_split(np.array(timed), 3)
    return {f"{latency[t[0]]['decode_ms']:.2f}-{latency[t[-1]]['decode_ms']:.2f} ms": list(t) for t in thirds}


def _budgets(names: list[str], latency: dict) -> list[float]:
    """Three decode budgets: the 33rd, 50th and 75th percentile of the sample's decode ms."""
    ms = [latency[n]["decode_ms"] for n in names if n in latency]
    return [round(float(np.percentile(ms, q)), 3) for q in (33, 50, 75)] if len(ms) >= 4 else []


def _gap(budget: float, names: list[str], latency: dict, truth: dict, oriented: dict) -> dict:
    """Within the budget: the proxy's best architecture, the ground truth's best, and the loss between."""
    feasible = [n for n in names if n in latency and latency[n]["decode_ms"] <= budget]
    if not feasible:
        return {}
    picked = max(feasible, key=lambda n: oriented[n])
    best = min(feasible, key=lambda n: truth[n][PRIMARY])
    return {"picked": picked, "best": best, "gap": round(truth[picked][PRIMARY] - truth[best][PRIMARY], 4),
            "rank": sorted(feasible, key=lambda n: truth[n][PRIMARY]).index(picked) + 1, "of": len(feasible)}


def _gap_cell(g: dict) -> str:
    return f"+{g['gap']:.3f} (#{g['rank']}/{g['of']})" if g else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.proxy_validation", description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", action="append", choices=("truth", "proxies", "latency", "search", "report"),
                   help="run only these phases (repeatable; default: all, then the report)")
    p.add_argument("--proxy", action="append", help="proxy specs to measure (default: PROXIES)")
    p.add_argument("--arch", action="append", help="only these architectures (default: all)")
    p.add_argument("--search-quality", help="the proxy the search check runs with (default: edge search's)")
    p.add_argument("--search-trials", type=int, default=64)
    p.add_argument("--budget-ms", type=float, help="the search check's decode budget (default: the sample's median)")
    p.add_argument("-t", "--threads", type=int, default=2)
    args = p.parse_args(argv)
    phases = args.phase or ["truth", "latency", "proxies", "search", "report"]
    from edge.corpus import describe
    setup = load("setup")
    if not setup:  # what every phase's records rest on: the corpus on this machine, the tokenizer, the sample
        save("setup", {"corpus": describe(), "tokenizer_sha256": hashlib.sha256(tokenizer_path().read_bytes()).hexdigest(),
                       "architectures": {n: c.to_dict() for n, c in archs(TRUTH["vocab"]).items()}})
    names = args.arch or list(archs(TRUTH["vocab"]))
    if "truth" in phases:
        phase_truth(names, args.threads)
    if "latency" in phases:
        phase_latency(names)
    if "proxies" in phases:
        phase_proxies(names, args.proxy or PROXIES, args.threads)
    if "search" in phases:
        from arch_search.proxies import DEFAULT_PROXY
        phase_search(args.search_quality or DEFAULT_PROXY, args.search_trials, args.budget_ms, args.threads)
    if "report" in phases:
        table, summary = report()
        save("report", summary)
        with atomic_path(REPORT) as tmp:
            tmp.write_text(f"# Proxy validation (benchmarks/proxy_validation.py)\n\n{table}\n")
        print(table)
    return 0


PROXIES = ["params", "lm:10", "lm:30", "lm:100", "mqar:100", *(f"mad:{task}:100" for task in MAD_TASKS)]

if __name__ == "__main__":
    sys.exit(main())
