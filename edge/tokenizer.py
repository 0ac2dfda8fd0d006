"""Tokenizer handling: the checkpoint's tokenizer.json through the `tokenizers` library.

`train_tokenizer` makes a byte-level BPE with LFM2's special tokens at LFM2's ids (pad 0, bos 1,
eos `<|im_end|>` 7), so ids and chat markers mean the same thing as in the real models; `save_tokenizer`
gives the checkpoint LFM2's chat template too, so chat runs on tiny models as on real ones.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .chat import LFM2_CHAT_TEMPLATE
from .errors import EdgeError, first_line
from .files import atomic_path, write_json

SPECIAL_TOKENS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>",
                  "<|fim_suf|>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 7

# A default corpus every Python installation has: the standard library's own source text.
_DEFAULT_CORPUS_MODULES = ("argparse", "textwrap", "json.decoder", "collections", "pathlib", "inspect",
                           "functools", "string", "random", "statistics", "csv", "dataclasses")


def default_corpus() -> str:
    import importlib
    import inspect
    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in _DEFAULT_CORPUS_MODULES)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` ids. Where the corpus yields fewer merges (the default
    corpus gives ~10.8k; LFM2's vocab is 65536), the remaining ids are `<|unused_N|>` entries of the
    vocabulary: no merge produces them, so text never maps to them, but the embedding and output head
    keep the preset's real size, which is what export and benchmarks measure."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() < vocab_size:
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        first = max(vocab.values()) + 1
        vocab.update({f"<|unused_{i}|>": first + i for i in range(vocab_size - first)})
        tok = Tokenizer.from_str(json.dumps(spec))
    return tok


def learned_tokens(tok: Tokenizer) -> int:
    """Ids a corpus filled (the rest are `<|unused_N|>` placeholders, see train_tokenizer)."""
    return sum(1 for t in tok.get_vocab() if not t.startswith("<|unused_"))


def save_tokenizer(tok: Tokenizer, model_dir: str | Path) -> None:
    model_dir = Path(model_dir)
    with atomic_path(model_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    write_json(model_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID], "add_bos_token": True,
        "model_max_length": 1_000_000, "chat_template": LFM2_CHAT_TEMPLATE})


def load_tokenizer(source: str | Path) -> Tokenizer:
    """From a checkpoint directory, a tokenizer.json path, or the JSON text itself (what artifacts embed:
    a text that is no plausible path, even with a corrupt first byte, is read as JSON)."""
    if isinstance(source, str) and (source.lstrip().startswith("{") or "\n" in source or len(source) > 4096):
        where, read = "the tokenizer.json embedded in the artifact", lambda: Tokenizer.from_str(source)
    else:
        path = Path(source)
        path = path / "tokenizer.json" if path.is_dir() else path
        where, read = f"tokenizer {path}", lambda: Tokenizer.from_file(str(path))
    try:
        return read()
    except Exception as e:  # tokenizers raises a bare Exception for both missing and malformed files
        raise EdgeError(f"cannot read {where}: {first_line(e)}; it is missing "
                        "or corrupt") from None


def tokenizer_json(model_dir: str | Path) -> str:
    """The tokenizer.json text of a checkpoint (exporters embed it in artifacts)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise EdgeError(f"no tokenizer.json in {model_dir}; artifacts need one to be self-sufficient")
    text = path.read_text()
    json.loads(text)
    return text


# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`, llama-vocab.cpp) -> the tokenizers pre-tokenizer
# that splits text the same way
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    # "\p{N}" then GPT-2's regex: each digit alone, as HF's Digits(individual_digits) before ByteLevel
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "gpt-2": _BYTE_LEVEL,
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # gguf.TokenType values (this module does not import gguf)


def tokenizer_json_from_gguf(tokens: list[str], types: list[int] | None, merges: list[str], pre: str) -> str:
    """The tokenizer.json text of a gpt2-style GGUF vocabulary (stock GGUFs carry no tokenizer.json):
    byte-level BPE with its merges, control tokens as special added tokens and user-defined ones as plain
    added tokens (llama.cpp matches both in text), and the pre-tokenizer `pre` (a PRE_TOKENIZERS name)."""
    if pre not in PRE_TOKENIZERS:
        raise EdgeError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZERS)}")
    if not merges:
        raise EdgeError("the GGUF has no BPE merges; only gpt2-style BPE vocabularies are supported")
    types = types or [1] * len(tokens)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == GGUF_CONTROL}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ", 1) for m in merges]},
    }
    return json.dumps(spec, ensure_ascii=False)
