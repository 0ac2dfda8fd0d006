"""What a search leaves: the finished trials as rows, the Pareto front of the feasible ones, the budget
that came closest when none is, front.md / front.json / front.png / trials.json in OUT, and the best
candidate's checkpoint and artifact (`--export-best`)."""
from __future__ import annotations

from pathlib import Path

from edge.errors import EdgeError
from edge.formats import FORMATS

from .budgets import Budget
from .study import SearchSettings, _safe_url, is_finished


def trial_rows(study) -> list[dict]:
    """Every finished trial as a flat record (failed measurements included, with their reason)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if not is_finished(t):
            continue
        row = {"trial": t.number, "hash": t.user_attrs.get("hash"), "candidate": t.user_attrs.get("candidate"),
               "seed_layout": t.user_attrs.get("seed_layout"), "worker": t.user_attrs.get("worker"),
               "device": t.user_attrs.get("device", "local"), "drift": t.user_attrs.get("drift")}
        if t.state == TrialState.COMPLETE:
            row.update(quality=t.values[0], decode_ms=t.values[1], feasible=t.user_attrs.get("feasible", False),
                       violations=dict(t.constraints), figures=t.user_attrs.get("figures", {}),
                       measure_s=t.user_attrs.get("measure_s"), quality_s=t.user_attrs.get("quality_s"),
                       quality_details=t.user_attrs.get("quality_details"),
                       measurement=t.user_attrs.get("measurement"))
        else:
            row.update(failure=t.user_attrs["failure"], feasible=False)
        rows.append(row)
    return rows


def pareto_front(rows: list[dict], maximize: bool) -> list[dict]:
    """Feasible candidates no other feasible candidate beats on both quality and decode latency."""
    feasible = [r for r in rows if r.get("feasible") and "quality" in r]

    def better_or_equal(a, b):  # a at least as good as b on both objectives
        q = a["quality"] >= b["quality"] if maximize else a["quality"] <= b["quality"]
        return q and a["decode_ms"] <= b["decode_ms"]

    front = [r for r in feasible
             if not any(better_or_equal(o, r) and (o["quality"], o["decode_ms"]) != (r["quality"], r["decode_ms"])
                        for o in feasible)]
    return sorted(front, key=lambda r: r["decode_ms"])


def closest_miss(rows: list[dict], budgets: list[Budget]) -> dict | None:
    """With no feasible candidate: the budget that came closest to being met, by how much, by whom."""
    measured = [r for r in rows if "figures" in r]
    if not measured or not budgets:
        return None
    best = None
    for b in budgets:
        r = min(measured, key=lambda r: b.violation(r["figures"]))
        miss = {"budget": b.name, "limit": b.limit, "unit": b.unit, "best": r["figures"][b.key],
                "over": r["figures"][b.key] - b.limit, "relative": b.violation(r["figures"]), "trial": r["trial"],
                "candidate": r["candidate"]}
        # among budgets some candidate misses, the one missed by the smallest relative margin
        if miss["relative"] > 0 and (best is None or miss["relative"] < best["relative"]):
            best = miss
    if best is None:  # every budget is met by someone, just never all by the same candidate
        r = min(measured, key=lambda r: sum(max(0.0, b.violation(r["figures"])) for b in budgets))
        worst = max(budgets, key=lambda b: b.violation(r["figures"]))
        best = {"budget": worst.name, "limit": worst.limit, "unit": worst.unit, "best": r["figures"][worst.key],
                "over": r["figures"][worst.key] - worst.limit, "relative": worst.violation(r["figures"]),
                "trial": r["trial"], "candidate": r["candidate"], "jointly": True}
    return best


def describe_candidate(c: dict | None, settings: SearchSettings) -> str:
    """One short line for a stored candidate: d8 w256 h8/kv4 ffn1024 attn[2,5] L3."""
    return settings.source.from_record(c).describe() if c else "?"


def front_table(front: list[dict], settings: SearchSettings) -> str:
    extra = [b.key for b in settings.budgets if b.key not in ("decode_ms",)]
    prefill_keys = [f"prefill_ms@{n}" for n in settings.measure.prefill_tokens]
    cols = ["decode_ms", *dict.fromkeys([*prefill_keys, *extra, "peak_rss_mb", "kv_mb", "artifact_mb"])]
    with_params = settings.proxy.name != "params"  # else the quality column already is the parameter count
    head = ["trial", "candidate", settings.proxy.label, *cols, *(["params (M)"] if with_params else []), "hash"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in front:
        c = r["candidate"]
        name = describe_candidate(c, settings) + (" (LFM2 layout)" if r.get("seed_layout") else "")
        cells = [str(r["trial"]), name, f"{r['quality']:.4g}",
                 *[f"{r['figures'].get(k, float('nan')):.4g}" for k in cols],
                 *([f"{_params_m(c, settings):.3g}"] if with_params else []), r["hash"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _params_m(c: dict, settings: SearchSettings) -> float:
    return settings.source.from_record(c).to_config().n_params(include_embeddings=False) / 1e6


def plot(rows: list[dict], front: list[dict], settings: SearchSettings, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge.files import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 5))
    done = [r for r in rows if "quality" in r]
    feasible = [r for r in done if r["feasible"]]
    infeasible = [r for r in done if not r["feasible"]]
    ax.scatter([r["decode_ms"] for r in feasible], [r["quality"] for r in feasible], c="tab:blue", s=28,
               label=f"within budget ({len(feasible)})")
    ax.scatter([r["decode_ms"] for r in infeasible], [r["quality"] for r in infeasible], c="tab:gray", marker="x",
               s=28, label=f"over budget ({len(infeasible)})")
    if front:
        ax.plot([r["decode_ms"] for r in front], [r["quality"] for r in front], "-o", c="tab:red", ms=7,
                mfc="none", label="Pareto front")
    seeds = [r for r in done if r.get("seed_layout")]
    if seeds:
        ax.scatter([r["decode_ms"] for r in seeds], [r["quality"] for r in seeds], marker="s", s=70, facecolors="none",
                   edgecolors="tab:green", label="LFM2 layouts (seeded)")
    for b in settings.budgets:
        if b.metric == "decode_ms":
            ax.axvline(b.limit, ls="--", c="tab:orange", label=f"budget {b.name} = {b.limit:g} {b.unit}")
    others = [f"{b.name} <= {b.limit:g} {b.unit}" for b in settings.budgets if b.metric != "decode_ms"]
    ax.set_xlabel(f"decode ms/token at {settings.measure.decode_depth} tokens of context "
                  f"({settings.measure.target}, {settings.measure.threads} thread(s))")
    ax.set_ylabel(settings.proxy.label)
    ax.set_title(f"edge search, {settings.source.describe()}: {len(done)} measured candidates"
                 + (f"\nalso bounded: {', '.join(others)}" if others else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_results(study, settings: SearchSettings) -> dict:
    """front.md / front.json / front.png / trials.json in OUT; returns the summary (front, miss)."""
    from edge.files import atomic_path, write_json

    rows = trial_rows(study)
    front = pareto_front(rows, maximize=settings.proxy.direction == "maximize")
    miss = None if front else closest_miss(rows, settings.budgets)
    measured = [r for r in rows if "measure_s" in r]
    timing = {
        "finished_trials": len(rows), "measured": len(measured), "failed": sum("failure" in r for r in rows),
        "median_measure_s": _median([r["measure_s"] for r in measured]),
        "median_quality_s": _median([r["quality_s"] for r in measured]),
        "total_measure_s": round(sum(r["measure_s"] for r in measured), 1),
        "total_quality_s": round(sum(r["quality_s"] or 0 for r in measured), 1),
    }
    result = {"study": settings.study_name, "storage": _safe_url(settings.storage_url), "source": settings.source.identity(),
              "quality": settings.proxy.spec(), "objectives": [settings.proxy.label, "decode_ms"],
              "budgets": [{"budget": b.name, "limit": b.limit, "unit": b.unit} for b in settings.budgets],
              "measure": settings.measure.to_dict(), "timing": timing, "front": front, "closest_miss": miss}
    settings.out.mkdir(parents=True, exist_ok=True)
    table = front_table(front, settings)
    with atomic_path(settings.out / "front.md") as tmp:
        tmp.write_text(f"# Pareto front: {settings.study_name}\n\n{table}\n")
    write_json(settings.out / "front.json", result)
    write_json(settings.out / "trials.json", rows)
    plot(rows, front, settings, settings.out / "front.png")
    result["table"] = table
    return result


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return round(xs[len(xs) // 2], 3) if xs else None


def best_candidate(front: list[dict], maximize: bool) -> dict:
    """The feasible candidate with the best quality (the fastest among equals)."""
    return sorted(front, key=lambda r: ((-r["quality"] if maximize else r["quality"]), r["decode_ms"]))[0]


def export_best(row: dict, settings: SearchSettings, out_dir: Path) -> tuple[Path, Path]:
    """Rebuild the winning candidate from its source (the checkpoint `--export-best` ships: the measured
    random weights, or a parent's child trained), write it and its artifact; (checkpoint, artifact)."""
    from export import export_model

    source = settings.source
    candidate = source.from_record(row["candidate"])
    if source.hash(candidate) != row["hash"]:
        raise EdgeError(f"trial {row['trial']}'s candidate does not rebuild to hash {row['hash']}; was the space "
                        "changed since the search? rerun the search")
    checkpoint = source.export_checkpoint(candidate, out_dir / "checkpoint", seed=settings.measure.seed)
    m = settings.measure
    artifact = export_model(m.target, checkpoint, out_dir / f"model{FORMATS[m.target].suffix}", quant=m.quant,
                            kv_cache=m.kv_cache, max_seq_len=m.max_seq_len)
    return checkpoint, artifact
