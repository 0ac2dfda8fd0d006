"""Bytes against fidelity (issues 15 and 27): each format's 4-bit settings and each peer's default, as bytes
per decoded token against the cosine and KL divergence of their logits to Hugging Face transformers'
`Lfm2ForCausalLM`, on four kinds of checkpoint.

    PYTHONPATH=$PWD python -m benchmarks.bench_fidelity [--checkpoints random trained text lfm2-350m]
        [--formats gguf onnx executorch] [--only LABEL ...]

Checkpoints:
- random: transformers-made random weights (transformers' init, normal std 0.02), the parity.GQA_8_2 shape
  (hidden 128, 4 layers, 8 query / 2 KV heads); the hardest for 4-bit rounding (tests/parity.py says why).
- trained: that checkpoint after TRAIN_STEPS of edge.train on the default corpus (seconds; the tests' kind).
- text: an LFM2-shaped model (hidden 256, 8 layers, widths multiples of 256 so that K-quants and IQ4_XS
  apply without fallbacks) trained TEXT_STEPS on the standard library's source, long enough for a trained
  model's weight statistics (built once, ~25-60 min of one core: `build_text_checkpoint`).
- lfm2-350m: transformers-made random weights at LFM2-350M's shapes (1.3 GB fp32; built once).

Fidelity, on two 64-token sequences, each through the docs/design.md §5 protocol (tests/parity.py: the first
half one prefill, the rest decoded one token at a time through the artifact's Session, against
transformers' full forward): `ids`, random token ids (§5's sequence: the "bound" column), and `text`, 64
tokens of standard-library source never trained on (HELD_OUT). Mean and min cosine of the logit vectors,
and the mean KL divergence KL(reference || artifact) of the next-token distributions (nats), per sequence.
Every artifact has its format's 8-bit KV cache (gguf q8_0, executorch int8, onnx int8) except where the
peer's runtime has none in the row (genai and export_llama: fp32) and GGUF at head_dim 16 (f16: llama.cpp's
q8_0 cache needs head_dim % 32).

Bytes per decoded token (`read_bytes`): the bytes of every matrix a decode step multiplies by, the lm_head
included and the embedding table left out (a step reads one of its rows): at the memory roofline, decode
speed follows it. gguf: the tensors' data (gguf.GGUFReader) except token_embd when an output matrix exists;
onnx: the initializers MatMul-type nodes read; executorch: its linears in XNNPACK's stored layout, counted
from the shapes (`executorch_read_bytes`). `bpw_read` = read_bytes * 8 / the
parameters of those matrices. `file_bytes` is the whole artifact.

Writes benchmarks/results/fidelity.json and fidelity.md (rows of an --only run are merged into them).
Checkpoints and artifacts go under benchmarks/work/fidelity*/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.config import HybridConfig, preset
from edge.files import atomic_path, write_json
from edge.formats import FORMATS
from edge.tokenizer import default_corpus, train_tokenizer
from export import export_model
from export.gguf import quantize_with_llamacpp
from runtime.bench import artifact_bytes
from tests.parity import BOUNDS, GQA_8_2, random_ids, session_logits, transformers_checkpoint, transformers_logits

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work" / "fidelity"
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_STEPS = 300   # ~1 min of one CPU core at this size: loss falls from ln(1024) ~6.9 to ~3
MAX_SEQ_LEN = 96
KV_8BIT = {"gguf": "q8_0", "executorch": "int8", "onnx": "int8"}
CHECKPOINTS = ("random", "trained", "text", "lfm2-350m")

# ---- the checkpoints --------------------------------------------------------------------------------
# The "text" checkpoint (issue 27): an LFM2-shaped model trained on real text long enough for its weights to
# have a trained model's statistics (outlier columns, unequal row norms), which a few hundred steps do not give.
# Widths are multiples of 256, so llama.cpp's K-quants and IQ4_XS (super-blocks of 256) apply to every matrix
# without falling back. Trained on the standard library's top-level modules except HELD_OUT, on one thread.
TEXT_CONFIG = dict(vocab_size=2048, hidden_size=256, intermediate_size=1152, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2,
                   layer_types=["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv",
                                "full_attention"])
TEXT_STEPS, TEXT_BATCH, TEXT_SEQ = 500, 16, 128
HELD_OUT = ("difflib.py", "fractions.py", "heapq.py", "shlex.py")  # never trained on: the `text` sequence
WORK_TEXT = ROOT / "benchmarks" / "work" / "fidelity-text"
WORK_350M = ROOT / "benchmarks" / "work" / "fidelity-lfm2-350m"


def stdlib_files(held_out: bool) -> list[Path]:
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f for f in files if (f.name in HELD_OUT) == held_out]


def stdlib_text(held_out: bool) -> str:
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files(held_out))


def build_text_checkpoint(path: Path = WORK_TEXT) -> Path:
    """Train (or reuse) the text checkpoint: edge.train on TEXT_STEPS batches of TEXT_BATCH x TEXT_SEQ tokens."""
    from edge.checkpoint import save_model
    from edge.model import HybridLM
    from edge.tokenizer import save_tokenizer
    from edge.train import lm_batches, train

    if (path / "config.json").is_file():
        return path
    config = preset("tiny").replace(**TEXT_CONFIG)
    tokenizer = train_tokenizer(default_corpus(), config.vocab_size)
    ids = np.array(tokenizer.encode(stdlib_text(held_out=False)).ids, dtype=np.int64)
    inputs, labels = lm_batches(ids, TEXT_STEPS, TEXT_BATCH, TEXT_SEQ, seed=0)
    model = HybridLM(config).init_weights(0)
    started = time.time()
    loss = train(model, inputs, labels, TEXT_STEPS, TEXT_BATCH, lr=3e-3, seed=0, threads=1)
    print(f"text checkpoint: {len(ids)} tokens of stdlib text, {TEXT_STEPS} steps of {TEXT_BATCH}x{TEXT_SEQ} in "
          f"{time.time() - started:.0f} s, final loss {loss:.2f}", flush=True)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    save_tokenizer(tokenizer, tmp)
    (tmp / "training.json").write_text(json.dumps(dict(steps=TEXT_STEPS, batch=TEXT_BATCH, seq_len=TEXT_SEQ,
                                                       tokens=int(len(ids)), final_loss=loss)))
    tmp.rename(path)
    return path


def build_checkpoints(names: list[str], work: Path) -> dict[str, Path]:
    """random: transformers-made (GQA_8_2 shape, transformers' init); trained: that checkpoint after
    TRAIN_STEPS of language-model training on the default corpus (edge.train); text and lfm2-350m: built
    once and kept (see the module docstring)."""
    from edge.checkpoint import load_model, save_model
    from edge.tokenizer import save_tokenizer
    from edge.train import train_on_text

    out = {}
    if {"random", "trained"} & set(names):
        config = preset("tiny").replace(**GQA_8_2)
        tokenizer = train_tokenizer(default_corpus(), config.vocab_size)
        shutil.rmtree(work, ignore_errors=True)  # each run starts from fresh checkpoints
        out["random"] = transformers_checkpoint(work / "random", tokenizer, config, seed=0)
        if "trained" in names:
            model = load_model(out["random"])
            started = time.time()
            loss = train_on_text(model.train(), tokenizer, default_corpus(), TRAIN_STEPS, seed=0, threads=1)
            print(f"trained {TRAIN_STEPS} steps in {time.time() - started:.0f} s, final loss {loss:.2f}", flush=True)
            save_model(model, work / "trained")
            save_tokenizer(tokenizer, work / "trained")
            out["trained"] = work / "trained"
    if "text" in names:
        out["text"] = build_text_checkpoint()
    if "lfm2-350m" in names:
        if not (WORK_350M / "config.json").is_file():
            config = preset("lfm2-350m")
            transformers_checkpoint(WORK_350M, train_tokenizer(default_corpus(), config.vocab_size), config, seed=0)
        out["lfm2-350m"] = WORK_350M
    return {k: v for k, v in out.items() if k in names}


# ---- the settings ---------------------------------------------------------------------------------------
GENAI = "genai builder int4"  # the peer's model: onnxruntime-genai's builder, -p int4 -e cpu (benchmarks/peers.py)
EXPORT_LLAMA = "export_llama 8da4w"  # ExecuTorch's own LLM export (benchmarks/peers.py: -qmode 8da4w -G 32)
LLAMA_Q4_0 = "llama.cpp q4_0"  # llama.cpp's quantizer on our f32 GGUF: q4_0's mix (output q6_K)
TINY = ("random", "trained", "text")
ALL = (*TINY, "lfm2-350m")


@dataclass(frozen=True)
class Setting:
    fmt: str
    quant: str
    options: dict = field(default_factory=dict)
    note: str = ""
    checkpoints: tuple = TINY
    peer: bool = False   # another system's default, not an option of ours


# Each format's 8-bit row marks the 8-bit side of the frontier; the 4-bit rows are our options and the peers'
# defaults. An ExecuTorch export takes 2-4 min on the shared 2-core machine (8+ at 350M), so its settings are
# fewer. The rows at lfm2-350m are each format's default and its peers.
SETTINGS = [
    Setting("gguf", "q8_0", {}, "8-bit reference", ("random", "text")),
    Setting("gguf", "q4_0", {"quant_method": "plain"}, "gguf-py: blocks of 32, symmetric; output q8_0", ALL),
    Setting("gguf", LLAMA_Q4_0, {}, "llama.cpp's quantizer, no imatrix: output q6_K (q8_0 if rows % 256)", ALL, True),
    Setting("gguf", "q4_0", {"quant_method": "imatrix"}, "llama.cpp's quantizer with our imatrix; first ffn_down q4_1", ALL),
    Setting("gguf", "q4_k_s", {"quant_method": "imatrix"}, "llama.cpp's Q4_K_S mix with imatrix"),
    Setting("gguf", "q4_k_m", {"quant_method": "plain"}, "llama.cpp's Q4_K_M mix, no imatrix", ALL, True),
    Setting("gguf", "q4_k_m", {"quant_method": "imatrix"}, "llama.cpp's Q4_K_M mix with imatrix", ALL),
    Setting("gguf", "iq4_xs", {"quant_method": "plain"}, "llama.cpp's IQ4_XS mix, no imatrix", ALL, True),
    Setting("gguf", "iq4_xs", {"quant_method": "imatrix"}, "llama.cpp's IQ4_XS mix with imatrix", ALL),
    Setting("onnx", "int8", {}, "8-bit reference: per-channel 7-bit, fp32 embedding", ("random", "text")),
    Setting("onnx", "int4", {"quant_method": "rtn"}, "symmetric block 32; 8-bit head, the embedding reads it", ALL),
    Setting("onnx", "int4", {"quant_method": "rtn", "head_bits": 4}, "symmetric block 32, 4-bit head"),
    Setting("onnx", "int4", {"quant_method": "rtn", "group_size": 64}, "symmetric block 64; 8-bit head", ALL),
    Setting("onnx", "int4", {"quant_method": "rtn", "group_size": 128}, "symmetric block 128; 8-bit head"),
    Setting("onnx", "int4", {"quant_method": "k_quant"}, "asymmetric (uint8 zero points) block 32; 8-bit head"),
    Setting("onnx", "int4", {"quant_method": "k_quant", "head_bits": 4}, "k_quant block 32, 4-bit head"),
    Setting("onnx", "int4", {"quant_method": "k_quant", "group_size": 64}, "k_quant block 64; 8-bit head"),
    Setting("onnx", "int4", {"quant_method": "k_quant", "group_size": 128}, "k_quant block 128; 8-bit head"),
    Setting("onnx", "int4", {"quant_method": "hqq"}, "asymmetric (fp32 zero points) block 32; 8-bit head"),
    Setting("onnx", "int4", {"quant_method": "hqq", "head_bits": 4}, "hqq block 32, 4-bit head; fp32 embedding"),
    Setting("onnx", "int4", {"quant_method": "hqq", "group_size": 64, "head_bits": 4}, "hqq block 64, 4-bit head"),
    Setting("onnx", "int4", {"quant_method": "gptq"}, "ORT's GPTQ, symmetric block 32; 8-bit head"),
    Setting("onnx", GENAI, {}, "symmetric block 32, 4-bit head; fp32 KV", ALL, True),
    Setting("onnx", GENAI, {"algo_config": "k_quant"}, "k_quant block 32, 4-bit head; fp32 KV", ALL, True),
    Setting("onnx", GENAI, {"algo_config": "k_quant_last"}, "k_quant block 32, 8-bit head; fp32 KV", TINY, True),
    Setting("onnx", GENAI, {"algo_config": "rtn_last"}, "ORT's RTN block 32, 8-bit head; fp32 KV", TINY, True),
    Setting("executorch", "8da4w", {"quant_method": "rtn"}, "group 32; int8 embedding; lm_head int8 per channel", ALL),
    Setting("executorch", "8da4w", {"quant_method": "hqq"}, "group 32; int8 embedding; lm_head int8 per channel", ALL),
    Setting("executorch", "8da4w", {"quant_method": "hqq", "head_bits": 4}, "group 32; int8 embedding; 4-bit head"),
    Setting("executorch", "8da4w", {"quant_method": "hqq", "group_size": 64}, "group 64; lm_head int8", ALL),
    Setting("executorch", EXPORT_LLAMA, {}, "hqq group 32 incl. the output; fp32 embedding and KV", ALL, True),
]


def label(quant: str, options: dict) -> str:
    return "-".join([quant.replace(" ", "-")] + [f"{k}{v}" for k, v in options.items()])


def kv_cache(fmt: str, head_dim: int) -> str:
    return "f16" if fmt == "gguf" and head_dim % 32 else KV_8BIT[fmt]


def export_setting(s: Setting, model_dir: Path, out: Path) -> Path:
    from benchmarks import peers

    config = HybridConfig.load(model_dir)
    kv = kv_cache(s.fmt, config.head_dim)
    if s.quant == GENAI:  # a folder; extra options as the builder's --extra_options KEY=VALUE
        out = out.with_suffix("")
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--extra_options", *(f"{k}={v}" for k, v in s.options.items())] if s.options else []
        peers.build_genai(model_dir, out, *extra)
        return out
    if s.quant == EXPORT_LLAMA:
        model = peers.EXPORT_LLAMA_MODELS["lfm2-350m"]
        peers.export_stock_pte(model_dir, out, model, peers.export_llama_flags(MAX_SEQ_LEN))
        return out
    if s.quant == LLAMA_Q4_0:
        from gguf import LlamaFileType

        f32 = export_model("gguf", model_dir, out.with_name(out.stem + "-f32.gguf"), quant="f32", kv_cache=kv,
                           max_seq_len=MAX_SEQ_LEN)
        with atomic_path(out) as tmp:
            quantize_with_llamacpp(f32, tmp, LlamaFileType.MOSTLY_Q4_0)
        f32.unlink()
        return out
    return export_model(s.fmt, model_dir, out, quant=s.quant, kv_cache=kv, max_seq_len=MAX_SEQ_LEN, **s.options)


def open_session(s: Setting, path: Path, model_dir: Path):
    import runtime
    from benchmarks import peers

    if s.quant == GENAI:
        return peers.GenaiSession(path, model_dir, 1, MAX_SEQ_LEN, loop="append")
    if s.quant == EXPORT_LLAMA:
        return peers.StockPteSession(path, HybridConfig.load(model_dir), 1)
    return runtime.load(path, n_threads=1)


# ---- bytes --------------------------------------------------------------------------------------------
def read_bytes(s: Setting, path: Path, config: HybridConfig) -> int:
    """Bytes of the matrices a decode step multiplies by (see the module docstring)."""
    if s.fmt == "gguf":
        import gguf

        tensors = gguf.GGUFReader(path).tensors
        untied = any(t.name == "output.weight" for t in tensors)
        return sum(int(t.n_bytes) for t in tensors if len(t.shape) == 2 and "shortconv.conv" not in t.name
                   and not (untied and t.name == "token_embd.weight"))
    if s.fmt == "onnx":
        import onnx

        model = onnx.load(str(path / "model.onnx" if path.is_dir() else path))
        inits = {t.name: t for t in model.graph.initializer}
        read = {i for n in model.graph.node if n.op_type in ("MatMulNBits", "MatMul", "MatMulInteger", "Gemm")
                for i in n.input[1:] if i in inits}
        return sum(len(inits[i].raw_data) or onnx.numpy_helper.to_array(inits[i]).nbytes for i in read)
    return executorch_read_bytes(config, s.options.get("group_size", 32),
                                 4 if s.quant == EXPORT_LLAMA else s.options.get("head_bits", 8))


def executorch_read_bytes(config: HybridConfig, group: int, head_bits: int) -> int:
    """The .pte's linears as XNNPACK stores them (executorch/backends/xnnpack/operators/node_visitor.py):
    8da4w groups are 4-bit values two per byte and a bf16 scale per group; int8 per channel is a byte per
    value and an fp32 scale per row; a linear whose width the group does not divide stays fp32."""
    import torch
    from torch import nn

    from edge.model import HybridLM

    with torch.device("meta"):
        model = HybridLM(config)
    total = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        K, N = m.in_features, m.out_features
        if name == "lm_head" and head_bits == 8:
            total += K * N + 4 * N
        elif K % group == 0:
            total += K * N // 2 + 2 * N * (K // group)
        else:
            total += 4 * K * N
    return total


def matrix_params(config: HybridConfig) -> int:
    """Parameters of the matrices read per decode step: every linear and the lm_head (tied or not)."""
    return config.n_params(include_embeddings=False) + config.vocab_size * config.hidden_size


# ---- fidelity -----------------------------------------------------------------------------------------
def kl_divergence(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per position, in nats."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    log_p = ref - ref.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = got - got.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    cos = (ref64 * got64).sum(-1) / (np.linalg.norm(ref64, axis=-1) * np.linalg.norm(got64, axis=-1))
    return dict(mean_cos=float(cos.mean()), min_cos=float(cos.min()), kl=float(kl_divergence(ref, got).mean()),
                top1=float((ref.argmax(-1) == got.argmax(-1)).mean()))


def sequences(model_dir: Path) -> dict[str, list[int]]:
    """The two measured sequences: §5's random ids, and 64 tokens of held-out standard-library text."""
    from edge.tokenizer import load_tokenizer, tokenizer_json

    config = HybridConfig.load(model_dir)
    text = load_tokenizer(tokenizer_json(model_dir)).encode(stdlib_text(held_out=True)[:20000]).ids
    return {"ids": random_ids(config.vocab_size), "text": text[1000:1064]}  # past the license headers


def measure(ckpt: str, model_dir: Path, s: Setting, refs: dict) -> dict:
    name = label(s.quant, s.options)
    started = time.time()
    path = export_setting(s, model_dir, model_dir.parent / "artifacts" / ckpt /
                          f"{s.fmt}-{name}{FORMATS[s.fmt].suffix}")
    export_s = time.time() - started
    config = HybridConfig.load(model_dir)
    row = dict(checkpoint=ckpt, format=s.fmt, quant=s.quant, options=s.options, note=s.note, peer=s.peer,
               file_bytes=artifact_bytes(path), export_s=round(export_s, 1))
    for seq, (ids, ref) in refs.items():
        session = open_session(s, path, model_dir)  # a fresh one per sequence (export_llama's cannot reset)
        try:
            got = session_logits(session, ids)
            row["kv_cache"] = session.kv_cache
        finally:
            session.close()
        row[seq] = fidelity(ref, got)
    row["read_bytes"] = read_bytes(s, path, config)
    row["bpw_read"] = row["read_bytes"] * 8 / matrix_params(config)
    ids = row["ids"]
    row["bound"] = next((b for b in ("8bit", "4bit") if ids["mean_cos"] >= BOUNDS[b]["mean_cos"]
                         and ids["min_cos"] >= BOUNDS[b]["min_cos"]), "none")
    print(f"{ckpt:9} {s.fmt:10} {name:44} ids {ids['mean_cos']:.4f}/{ids['min_cos']:.4f} kl {ids['kl']:.5f}  "
          f"text {row['text']['mean_cos']:.4f} kl {row['text']['kl']:.5f}  ({export_s:.0f} s)", flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| checkpoint | format | weights | options | peer | bits/weight read | MB read per token | "
             "ids: mean / min cos | ids: KL | text: mean / min cos | text: KL | §5 | note |", "|" + " --- |" * 13]
    for r in rows:
        opts = ", ".join(f"{k} {v}" for k, v in r["options"].items()) or "default"
        bpw = f"{r['bpw_read']:.2f}" if r.get("bpw_read") is not None else "?"
        mb = f"{r['read_bytes'] / 1e6:.2f}" if r.get("read_bytes") is not None else "?"
        ids, text = r["ids"], r["text"]
        lines.append(f"| {r['checkpoint']} | {r['format']} | {r['quant']} | {opts} | {'peer' if r['peer'] else ''} | "
                     f"{bpw} | {mb} | {ids['mean_cos']:.4f} / {ids['min_cos']:.4f} | {ids['kl']:.5f} | "
                     f"{text['mean_cos']:.4f} / {text['min_cos']:.4f} | {text['kl']:.5f} | {r['bound']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=list(CHECKPOINTS), choices=CHECKPOINTS)
    p.add_argument("--formats", nargs="+", default=list(KV_8BIT), choices=list(KV_8BIT))
    p.add_argument("--only", nargs="+", metavar="LABEL", help="run only these settings (labels as printed, "
                   "e.g. int4-quant_methodhqq) and merge their rows into --out's, replacing rows of the same setting")
    p.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    args = p.parse_args(argv)

    checkpoints = build_checkpoints(args.checkpoints, WORK)
    rows = []
    for ckpt, model_dir in checkpoints.items():
        refs = {seq: (ids, transformers_logits(model_dir, ids)) for seq, ids in sequences(model_dir).items()}
        for s in SETTINGS:
            if (s.fmt in args.formats and ckpt in s.checkpoints
                    and (not args.only or label(s.quant, s.options) in args.only)):
                rows.append(measure(ckpt, model_dir, s, refs))
    out = Path(args.out)
    key = lambda r: (r["checkpoint"], r["format"], r["quant"], json.dumps(r["options"]))  # noqa: E731
    new = {key(r) for r in rows}
    old = [r for r in json.loads(out.read_text())["rows"] if "ids" in r] if out.exists() else []  # this schema
    rows = [r for r in old if key(r) not in new] + rows
    order = [(s.fmt, label(s.quant, s.options)) for s in SETTINGS]
    rank = lambda r: order.index((r["format"], label(r["quant"], r["options"]))) if (  # noqa: E731
        r["format"], label(r["quant"], r["options"])) in order else len(order)
    rows.sort(key=lambda r: (CHECKPOINTS.index(r["checkpoint"]) if r["checkpoint"] in CHECKPOINTS else 9, rank(r)))
    write_json(out, dict(protocol="docs/design.md §5 vs transformers Lfm2ForCausalLM on random ids and held-out "
                                  "text; 8-bit KV", text_config=TEXT_CONFIG, random_config=GQA_8_2, rows=rows))
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
