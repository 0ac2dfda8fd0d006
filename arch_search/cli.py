"""`edge search`: parse the options, run (or resume, or join) the study, write and print the results."""
from __future__ import annotations

import sys
from pathlib import Path

from edge.errors import EdgeError

from .budgets import measure_settings_for, parse_budget
from .candidates import RandomBackbones
from .proxies import parse_proxy
from .results import best_candidate, describe_candidate, export_best, write_results
from .space import bounds
from .study import SearchSettings
from .worker import run_search

# vocabulary of the tokenizer trained when --tokenizer is not given (the default corpus yields ~10k tokens)
DEFAULT_VOCAB = {"tiny": 1024, "small": 8192, "full": 8192}


def search_tokenizer(args, out: Path) -> tuple[Path, int]:
    """The tokenizer every candidate is built with: --tokenizer, else one trained once into OUT."""
    from edge.tokenizer import default_corpus, load_tokenizer, train_tokenizer

    given = getattr(args, "tokenizer", None)
    if given:
        tok = load_tokenizer(given)
        path = out / "tokenizer.json"
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
        return path, tok.get_vocab_size()
    path = out / "tokenizer.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        tok = train_tokenizer(default_corpus(), DEFAULT_VOCAB[args.space])
        tmp = path.with_name(".tokenizer.json.partial")
        tok.save(str(tmp))
        tmp.replace(path)
    return path, load_tokenizer(path).get_vocab_size()


def check_target(target: str, quant: str | None, kv_cache: str | None) -> None:
    from edge import formats

    formats.get(target).check(quant or None, kv_cache or None, flags=True)


def settings_from_args(args) -> SearchSettings:
    proxy = parse_proxy(args.quality)
    budgets = [parse_budget(spec) for spec in args.budget]
    names = [b.name for b in budgets]
    if len(set(names)) != len(names):
        raise EdgeError(f"--budget {next(n for n in names if names.count(n) > 1)} is given twice; give each once")
    bounds(args.space)
    if args.trials < 1:
        raise EdgeError(f"--trials must be at least 1, got {args.trials}")
    if getattr(args, "drift_every", 0) < 0:
        raise EdgeError(f"--drift-every must be 0 (off) or a positive number of candidates, got {args.drift_every}")
    if args.threads is not None and args.threads < 1:
        raise EdgeError(f"-t must be at least 1, got {args.threads}")
    check_target(args.target, args.quant, args.kv_cache)
    out = Path(args.out)
    tokenizer_path, vocab = search_tokenizer(args, out)
    measure = measure_settings_for(budgets, target=args.target, quant=args.quant, kv_cache=args.kv_cache,
                                   threads=args.threads or 1)
    source = RandomBackbones(args.space, tokenizer_path, vocab)
    return SearchSettings(source=source, proxy=proxy, budgets=budgets, measure=measure, trials=args.trials,
                          out=out, storage=args.storage,
                          study_name=args.study, seed=args.seed, devices=getattr(args, "device", None),
                          device_token_file=getattr(args, "device_token_file", None),
                          drift_every=getattr(args, "drift_every", 0))


def main(args) -> None:
    settings = settings_from_args(args)
    study = run_search(settings, log=lambda msg: print(msg, flush=True))
    result = write_results(study, settings)
    out = settings.out
    print(f"\n{result['timing']['finished_trials']} finished trials "
          f"(median measurement {result['timing']['median_measure_s']} s, "
          f"median quality proxy {result['timing']['median_quality_s']} s)")
    if not result["front"]:
        miss = result["closest_miss"]
        if miss is None:
            raise EdgeError(f"no candidate could be measured ({result['timing']['failed']} failed); "
                            f"see {out / 'trials.json'} for the reasons")
        how = "jointly with the other budgets " if miss.get("jointly") else ""
        raise EdgeError(
            f"no candidate meets every budget; closest: {miss['budget']}={miss['limit']:g} missed {how}by "
            f"{miss['over']:.4g} {miss['unit']} ({100 * miss['relative']:.0f}%) by trial {miss['trial']} "
            f"({describe_candidate(miss['candidate'], settings)}); raise that budget or search a smaller --space "
            f"(all trials: {out / 'trials.json'}, plot: {out / 'front.png'})")
    print(f"Pareto front of the feasible candidates ({len(result['front'])}):\n")
    print(result["table"])
    print(f"\nwrote {out / 'front.md'}, {out / 'front.json'}, {out / 'front.png'}, {out / 'trials.json'}")
    if args.export_best:
        best = best_candidate(result["front"], maximize=settings.proxy.direction == "maximize")
        checkpoint, artifact = export_best(best, settings, Path(args.export_best))
        print(f"best feasible candidate: trial {best['trial']} ({describe_candidate(best['candidate'], settings)}); "
              f"wrote {checkpoint} ({settings.source.export_note}) and {artifact}")
    sys.stdout.flush()
