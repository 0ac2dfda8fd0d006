"""GGUF export for stock llama.cpp: architecture `lfm2`, written with gguf-py like llama.cpp's converter.

The file is what `convert_hf_to_gguf.py` (class LFM2Model) would write, so unmodified llama.cpp loads it:
- metadata: `lfm2.*` hyperparameters, with `attention.head_count_kv` a per-layer array (0 marks a conv
  layer), `shortconv.l_cache`, and `feed_forward_length` = the FFN width after the auto-adjust rule;
- tensors: gguf-py's own HF -> GGUF name map (`model.embedding_norm` becomes `token_embd_norm`, the
  final norm of lfm2), conv kernels squeezed to [hidden, L_cache], `output.weight` only when untied;
- tokenizer: byte-level BPE as `gpt2` tokens, token types, merges, special ids and a pre-tokenizer
  name, plus the checkpoint's tokenizer.json under `tokenizer.huggingface.json` so `runtime.load`
  reproduces the tokenizer exactly (the standard keys alone also suffice); the checkpoint's chat
  template as `tokenizer.chat_template`.

Weight formats: f32, f16, bf16, q8_0 and q4_0 are quantized by gguf-py and written directly; the
K-quants go through llama.cpp's own quantizer (`llama_model_quantize`) from an f32 GGUF written first.
As in llama.cpp's converter, 1-D tensors (norms) and the conv kernels stay f32. With q4_0 the output
matrix (the embedding when tied) is q8_0: llama.cpp's quantizer also gives it more bits (q6_K, or q8_0
when rows are not a multiple of 256); gguf-py cannot write q6_K.

Tensors are read from the safetensors one at a time and written straight to the file, so peak memory
is about one tensor plus its quantized copy, not the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import Keys, LlamaFileType, MODEL_ARCH, MODEL_TENSOR, TokenType

from edge.chat import read_chat_template
from edge.config import HybridConfig
from edge.errors import EdgeError
from edge.files import atomic_path
from edge.formats.gguf import (ARCH, DEFAULT_METHODS, DIRECT_QUANTS, IMATRIX_FILE_TYPES, IMATRIX_QUANTS, K_QUANTS,
                               KV_CACHE_KEY, check_llamacpp_can_run, llama_log)
from edge.tokenizer import tokenizer_json

# tensors llama.cpp's converter keeps in f32 whatever the file type (besides every 1-D tensor)
F32_TENSORS = (MODEL_TENSOR.SHORTCONV_CONV,)


def export(model_dir: Path, out: Path, *, quant: str, kv_cache: str, max_seq_len: int, quant_method: str | None = None,
           calib=None, **options) -> Path:
    """quant_method: how llama.cpp rounds IMATRIX_QUANTS (edge/formats/gguf.py; default DEFAULT_METHODS);
    calib: the text file the importance matrix is computed on (export/calib.py)."""
    if options:
        raise EdgeError(f"gguf export takes no {'/'.join('--' + k.replace('_', '-') for k in options)}; "
                        "GGUF block sizes are fixed by the --quant type")
    if quant_method is not None and quant not in IMATRIX_QUANTS:
        raise EdgeError(f"--quant-method applies to gguf {'/'.join(IMATRIX_QUANTS)}, not {quant}; drop it")
    imatrix = quant in IMATRIX_QUANTS and (quant_method or DEFAULT_METHODS[quant]) == "imatrix"
    if calib is not None and not imatrix:
        raise EdgeError(f"--calib is read by gguf's --quant-method imatrix ({'/'.join(IMATRIX_QUANTS)}); this "
                        "export computes no importance matrix; drop it")
    config = HybridConfig.load(model_dir)
    if config.conv_bias:
        raise EdgeError(f"{model_dir} has conv_bias=True, which llama.cpp's lfm2 cannot represent (it has no "
                        "short-conv bias tensors); use `edge export executorch` or `edge export onnx` for this model")
    check_llamacpp_can_run(config, model_dir)
    tokenizer = tokenizer_json(model_dir)
    # before anything is written: the model is loaded for it, then dropped (peak: the fp32 checkpoint)
    importance = importance_matrix(model_dir, config, tokenizer, calib) if imatrix else None
    with atomic_path(out) as tmp:
        if quant in K_QUANTS or imatrix:
            f32_file = tmp.with_name(tmp.name + ".f32.partial")
            try:
                write_gguf(model_dir, config, tokenizer, f32_file, "f32", kv_cache, max_seq_len)
                quantize_with_llamacpp(f32_file, tmp, IMATRIX_FILE_TYPES[quant], importance)
            finally:
                f32_file.unlink(missing_ok=True)
        else:
            write_gguf(model_dir, config, tokenizer, tmp, quant, kv_cache, max_seq_len)
    return out


def importance_matrix(model_dir: Path, config: HybridConfig, tokenizer: str, calib=None) -> dict[str, np.ndarray]:
    """GGUF tensor name -> llama.cpp importance-matrix entry (float32 [in_features], the mean square of that
    weight's input per column over the calibration text, export/calib.py), for the weights of the blocks
    (blk.*), as llama.cpp's imatrix tool collects them by default (it leaves out the output matrix, which
    the quantizer keeps at q6_K or more anyway)."""
    from edge.checkpoint import load_model, return_freed_memory
    from export.calib import calibration_ids, importance

    name_map = gguf.get_tensor_name_map(MODEL_ARCH.LFM2, config.num_hidden_layers)
    model = load_model(model_dir)
    try:
        by_module = importance(model, calibration_ids(tokenizer, calib),
                               {name for name, _ in model.named_modules() if name.startswith("model.layers.")})
    finally:
        del model
        return_freed_memory()
    out = {}
    for module, values in by_module.items():
        found = name_map.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
        if found is not None and found[1].startswith("blk."):
            out[found[1]] = values
    return out


# ---- metadata ------------------------------------------------------------------------------------
def add_model_metadata(w: gguf.GGUFWriter, config: HybridConfig, name: str, max_seq_len: int) -> None:
    w.add_name(name)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(max_seq_len)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.num_attention_heads)
    # one entry per layer, 0 for conv layers: this is how llama.cpp tells conv from attention layers
    w.add_head_count_kv([config.num_key_value_heads if t == "full_attention" else 0 for t in config.layer_types])
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_shortconv_l_cache(config.conv_L_cache)


def add_tokenizer_metadata(w: gguf.GGUFWriter, text: str, config: HybridConfig) -> None:
    """`text` is the checkpoint's tokenizer.json."""
    tokenizer = json.loads(text)
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(tokenizer):
        raise EdgeError(f"the tokenizer is {model.get('type', 'unknown')} without byte-level pre-tokenization; "
                        "the gguf exporter supports byte-level BPE tokenizers (as LFM2 uses)")
    by_id = {i: t for t, i in model["vocab"].items()}
    specials = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in specials.items()})
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i in specials:
            types.append(TokenType.CONTROL if specials[i].get("special", True) else TokenType.USER_DEFINED)
            tokens.append(by_id[i])
        elif i in by_id:
            types.append(TokenType.NORMAL)
            tokens.append(by_id[i])
        else:  # embedding rows the tokenizer never produces: llama.cpp needs one distinct token per row
            types.append(TokenType.UNUSED)
            tokens.append(f"[UNUSED_{i}]")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # gguf-py silently drops empty arrays and llama.cpp then refuses the file
        raise EdgeError("the tokenizer has no BPE merges, which llama.cpp's gpt2 tokenizer requires; "
                        "train it with a vocab larger than its byte alphabet")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, value in ((Keys.Tokenizer.BOS_ID, config.bos_token_id), (Keys.Tokenizer.EOS_ID, config.eos_token_id),
                       (Keys.Tokenizer.PAD_ID, config.pad_token_id)):
        if value is not None:
            w.add_uint32(key, value)
    # Session.encode starts with bos exactly when the config has one (LFM2's do; a SmolLM2 child's has none, as
    # its parent's tokenizer adds none), and llama.cpp's tokenizer must add it in the same cases
    w.add_add_bos_token(config.bos_token_id is not None)
    w.add_string(Keys.Tokenizer.HF_JSON, text)


def _is_byte_level(tokenizer: dict) -> bool:
    def walk(node):
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        return isinstance(node, list) and any(walk(v) for v in node)
    return walk(tokenizer.get("pre_tokenizer")) or walk(tokenizer.get("decoder"))


def _pre_tokenizer_name(tokenizer: dict) -> str:
    """llama.cpp's name of the pre-tokenizer regex: GPT-2's for a plain ByteLevel with its regex, SmolLM's
    for single digits then that (SmolLM2 and the children derived from it), otherwise LFM2's own (a
    llama3-style split followed by ByteLevel, as the real checkpoints have)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True)):
        return "smollm"
    return "lfm2"


# ---- tensors -------------------------------------------------------------------------------------
class _Checkpoint:
    """The safetensors of a checkpoint, opened lazily: shapes without reading data, one tensor at a time."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        from edge.checkpoint import weight_shards  # imports torch: only when exporting

        self.where = {}  # tensor name -> the open shard holding it (headers: names, shapes)
        self.path = {}  # tensor name -> the shard file, read from (read)
        for shard in weight_shards(model_dir):
            try:
                f = safe_open(model_dir / shard, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
                raise EdgeError(f"cannot read {model_dir / shard}: {e}; the file is corrupt or truncated") from None
            self.where.update({name: f for name in f.keys()})
            self.path.update({name: model_dir / shard for name in f.keys()})

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        # a plain read, not the memory map's get_tensor: mapped pages once read would stay in the RSS,
        # the whole checkpoint by the last tensor (edge.checkpoint.read_tensors)
        from edge.checkpoint import read_tensors

        return next(read_tensors(self.path[name], [name]))[1].float().numpy()


def plan_tensors(ckpt: _Checkpoint, config: HybridConfig, qtype: QType) -> list[tuple[str, str, tuple, QType]]:
    """(gguf name, HF name, numpy shape as written, ggml type) for every tensor, in checkpoint order."""
    name_map = gguf.get_tensor_name_map(MODEL_ARCH.LFM2, config.num_hidden_layers)
    tied = "lm_head.weight" not in ckpt.names()
    plan = []
    for hf_name in ckpt.names():
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise EdgeError(f"checkpoint tensor {hf_name} has no llama.cpp lfm2 counterpart; "
                            "is this an LFM2 checkpoint?")
        kind, name = found
        shape = ckpt.shape(hf_name)
        if kind == MODEL_TENSOR.SHORTCONV_CONV:
            shape = (shape[0], shape[-1])  # [hidden, 1, L] -> [hidden, L]: llama.cpp's ssm_conv takes 2-D
        ttype = qtype
        if len(shape) < 2 or kind in F32_TENSORS:
            ttype = QType.F32
        elif qtype == QType.Q4_0 and (kind == MODEL_TENSOR.OUTPUT or (tied and kind == MODEL_TENSOR.TOKEN_EMBD)):
            ttype = QType.Q8_0  # see the module docstring
        block = gguf.GGML_QUANT_SIZES[ttype][0]
        if shape[-1] % block:
            raise EdgeError(f"{hf_name} has rows of {shape[-1]} values, not a multiple of the {ttype.name} "
                            f"block of {block}; export with --quant f16 or use widths that are multiples of {block}")
        plan.append((name, hf_name, shape, ttype))
    return plan


def _nbytes(shape: tuple, ttype: QType) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, ttype)))


def write_gguf(model_dir: Path, config: HybridConfig, tokenizer: str, path: Path, quant: str, kv_cache: str,
               max_seq_len: int) -> None:
    """Write the GGUF of a checkpoint; `tokenizer` is its tokenizer.json text."""
    qtype, file_type = DIRECT_QUANTS[quant]
    ckpt = _Checkpoint(model_dir)
    plan = plan_tensors(ckpt, config, qtype)
    w = gguf.GGUFWriter(path, ARCH)
    try:
        add_model_metadata(w, config, Path(model_dir).resolve().name, max_seq_len)
        add_tokenizer_metadata(w, tokenizer, config)
        chat_template = read_chat_template(model_dir)
        if chat_template:  # llama.cpp's key: llama-cli, llama-server and llama-cpp-python's chat use it
            w.add_chat_template(chat_template)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string(KV_CACHE_KEY, kv_cache)
        for name, _, shape, ttype in plan:
            w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, ttype), raw_dtype=ttype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, hf_name, shape, ttype in plan:  # one tensor in memory at a time
            data = ckpt.read(hf_name).reshape(shape)
            w.write_tensor_data(gguf.quants.quantize(data, ttype))
            del data
    finally:
        w.close()


# ---- K-quants through llama.cpp ------------------------------------------------------------------
def quantize_with_llamacpp(src: Path, dst: Path, file_type: LlamaFileType,
                           imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's `llama_model_quantize` of an f32 GGUF (its tensor-type mix for `file_type`), with the
    importance matrix `imatrix` (GGUF tensor name -> float32 [in_features]) when given."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = min(os.cpu_count() or 1, 4)
    if imatrix:  # a {name, data, size} array ended by a NULL name (llama.h's llama_model_imatrix_data)
        keep = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
        entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
        for entry, name, values in zip(entries, imatrix, keep):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    with llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise EdgeError(f"llama.cpp could not quantize to {file_type.name}: {log.first_error() or f'status {rc}'}")
