"""The default artifacts in their engines' stock runtimes (issue 18): onnxruntime-genai's Generator on the
ONNX model folder and llama.cpp's own API (llama-cpp-python's `Llama`) on the GGUF give the same greedy
tokens as `runtime.load`; chat templates travel into every artifact and `Chat` keeps the cache between
turns; a checkpoint laid out as LiquidAI publishes LFM2 exports in all three formats.

Greedy runs use conftest's trained tiny checkpoint, whose output is not one repeated token.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from edge.chat import LFM2_CHAT_TEMPLATE, Chat, read_chat_template, render
from edge.errors import EdgeError
from export import export_model
from runtime import load
from engines import needs

PROMPT = "def main():\n    parser = argparse."
N_NEW = 24
MAX_SEQ_LEN = 256
# (quant, kv cache) of the ONNX folders onnxruntime-genai drives: fp32, the default int8 weights, int4
# weights, each KV format GroupQueryAttention stores (fp32 and its native int8), and fp16 KV
ONNX_CASES = [("fp32", "fp32"), ("int8", "fp32"), ("int4", "int8"), ("fp32", "fp16")]


def greedy(session, ids, n=N_NEW) -> list[int]:
    session.reset()
    return list(session.generate(ids, max_new_tokens=n, temperature=0.0))


def assert_not_degenerate(tokens):
    assert len(set(tokens)) > 1, f"greedy output repeats one token ({tokens[:8]}...): the test would prove little"


@pytest.fixture(scope="session")
def trained(checkpoints):
    return checkpoints("trained:tiny")


@pytest.fixture(scope="session")
def onnx_folder(trained, tmp_path_factory):
    """(quant, kv_cache) -> an exported onnxruntime-genai model folder, built once per session."""
    out_dir = tmp_path_factory.mktemp("genai")
    built = {}

    def get(quant, kv_cache):
        if (quant, kv_cache) not in built:
            built[quant, kv_cache] = export_model("onnx", trained, out_dir / f"tiny-{quant}-{kv_cache}",
                                                  quant=quant, kv_cache=kv_cache, max_seq_len=MAX_SEQ_LEN)
        return built[quant, kv_cache]

    return get


@pytest.fixture(scope="session")
def default_gguf(trained, tmp_path_factory):
    """The default GGUF export (its default weights) of the trained checkpoint, with a q8_0 KV cache."""
    return export_model("gguf", trained, tmp_path_factory.mktemp("gguf") / "tiny.gguf", kv_cache="q8_0",
                        max_seq_len=MAX_SEQ_LEN)


# ---- onnxruntime-genai -------------------------------------------------------------------------------
def genai_greedy(folder, ids, n=N_NEW) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.engine("onnxruntime")
@pytest.mark.parametrize("quant,kv_cache", ONNX_CASES)
def test_genai_generator_matches_runtime(onnx_folder, quant, kv_cache):
    folder = onnx_folder(quant, kv_cache)
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in folder.iterdir()}
    session = load(folder)  # runtime.load opens the folder too
    assert (session.engine, session.quant, session.kv_cache) == ("onnxruntime", quant, kv_cache)
    ids = session.encode(PROMPT)
    ours = greedy(session, ids)
    assert_not_degenerate(ours)
    assert genai_greedy(folder, ids) == ours


@pytest.mark.engine("onnxruntime")
def test_genai_folder_config_and_tokenizer(onnx_folder, trained):
    import onnxruntime_genai as og

    folder = onnx_folder("int4", "int8")
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["inputs"]["past_conv_names"] == "past_conv.%d"
    assert decoder["outputs"]["present_conv_names"] == "present_conv.%d"
    assert config["model"]["context_length"] == MAX_SEQ_LEN
    assert (config["model"]["bos_token_id"], config["model"]["eos_token_id"]) == (1, 7)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == LFM2_CHAT_TEMPLATE
    # genai's own tokenizer (onnxruntime-extensions) reads the folder's files: it renders the chat template
    # as we do and tokenizes the result as we do
    chat = Chat(load(folder), system="Be brief.")
    chat.messages.append({"role": "user", "content": "What does argparse do?"})
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    text = tokenizer.apply_chat_template(json.dumps(chat.messages), add_generation_prompt=True)
    assert text == chat.prompt()
    assert list(tokenizer.encode(text)) == chat.session.tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(chat.session.encode(PROMPT)[1:]) == PROMPT


@pytest.mark.engine("onnxruntime")
def test_genai_folder_with_external_data(trained, tmp_path, monkeypatch):
    """Past protobuf's 2 GiB the folder keeps the weights in model.onnx.data (the limit lowered here)."""
    import export.genai

    monkeypatch.setattr(export.genai, "SINGLE_FILE_LIMIT", 0)
    folder = export_model("onnx", trained, tmp_path / "big", quant="fp32", kv_cache="fp32", max_seq_len=64)
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    session = load(folder)
    ids = session.encode(PROMPT)
    assert genai_greedy(folder, ids, n=8) == greedy(session, ids, n=8)


def test_onnx_single_file_still_written(trained, tmp_path):
    out = export_model("onnx", trained, tmp_path / "tiny.onnx", quant="fp32", kv_cache="fp32", max_seq_len=64)
    assert out.is_file() and load(out).chat_template == LFM2_CHAT_TEMPLATE


def test_onnx_folder_refuses_to_replace_another_directory(trained, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(EdgeError, match="exists"):
        export_model("onnx", trained, precious, quant="fp32", max_seq_len=64)
    assert (precious / "keep.txt").exists()
    with pytest.raises(EdgeError, match="should end in .onnx"):
        export_model("onnx", trained, tmp_path / "x.gguf")


# ---- llama.cpp -----------------------------------------------------------------------------------------
def llama(path, **kw):
    from llama_cpp import GGML_TYPE_Q8_0, Llama

    # stock llama.cpp through llama-cpp-python's high-level API; a quantized V cache needs flash attention
    return Llama(model_path=str(path), n_ctx=MAX_SEQ_LEN, n_threads=1, type_k=GGML_TYPE_Q8_0,
                 type_v=GGML_TYPE_Q8_0, flash_attn=True, verbose=False, **kw)


@pytest.mark.engine("llamacpp")
def test_llamacpp_generate_matches_runtime(default_gguf):
    llm = llama(default_gguf)
    session = load(default_gguf, kv_cache="q8_0")
    ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)  # llama.cpp's own tokenizer
    assert ids == session.encode(PROMPT)
    ours = greedy(session, ids)
    assert_not_degenerate(ours)
    theirs = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if token == llm.token_eos() or len(theirs) == N_NEW:
            break
    assert theirs == ours
    assert llm.detokenize(theirs).decode() == session.tokenizer.decode(ours, skip_special_tokens=True)


@pytest.mark.engine("llamacpp")
def test_llamacpp_chat_uses_the_gguf_template(default_gguf):
    """llama-cpp-python's chat completion (its Jinja2ChatFormatter over the GGUF's tokenizer.chat_template)
    answers the first turn with what our Chat answers."""
    llm = llama(default_gguf)
    assert llm.metadata["tokenizer.chat_template"] == LFM2_CHAT_TEMPLATE
    chat = Chat(load(default_gguf, kv_cache="q8_0"))
    ours = chat.reply("Write a function.", max_new_tokens=N_NEW)
    theirs = llm.create_chat_completion([{"role": "user", "content": "Write a function."}], temperature=0.0,
                                        repeat_penalty=1.0, max_tokens=N_NEW)
    assert theirs["choices"][0]["message"]["content"] == ours


# ---- chat ----------------------------------------------------------------------------------------------
TURNS = ["What does argparse do?", "And json?", "Thanks. One more: pathlib?"]


@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs(e)) for e in ("pytorch", "gguf", "onnx")])
def test_chat_keeps_the_cache_between_turns(engine, trained, default_gguf, onnx_folder):
    path, options = {"pytorch": (trained, {}), "gguf": (default_gguf, {"kv_cache": "q8_0"}),
                     "onnx": (onnx_folder("int4", "int8"), {})}[engine]
    chat = Chat(load(path, **options))
    fresh = load(path, **options)
    for i, turn in enumerate(TURNS):
        before = chat.session.n_past
        prompt_text = render(chat.template, chat.messages + [{"role": "user", "content": turn}],
                             special_tokens=chat.specials)
        reply = list(chat.send(turn, max_new_tokens=12))
        full = chat.session.tokenizer.encode(prompt_text, add_special_tokens=False).ids
        if i:  # only the new turn's tokens were prefilled on top of the cache
            assert chat.prefilled < len(full) and before > 0
        # the cache then holds exactly the conversation: a fresh session fed its tokens replies the same
        assert chat.session.tokenizer.decode(chat.prompt_tokens, skip_special_tokens=False) == prompt_text
        fresh.reset()
        expected = list(fresh.generate(chat.prompt_tokens, max_new_tokens=12))
        assert chat.reply_tokens == expected
        assert "".join(reply) == chat.messages[-1]["content"]
        assert chat.session.n_past == len(chat.tokens)


def test_chat_prompt_matches_transformers(trained):
    from transformers import AutoTokenizer

    chat = Chat(load(trained), system="You are terse.")
    for turn in TURNS[:2]:
        chat.reply(turn, max_new_tokens=8)
    chat.messages.append({"role": "user", "content": TURNS[2]})
    hf = AutoTokenizer.from_pretrained(str(trained))
    assert hf.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True) == chat.prompt()
    assert chat.prompt().startswith("<|startoftext|><|im_start|>system\nYou are terse.<|im_end|>\n")


def test_edge_run_chat(trained, monkeypatch, capsys):
    from edge.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("And json?\n/exit\n"))
    assert main(["run", str(trained), "--chat", "--prompt", "What does argparse do?", "-n", "6"]) == 0
    chat = Chat(load(trained))
    expected = [chat.reply(TURNS[0], max_new_tokens=6), chat.reply(TURNS[1], max_new_tokens=6)]
    assert capsys.readouterr().out == "".join(reply + "\n" for reply in expected)


def test_chat_without_a_template_is_one_clear_error(trained, tmp_path):
    session = load(trained)
    session.chat_template = None
    with pytest.raises(EdgeError, match="no chat template"):
        Chat(session)


# ---- a checkpoint laid out as LiquidAI publishes LFM2 ---------------------------------------------------
# LFM2's pre-tokenizer: llama3's split regex, then byte-level without its own regex (llama.cpp: pre "lfm2")
LFM2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_lfm2_layout(path, tokenizer_corpus: str, vocab_size: int = 512):
    """The file set and fields of huggingface.co/LiquidAI/LFM2-350M: config.json (LiquidAI's keys, incl.
    the legacy block_* ones, layer_types, bf16), model.safetensors in bf16, tokenizer.json (LFM2's
    pre-tokenizer and bos post-processor), tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja, generation_config.json. Random weights, tiny widths."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from edge.config import preset
    from edge.model import HybridLM
    from edge.tokenizer import SPECIAL_TOKENS

    path.mkdir(parents=True, exist_ok=True)
    config = preset("tiny").replace(vocab_size=vocab_size)
    model = HybridLM(config).init_weights(3)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    attention = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Lfm2ForCausalLM"], "block_auto_adjust_ff_dim": config.block_auto_adjust_ff_dim,
        "block_dim": config.hidden_size, "block_ff_dim": config.intermediate_size,
        "block_ffn_dim_multiplier": config.block_ffn_dim_multiplier, "block_mlp_init_scale": 1.0,
        "block_multiple_of": config.block_multiple_of, "block_norm_eps": 1e-05, "block_out_init_scale": 1.0,
        "block_use_swiglu": True, "block_use_xavier_init": True, "bos_token_id": 1, "conv_L_cache": 3,
        "conv_bias": False, "conv_dim": config.hidden_size, "conv_dim_out": config.hidden_size,
        "conv_use_xavier_init": True, "eos_token_id": 7, "hidden_size": config.hidden_size,
        "initializer_range": 0.02, "layer_types": config.layer_types, "max_position_embeddings": 128000,
        "model_type": "lfm2", "norm_eps": 1e-05, "num_attention_heads": config.num_attention_heads,
        "num_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads, "pad_token_id": 0, "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16", "transformers_version": "4.54.0.dev0", "use_cache": True,
        "use_pos_enc": True, "vocab_size": vocab_size, "full_attn_idxs": attention}, indent=2))
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LFM2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tokenizer_corpus.splitlines(keepends=True), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A", pair="<|startoftext|> $A $B",
                                                       special_tokens=[("<|startoftext|>", 1)])
    tok.save(str(path / "tokenizer.json"))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
        "legacy": False, "model_max_length": 1000000000000000019884624838656, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast",
        "use_default_system_prompt": False, **specials}, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(specials))
    (path / "chat_template.jinja").write_text(LFM2_CHAT_TEMPLATE)
    (path / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0,
         "transformers_version": "4.54.0.dev0"}))
    return path


@pytest.fixture(scope="session")
def lfm2_layout(tmp_path_factory):
    from edge.tokenizer import default_corpus

    return write_lfm2_layout(tmp_path_factory.mktemp("LFM2-tiny"), default_corpus())


@pytest.mark.parametrize("fmt,out", [pytest.param(f, o, marks=needs(f)) for f, o in (("gguf", "m.gguf"), ("onnx", "m"), ("executorch", "m.pte"))])
def test_lfm2_layout_exports(fmt, out, lfm2_layout, tmp_path):
    from transformers import AutoTokenizer

    assert read_chat_template(lfm2_layout) == LFM2_CHAT_TEMPLATE
    reference = load(lfm2_layout)
    hf = AutoTokenizer.from_pretrained(str(lfm2_layout))
    text = "Hello world's 1234 numbers,\n  and  spaces!"
    assert reference.encode(text) == hf(text)["input_ids"]  # one bos: ours plus none from the post-processor
    artifact = load(export_model(fmt, lfm2_layout, tmp_path / out, max_seq_len=128))
    assert artifact.chat_template == LFM2_CHAT_TEMPLATE
    ids = artifact.encode(text)
    assert ids == reference.encode(text)
    if fmt == "gguf":  # llama.cpp's own tokenizer with the "lfm2" pre-tokenizer agrees
        from llama_cpp import Llama
        llm = Llama(model_path=str(tmp_path / out), n_ctx=128, n_threads=1, verbose=False)
        assert llm.tokenize(text.encode(), add_bos=True) == ids
    a, b = artifact.prefill(ids), reference.prefill(ids)
    cos = float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.99, f"{fmt} default export of the LFM2 layout: logits cos {cos:.4f} to the reference"
    # chat on it: one bos (the template's, not the post-processor's too), the cache kept on the second turn
    chat = Chat(artifact)
    chat.reply("Hi", max_new_tokens=4)
    chat.reply("More", max_new_tokens=4)
    assert chat.prompt_tokens[:2] == [1, 6] and 0 < chat.prefilled < len(chat.prompt_tokens)
