"""A real hardware-in-the-loop search on this machine, with a budget derived from LFM2-350M.

1. Measure the lfm2-350m preset's backbone here, exactly as every candidate is measured (random weights,
   GGUF q8_0, llama.cpp, 1 thread, decode ms/token with 512 tokens of context, prefill of 512 tokens).
   Its vocabulary is the search tokenizer's (8192, trained on the default corpus), like the candidates',
   so the comparison is backbone against backbone.
2. Scale the budget down: decode_ms@512 <= LFM2-350M's / SCALE and prefill_ms@512 <= LFM2-350M's / SCALE,
   i.e. "a backbone SCALE x faster than LFM2-350M on this CPU" (SCALE 4 by default), which the `small`
   space (4-16 layers, width 128-1024) straddles.
3. Run `edge search` (NSGA-II, seeded with LFM2's layouts scaled to the space) for --trials candidates
   and write the front (md, json, png), all trials and the timing to benchmarks/results/search/STUDY/.
4. Compare the front with the seeded LFM2 layouts at equal latency: for each LFM2 layout, the best
   front candidate that decodes at most as slowly, and its quality relative to the layout.

    python -m benchmarks.bench_search [--trials 36] [--scale 4] [--quality params] [--space small]
    python -m benchmarks.bench_search --space tiny --quality mqar:100 --scale 30 --trials 24

The study is SQLite in benchmarks/work/search/, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time

from arch_search.budgets import measure_settings_for, parse_budget
from arch_search.candidates import RandomBackbones
from arch_search.measure import MeasureSettings, measure, summary
from arch_search.proxies import parse_proxy
from arch_search.results import describe_candidate, trial_rows, write_results
from arch_search.study import SearchSettings
from arch_search.worker import run_search
from benchmarks.common import RESULTS as RESULTS_ROOT
from benchmarks.common import WORK as WORK_ROOT
from edge.checkpoint import save_model
from edge.config import preset
from edge.model import HybridLM
from edge.files import write_json
from edge.tokenizer import default_corpus, load_tokenizer, train_tokenizer

WORK = WORK_ROOT / "search"
RESULTS = RESULTS_ROOT / "search"
CONTEXT = 512


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=36)
    p.add_argument("--scale", type=float, default=4.0, help="budget = LFM2-350M's latency / SCALE")
    p.add_argument("--quality", default="params")
    p.add_argument("--space", default="small")
    p.add_argument("--study", default=None, help="study name (default: bench-SPACE-QUALITY)")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)

    tokenizer_path = WORK / "tokenizer.json"
    if not tokenizer_path.exists():
        train_tokenizer(default_corpus(), 8192).save(str(tokenizer_path))
    vocab = load_tokenizer(tokenizer_path).get_vocab_size()

    # 1. the reference: LFM2-350M's backbone, measured like a candidate (cached: it takes minutes)
    reference_file = WORK / "lfm2-350m.json"
    protocol = dict(target="gguf", quant="q8_0", kv_cache="f16", prefill_tokens=(CONTEXT,), decode_depth=CONTEXT,
                    n_gen=32, repetitions=3, threads=1)
    if reference_file.exists():
        reference = json.loads(reference_file.read_text())
    else:
        print("measuring the lfm2-350m preset (vocab %d) ..." % vocab, flush=True)
        config = preset("lfm2-350m", vocab_size=vocab)
        checkpoint = WORK / "lfm2-350m-measure" / "checkpoint"
        save_model(HybridLM(config).init_weights(0), checkpoint)
        shutil.copyfile(tokenizer_path, checkpoint / "tokenizer.json")
        result = measure(checkpoint, MeasureSettings(**protocol), WORK / "lfm2-350m-measure")
        reference = {"config": "lfm2-350m preset, vocab %d" % vocab, "result": result,
                     "figures": summary(result, MeasureSettings(**protocol)),
                     "non_embedding_params_m": config.n_params(include_embeddings=False) / 1e6}
        write_json(reference_file, reference)
    ref = reference["figures"]
    print(f"lfm2-350m here: decode {ref['decode_ms']:.2f} ms/token @ {CONTEXT}, prefill {CONTEXT} tokens "
          f"{ref[f'prefill_ms@{CONTEXT}']:.1f} ms, peak RSS {ref['peak_rss_mb']:.0f} MiB", flush=True)

    # 2. the budget, scaled down
    budgets = [parse_budget(f"decode_ms@{CONTEXT}={ref['decode_ms'] / args.scale:.4f}"),
               parse_budget(f"prefill_ms@{CONTEXT}={ref[f'prefill_ms@{CONTEXT}'] / args.scale:.3f}")]
    settings = SearchSettings(
        source=RandomBackbones(args.space, tokenizer_path, vocab), proxy=parse_proxy(args.quality), budgets=budgets,
        measure=measure_settings_for(budgets, target="gguf", quant="q8_0", kv_cache="f16", threads=1),
        trials=args.trials, out=WORK,
        study_name=args.study or f"bench-{args.space}-{args.quality.split(':')[0]}", seed=0)

    # 3. the search (resumable), then its results
    started = time.perf_counter()
    study = run_search(settings, log=lambda m: print(m, flush=True))
    wall_s = time.perf_counter() - started
    results = RESULTS / settings.study_name
    settings.out = results
    result = write_results(study, settings)
    rows = trial_rows(study)
    # throughput over the whole study, resumed runs included: first trial start to last trial end
    done = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete and t.number in
            {r["trial"] for r in rows}]
    span_s = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()

    # 4. the LFM2 layouts against the front at equal (or lower) latency
    maximize = settings.proxy.direction == "maximize"
    comparison = []
    for seed in (r for r in rows if r.get("seed_layout") and "quality" in r):
        rivals = [f for f in result["front"] if f["decode_ms"] <= seed["decode_ms"]]
        best = (max if maximize else min)(rivals, key=lambda f: f["quality"]) if rivals else None
        comparison.append({
            "lfm2_layout": describe_candidate(seed["candidate"], settings), "trial": seed["trial"],
            "decode_ms": seed["decode_ms"], "quality": seed["quality"], "feasible": seed["feasible"],
            "best_front_at_equal_latency": None if best is None else {
                "candidate": describe_candidate(best["candidate"], settings), "trial": best["trial"],
                "decode_ms": best["decode_ms"], "quality": best["quality"],
                "quality_ratio": best["quality"] / seed["quality"] if seed["quality"] else None,
                "is_the_layout_itself": best["hash"] == seed["hash"]}})
    measured_now = result["timing"]["measured"]
    summary_out = {
        "machine": reference["result"].get("engine"), "reference_lfm2_350m": ref,
        "reference_non_embedding_params_m": reference["non_embedding_params_m"], "scale": args.scale,
        "budgets": result["budgets"], "space": args.space, "quality": settings.proxy.spec(),
        "trials": len(rows), "wall_s_this_run": round(wall_s, 1), "study_span_s": round(span_s, 1),
        "candidates_per_hour": round(3600 * len(rows) / max(1e-9, span_s), 1),
        "candidates_per_hour_measure_and_proxy_only": round(
            3600 * result["timing"]["measured"] /
            max(1e-9, result["timing"]["total_measure_s"] + result["timing"]["total_quality_s"]), 1),
        "timing": result["timing"], "front_size": len(result["front"]), "lfm2_layouts_vs_front": comparison,
    }
    write_json(results / "bench_search.json", summary_out)
    print(f"\nPareto front ({len(result['front'])} feasible of {len(rows)}):\n{result['table']}\n")
    print(f"{measured_now} candidates measured; {summary_out['candidates_per_hour']} candidates/hour over the study "
          f"(median measurement {result['timing']['median_measure_s']} s, median proxy "
          f"{result['timing']['median_quality_s']} s)")
    for c in comparison:
        b = c["best_front_at_equal_latency"]
        quality = (f"{c['quality']:.4g}" if c["feasible"] or not settings.proxy.trains
                   else "not trained (over budget)")
        ratio = f" (x{b['quality_ratio']:.2f})" if b and b["quality_ratio"] and (c["feasible"] or not settings.proxy.trains) else ""
        print(f"LFM2 layout {c['lfm2_layout']}: {c['decode_ms']:.3f} ms, {settings.proxy.label} {quality}"
              + (f" -> front at <= that latency: {b['candidate']} {b['decode_ms']:.3f} ms, {b['quality']:.4g}{ratio}"
                 if b else " -> no feasible front candidate at that latency"))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
