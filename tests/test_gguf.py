"""GGUF export + llama.cpp backend: parity with the PyTorch reference (docs/design.md §5), stock-llama.cpp
conventions, bad input.

Every artifact is exported once per session (`gguf_file`) and every reference computed once (`reference`).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from conftest import PARITY_IDS, TRAIN_STEPS, build_checkpoint
from gguf import GGMLQuantizationType as QType
from parity import assert_parity, metrics, random_ids, reference_logits, session_logits
from safetensors.torch import save_file

import export.gguf as export_gguf
from edge.config import HybridConfig
from edge.errors import EdgeError
from export import export_model
from runtime import load
from runtime.llamacpp import tokenizer_from_vocab

pytestmark = pytest.mark.engine("llamacpp")

# Checkpoints beyond conftest's VARIANTS: rows of 256 so llama.cpp's K-quants really use K blocks
# (tiny's rows of 128 make llama.cpp fall back to q5_0/q8_0), and head_dim 16 for the KV block check.
EXTRA = {"wide": dict(hidden_size=256, intermediate_size=1152), "head_dim16": dict(num_attention_heads=8),
         "trained_wide": dict(hidden_size=256, intermediate_size=1152, train_steps=TRAIN_STEPS)}
IDS = PARITY_IDS


@pytest.fixture(scope="session")
def model_dir(checkpoints, tokenizer, tmp_path_factory):
    built = {}

    def get(variant):
        if variant in EXTRA:
            if variant not in built:
                built[variant] = build_checkpoint(tmp_path_factory.mktemp(variant), tokenizer, **EXTRA[variant])
            return built[variant]
        return checkpoints(variant)

    return get


@pytest.fixture(scope="session")
def gguf_file(model_dir, tmp_path_factory):
    """(variant, quant, kv_cache) -> exported .gguf, built once per session."""
    out_dir = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(variant, quant, kv_cache="f16"):
        key = (variant, quant, kv_cache)
        if key not in cache:
            cache[key] = export_model("gguf", model_dir(variant), out_dir / f"{variant.replace(':', '_')}-{quant}-{kv_cache}.gguf",
                                      quant=quant, kv_cache=kv_cache)
        return cache[key]

    return get


# ---- parity (docs/design.md §5): prefill half, decode the rest token by token ---------------------------------
PARITY = [  # variant, weights, KV cache type chosen at export (the artifact's default), bound
    ("tiny", "f32", "f16", "exact"),
    ("tiny", "f16", "f16", "exact"),
    ("mqa", "f16", "f16", "exact"),
    ("untied", "f32", "f16", "exact"),
    ("attn_first_last", "f16", "f16", "exact"),
    ("lcache4", "f32", "f16", "exact"),
    ("tiny", "q8_0", "f16", "8bit"),
    ("mqa", "q8_0", "q8_0", "8bit"),
    ("untied", "q8_0", "f16", "8bit"),
    ("tiny", "f32", "q8_0", "8bit"),
    ("untied", "f16", "q8_0", "8bit"),
    ("tiny", "f32", "q4_0", "4bit"),
    ("mqa", "f32", "q4_0", "4bit"),
    # 4-bit weights are held to the bound on trained checkpoints (conftest.TRAIN_STEPS explains why)
    ("trained:tiny", "q4_0", "f16", "4bit"),
    ("trained:mqa", "q4_0", "f16", "4bit"),
    ("trained:untied", "q4_0", "f16", "4bit"),
    ("trained:untied", "q4_k_m", "q4_0", "4bit"),
    # On tiny's rows of 128, llama.cpp's q4_k_m falls back to q5_0/q8_0 blocks (K blocks need 256);
    # "wide" below is where real q4_K/q5_K/q6_K blocks are checked.
    ("tiny", "q4_k_m", "f16", "4bit"),
    ("mqa", "q4_k_m", "f16", "4bit"),
    ("untied", "q4_k_m", "f16", "4bit"),
    ("wide", "bf16", "f16", "8bit"),
    ("wide", "q6_k", "f16", "4bit"),
    ("wide", "q5_k_m", "f16", "4bit"),
]


@pytest.mark.parametrize("variant,quant,kv_cache,bound", PARITY, ids=["-".join(p[:3]) for p in PARITY])
def test_parity(model_dir, gguf_file, reference, variant, quant, kv_cache, bound):
    session = load(gguf_file(variant, quant, kv_cache), n_threads=1)
    assert (session.quant, session.kv_cache) == (quant, kv_cache)
    assert_parity(reference(model_dir(variant)), session_logits(session, IDS), bound)


def dequantized_checkpoint(model_dir: Path, gguf_path: Path, out_dir: Path) -> Path:
    """The checkpoint with every weight replaced by its dequantized GGUF value (names mapped back)."""
    config = HybridConfig.load(model_dir)
    ckpt = export_gguf._Checkpoint(model_dir)
    hf_of = {name: (hf, ckpt.shape(hf)) for name, hf, *_ in export_gguf.plan_tensors(ckpt, config, QType.F32)}
    state = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        hf, shape = hf_of[t.name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        state[hf] = torch.from_numpy(values)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / "model.safetensors")
    shutil.copy(model_dir / "config.json", out_dir)
    return out_dir


@pytest.mark.parametrize("variant", ["tiny", "mqa", "untied"])
def test_q4_0_is_llamacpp_q4_0(model_dir, gguf_file, reference, variant, tmp_path):
    """On random-weight models q4_0 stays below the 4-bit bound (mean cos 0.96-0.98: 4-bit rounding noise
    compounding through a chaotic network; test_parity holds trained checkpoints to the bound). What the
    exporter controls is checked here on the harder random models: (1) llama.cpp runs the file like the
    PyTorch model given the same (dequantized) weights, to the 8-bit bound; (2) the file is as faithful as
    llama.cpp's own quantizer's Q4_0 of the same checkpoint."""
    ours = gguf_file(variant, "q4_0")
    got = session_logits(load(ours, n_threads=1), IDS)
    same_weights = reference_logits(dequantized_checkpoint(model_dir(variant), ours, tmp_path / "dq"), IDS)
    assert_parity(same_weights, got, "8bit")

    stock = tmp_path / "stock-q4_0.gguf"
    export_gguf.quantize_with_llamacpp(gguf_file(variant, "f32"), stock, gguf.LlamaFileType.MOSTLY_Q4_0)
    stock_metrics = metrics(reference(model_dir(variant)), session_logits(load(stock, n_threads=1), IDS))
    our_metrics = metrics(reference(model_dir(variant)), got)
    assert our_metrics["mean_cos"] >= stock_metrics["mean_cos"] - 1e-4, (our_metrics, stock_metrics)
    assert our_metrics["mean_cos"] >= 0.95, our_metrics  # a sanity floor far above a broken layout (~0)


def test_k_quants_use_llamacpp_blocks(gguf_file):
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_file("wide", "q4_k_m")).tensors}
    assert types["blk.0.ffn_gate.weight"] == QType.Q4_K
    assert QType.Q6_K in types.values()  # q4_k_m mixes in q6_K for some tensors
    assert types["blk.0.attn_norm.weight"] == QType.F32
    assert types["blk.0.shortconv.conv.weight"] == QType.F32


# ---- quantizers (issue 27): llama.cpp's mixes and its importance matrix ------------------------------------
def test_importance_matrix_covers_every_block_weight(model_dir, gguf_file):
    """One entry per 2-D weight of the blocks, named as the GGUF names it, as long as its input width,
    positive and finite; the output matrix left out, as llama.cpp's imatrix tool leaves it by default."""
    d = model_dir("wide")
    config = HybridConfig.load(d)
    entries = export_gguf.importance_matrix(d, config, (d / "tokenizer.json").read_text())
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file("wide", "f32")).tensors}
    block_weights = {n for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2
                     and "shortconv.conv" not in n}
    assert set(entries) == block_weights
    for name, values in entries.items():
        assert values.shape == (int(tensors[name].shape[0]),) and values.dtype == np.float32, name
        assert np.isfinite(values).all() and (values > 0).all(), name


@pytest.mark.parametrize("quant", ["q4_0", "iq4_xs", "q4_k_s"])
def test_imatrix_quants_meet_the_bound(model_dir, reference, tmp_path, quant):
    """Rows of 256 (wide): llama.cpp's own 4-bit types, with and without the importance matrix, both meeting
    the 4-bit bound on a trained model. The importance matrix changes the rounding of the block weights
    (llama.cpp's mix also moves a few tensors between types with one; plain q4_0 is gguf-py's writer)."""
    trained = model_dir("trained_wide")
    files = {m: export_model("gguf", trained, tmp_path / f"{quant}-{m}.gguf", quant=quant, quant_method=m)
             for m in ("plain", "imatrix")}
    read = {m: {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(f).tensors} for m, f in files.items()}
    same_type = [n for n, (t, _) in read["plain"].items() if n.startswith("blk.") and read["imatrix"][n][0] == t
                 and t not in (QType.F32, QType.F16)]
    assert same_type and any(read["plain"][n][1] != read["imatrix"][n][1] for n in same_type)
    if quant == "iq4_xs":
        assert read["imatrix"]["blk.0.ffn_up.weight"][0] == QType.IQ4_XS
    for m, f in files.items():
        session = load(f, n_threads=1)
        assert session.quant == quant
        assert_parity(reference(trained), session_logits(session, IDS), "4bit")


def test_quant_method_and_calib_refusals(model_dir, tmp_path):
    d, out = model_dir("tiny"), tmp_path / "x.gguf"
    one_line_error(lambda: export_model("gguf", d, out, quant="q4_0", quant_method="hqq"), "'hqq'", "imatrix")
    one_line_error(lambda: export_model("gguf", d, out, quant="q8_0", quant_method="imatrix"), "--quant-method",
                   "q8_0")
    one_line_error(lambda: export_model("gguf", d, out, quant="q4_0", quant_method="plain", calib=__file__),
                   "--calib", "drop it")
    one_line_error(lambda: export_model("gguf", d, out, quant="f16", calib=__file__), "--calib")
    one_line_error(lambda: export_model("gguf", d, out, quant="q4_0", quant_method="imatrix",
                                        calib=tmp_path / "missing.txt"), "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    one_line_error(lambda: export_model("gguf", d, out, quant="q4_0", quant_method="imatrix",
                                        calib=tmp_path / "empty.txt"), "empty")
    assert not out.exists()


def test_calib_file_is_read(model_dir, tmp_path):
    """--calib text changes the importance matrix, and so the rounding."""
    d = model_dir("tiny")
    config = HybridConfig.load(d)
    tok = (d / "tokenizer.json").read_text()
    other = tmp_path / "other.txt"
    other.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    default = export_gguf.importance_matrix(d, config, tok)
    custom = export_gguf.importance_matrix(d, config, tok, other)
    assert default.keys() == custom.keys()
    assert not np.allclose(default["blk.0.ffn_up.weight"], custom["blk.0.ffn_up.weight"])


def test_tensor_layout_and_metadata(gguf_file):
    reader = gguf.GGUFReader(gguf_file("untied", "q8_0"))
    meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.ggml.")}
    tensors = {t.name: t for t in reader.tensors}
    assert meta["general.architecture"] == "lfm2"
    assert meta["lfm2.attention.head_count_kv"] == [0, 0, 2, 0, 0, 2]
    assert meta["lfm2.shortconv.l_cache"] == 3
    assert meta["lfm2.feed_forward_length"] == 384  # tiny's intermediate 512 after the auto-adjust rule
    assert meta["lfm2.context_length"] == 2048
    assert meta[export_gguf.KV_CACHE_KEY] == "f16"
    assert "output.weight" in tensors and "output_norm.weight" not in tensors
    assert list(tensors["blk.0.shortconv.conv.weight"].shape) == [3, 128]  # ggml order: {L_cache, hidden}
    assert tensors["blk.0.shortconv.conv.weight"].tensor_type == QType.F32
    assert tensors["token_embd_norm.weight"].tensor_type == QType.F32
    assert tensors["blk.2.attn_q.weight"].tensor_type == QType.Q8_0
    tied = {t.name for t in gguf.GGUFReader(gguf_file("tiny", "q8_0")).tensors}
    assert "output.weight" not in tied


def test_stock_llamacpp_tokenizes_like_ours(gguf_file, tokenizer):
    """llama.cpp's own tokenizer (gpt2 BPE from our tokens/merges) and the session's agree with the checkpoint's."""
    session = load(gguf_file("tiny", "f16"))
    text = "def main(argv=None):\n    return {'x': 1}  # café\n"
    expected = tokenizer.encode(text).ids
    assert session.tokenizer.encode(text).ids == expected
    vocab = llama_cpp.llama_model_get_vocab(session.model)
    raw = text.encode()
    out = (llama_cpp.llama_token * 256)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), out, 256, False, False)
    assert list(out[:n]) == expected


def test_stock_converter_style_file_loads(model_dir, reference, tokenizer, tmp_path, monkeypatch):
    """Without our custom keys (tokenizer.json, default KV type) -- as llama.cpp's converter writes it --
    the config and tokenizer come from the standard lfm2 keys alone."""
    original = gguf.GGUFWriter.add_string

    def only_standard_keys(self, key, val):
        if key not in (gguf.Keys.Tokenizer.HF_JSON, export_gguf.KV_CACHE_KEY):
            original(self, key, val)

    monkeypatch.setattr(gguf.GGUFWriter, "add_string", only_standard_keys)
    path = export_model("gguf", model_dir("mqa"), tmp_path / "stock.gguf", quant="f32")
    monkeypatch.undo()
    assert gguf.GGUFReader(path).get_field(gguf.Keys.Tokenizer.HF_JSON) is None
    session = load(path, n_threads=1)
    assert session.kv_cache == "f16"
    assert session.config.ffn_dim == HybridConfig.load(model_dir("mqa")).ffn_dim
    assert session.config.layer_types == HybridConfig.load(model_dir("mqa")).layer_types
    text = "<|im_start|>user\nfor i in range(10): print(i)<|im_end|>"
    assert session.tokenizer.encode(text).ids == tokenizer.encode(text).ids
    assert_parity(reference(model_dir("mqa")), session_logits(session, IDS), "exact")


def test_tokenizer_from_vocab_matches(gguf_file, tokenizer):
    reader = gguf.GGUFReader(gguf_file("tiny", "f16"))
    rebuilt = tokenizer_from_vocab(reader.get_field(gguf.Keys.Tokenizer.LIST).contents(),
                                   reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents(),
                                   reader.get_field(gguf.Keys.Tokenizer.MERGES).contents())
    text = "import os\nclass A:\n\tpass  <|endoftext|> ünïcode"
    assert rebuilt.encode(text).ids == tokenizer.encode(text).ids
    assert rebuilt.decode(tokenizer.encode(text).ids) == tokenizer.decode(tokenizer.encode(text).ids)


def test_transformers_saved_checkpoint(model_dir, reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    saved = tmp_path / "hf"
    transformers.Lfm2ForCausalLM.from_pretrained(model_dir("tiny")).save_pretrained(saved)
    shutil.copy(model_dir("tiny") / "tokenizer.json", saved)
    session = load(export_model("gguf", saved, tmp_path / "hf.gguf", quant="f32"), n_threads=1)
    assert_parity(reference(model_dir("tiny")), session_logits(session, IDS), "exact")


# ---- session behaviour -------------------------------------------------------------------------------------
def test_kv_cache_bytes_default_and_override(gguf_file):
    path = gguf_file("tiny", "f32", "q8_0")
    # tiny: 2 attention layers x 2 kv heads x head_dim 32, K and V
    per_position = {"f16": 2 * 2 * 2 * 32 * 2, "q8_0": 2 * 2 * 2 * 32 * 34 // 32, "q4_0": 2 * 2 * 2 * 32 * 18 // 32}
    for override, expected_type in [(None, "q8_0"), ("f16", "f16"), ("q4_0", "q4_0")]:
        session = load(path, n_threads=1, **({"kv_cache": override} if override else {}))
        assert session.kv_cache == expected_type
        assert session.kv_cache_bytes() == 0
        session.prefill(IDS[:10])
        session.decode(5)
        assert session.kv_cache_bytes() == 11 * per_position[expected_type]
        session.reset()
        assert session.kv_cache_bytes() == 0


def test_reset_and_generate_are_repeatable(gguf_file):
    session = load(gguf_file("tiny", "q8_0"), n_threads=1)
    first = session.prefill(IDS[:20])
    session.decode(3)
    session.reset()
    np.testing.assert_array_equal(session.prefill(IDS[:20]), first)
    session.reset()
    a = list(session.generate(IDS[:8], max_new_tokens=8, stop_at_eos=False))
    session.reset()
    assert list(session.generate(IDS[:8], max_new_tokens=8, stop_at_eos=False)) == a
    assert len(a) == 8


def test_long_prompt_is_chunked(model_dir, tmp_path):
    """Prompts longer than one llama_decode batch give the same logits as the reference."""
    path = export_model("gguf", model_dir("tiny"), tmp_path / "long.gguf", quant="f32", max_seq_len=1100)
    session = load(path, n_threads=1)
    ids = random_ids(1024, seed=3, n=1030)
    got = session.prefill(ids)
    ref = reference_logits(model_dir("tiny"), ids)[-1]
    assert_parity(ref[None], got[None], "exact")


# ---- bad input: one line each ------------------------------------------------------------------------------
def one_line_error(fn, *words):
    with pytest.raises(EdgeError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_truncated_file(gguf_file, tmp_path):
    data = gguf_file("tiny", "f16").read_bytes()
    for size in (len(data) // 2, len(data) - 100, 16, 3):
        path = tmp_path / f"cut{size}.gguf"
        path.write_bytes(data[:size])
        one_line_error(lambda: load(path), str(path))


def test_corrupt_bytes(gguf_file, tmp_path):
    data = bytearray(gguf_file("tiny", "f16").read_bytes())
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"XXXX" + data[4:])
    one_line_error(lambda: load(bad_magic), "not a readable GGUF")
    garbled = tmp_path / "garbled.gguf"
    data[24:4000] = np.random.default_rng(0).integers(0, 256, 4000 - 24, dtype=np.uint8).tobytes()
    garbled.write_bytes(bytes(data))
    one_line_error(lambda: load(garbled), str(garbled))


def test_non_lfm2_gguf(tmp_path):
    # Llama GGUFs load (the parents of edge derive, tests/test_derive.py); other architectures do not
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    w.add_block_count(1)
    w.add_tokenizer_model("no_vocab")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_line_error(lambda: load(path), "'gpt2'", "lfm2")


def test_llamacpp_refusal_is_quoted(model_dir, tmp_path, monkeypatch):
    """A well-formed lfm2 header that llama.cpp still refuses (a missing tensor): its error, one line."""
    plan = export_gguf.plan_tensors
    monkeypatch.setattr(export_gguf, "plan_tensors",
                        lambda *a: [p for p in plan(*a) if p[0] != "blk.1.ffn_gate.weight"])
    path = export_model("gguf", model_dir("tiny"), tmp_path / "missing.gguf", quant="f32")
    one_line_error(lambda: load(path), "llama.cpp could not load", "blk.1.ffn_gate.weight")


def test_unknown_quant_and_kv_names(model_dir, gguf_file, tmp_path):
    out = tmp_path / "x.gguf"
    one_line_error(lambda: export_model("gguf", model_dir("tiny"), out, quant="q3_x"), "q3_x", "q4_k_m")
    one_line_error(lambda: export_model("gguf", model_dir("tiny"), out, kv_cache="int8"), "int8", "q8_0")
    one_line_error(lambda: export_model("gguf", model_dir("tiny"), out, group_size=32), "--group-size")
    assert not out.exists()
    one_line_error(lambda: load(gguf_file("tiny", "f16"), kv_cache="q5_1"), "q5_1", "q4_0")


def test_kv_block_must_divide_head_dim(gguf_file):
    path = gguf_file("head_dim16", "f32")
    one_line_error(lambda: load(path, kv_cache="q8_0"), "head_dim is 16", "f16")
    assert load(path, kv_cache="f16").prefill([1, 2, 3]).shape == (1024,)


def test_all_conv_model_is_refused(model_dir, tokenizer, tmp_path):
    """llama.cpp aborts the process on an lfm2 model without attention layers: refuse it before that."""
    d = model_dir("all_conv")
    one_line_error(lambda: export_model("gguf", d, tmp_path / "c.gguf"), "no attention layer")
    path = tmp_path / "forced.gguf"  # as another tool might write it
    export_gguf.write_gguf(d, HybridConfig.load(d), (d / "tokenizer.json").read_text(), path, "f32", "f16", 64)
    one_line_error(lambda: load(path), "no attention layer")


def test_attention_only_model_is_refused(tokenizer, tmp_path):
    """Nor does it survive an lfm2 model without conv layers (its recurrent state has no buffer)."""
    d = build_checkpoint(tmp_path / "attn", tokenizer, layer_types=["full_attention"] * 2, num_hidden_layers=2)
    one_line_error(lambda: export_model("gguf", d, tmp_path / "a.gguf"), "no conv layer")


def test_rows_not_multiple_of_block_are_refused(tokenizer, tmp_path):
    d = build_checkpoint(tmp_path / "h144", tokenizer, hidden_size=144)  # rows of 144: not 32-aligned
    one_line_error(lambda: export_model("gguf", d, tmp_path / "q.gguf", quant="q8_0"), "144", "Q8_0", "f16")
    assert not (tmp_path / "q.gguf").exists()
    assert export_model("gguf", d, tmp_path / "f.gguf", quant="f16").exists()


def test_conv_bias_is_refused(tokenizer, tmp_path):
    d = build_checkpoint(tmp_path / "bias", tokenizer, conv_bias=True)
    one_line_error(lambda: export_model("gguf", d, tmp_path / "b.gguf"), "conv_bias")
    assert not (tmp_path / "b.gguf").exists()


def test_overflow_and_bad_ids(model_dir, gguf_file):
    session = load(gguf_file("tiny", "q8_0"), max_seq_len=16)
    session.prefill(IDS[:10])
    one_line_error(lambda: session.prefill(IDS[:10]), "context overflow")
    one_line_error(lambda: session.decode(1024), "out of range")
    one_line_error(lambda: session.decode(-1), "out of range")
    session.decode(5)  # the session is still usable
    assert session.n_past == 11


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_interrupted_export_leaves_nothing(model_dir, tmp_path, monkeypatch, quant):
    calls = []
    original = gguf.GGUFWriter.write_tensor_data

    def fail_midway(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_midway)
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(KeyboardInterrupt):
        export_model("gguf", model_dir("tiny"), out, quant=quant)
    assert list(out.parent.iterdir()) == []


# ---- the CLI ---------------------------------------------------------------------------------------------
def test_cli_export_and_run(model_dir, tmp_path):
    out = tmp_path / "cli.gguf"
    edge = [sys.executable, "-m", "edge.cli"]
    r = subprocess.run([*edge, "export", "gguf", str(model_dir("tiny")), "-o", str(out), "--quant", "q8_0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.exists(), r.stderr
    r = subprocess.run([*edge, "run", str(out), "--prompt", "def main():", "-n", "8", "--kv-cache", "q8_0",
                        "-t", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr == "", (r.stdout, r.stderr)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(out.read_bytes()[:1000])
    r = subprocess.run([*edge, "run", str(bad), "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
