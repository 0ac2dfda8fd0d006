"""The llama.cpp backend: a .gguf (arch lfm2) run through llama-cpp-python's low-level C API.

    s = LlamaCppSession("model.gguf", n_threads=1, kv_cache="q8_0")

Everything the session needs comes from the file's standard lfm2 keys, so a GGUF made by llama.cpp's own
converter loads as well as ours: the HybridConfig from `lfm2.*` hyperparameters, the tokenizer from the
embedded tokenizer.json if present, else rebuilt from `tokenizer.ggml.tokens`/`merges`. The KV-cache type
is the artifact's default (`hybrid_edge.kv_cache`, f16 when absent) unless `kv_cache=` overrides it.
A Llama GGUF (arch `llama`, e.g. the parent `edge derive` starts from) loads too, as an all-attention
config, so `edge bench` and `edge run` measure a parent beside its children.

The header is validated with the bounded reader of edge/headers.py before llama.cpp sees the
file, because llama.cpp aborts the process on some malformed files (and on lfm2 models without attention
layers), and gguf-py's reader trusts declared counts (a 158-byte file can make it allocate gigabytes); llama.cpp's log is
captured process-wide, never printed, and its first error line ends up in the EdgeError when it still
refuses a file.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import Keys, LlamaFileType, MODEL_ARCH, MODEL_ARCH_NAMES

from edge.config import HybridConfig
from edge.errors import EdgeError
from edge.formats import FORMATS
from edge.headers import GGUFHeader, HeaderError, read_gguf_header
from edge.tokenizer import PRE_TOKENIZERS, load_tokenizer, tokenizer_json_from_gguf
from edge.formats.gguf import (ABSENT_KV_CACHE, ARCH, DIRECT_QUANTS, K_QUANTS, KV_CACHE_KEY, KV_TYPES,
                               check_llamacpp_can_run, llama_log, quiet_llamacpp)

from .session import Session

LLAMA_ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]  # the parents `edge derive` starts from, benchmarked beside
quiet_llamacpp()  # process-wide, from the first import on: llama.cpp's log never reaches stderr
MAX_BATCH = 512  # tokens per llama_decode call; longer prompts are fed in chunks


# ---- reading the GGUF header -------------------------------------------------------------------------
def _field(header: GGUFHeader, path: Path, key: str, default=None, required: bool = True):
    if key not in header.fields:
        if required and default is None:
            raise EdgeError(f"{path} lacks the GGUF key {key}; re-export it with `edge export gguf`")
        return default
    return header.fields[key]


def read_gguf(path: Path) -> dict:
    """Validate a .gguf header and return its config, tokenizer, quant, default KV type and context.
    The header is read by the bounded reader (edge/headers.py): a declared count can neither
    exhaust memory nor point llama.cpp outside the file."""
    try:
        header = read_gguf_header(path)
    except HeaderError as e:
        raise EdgeError(f"{path}: {e}" if "re-export" in str(e) else f"{path}: {e}; re-export it") from None

    def field(key, **kw):
        return _field(header, path, key, **kw)

    arch = field(Keys.General.ARCHITECTURE)
    if arch not in (ARCH, LLAMA_ARCH):
        raise EdgeError(f"{path} is a GGUF of architecture {arch!r}; this runtime runs LFM2-style models "
                        f"(architecture {ARCH!r}) and Llama models, the parents they are derived from")

    def key(template, **kw):
        return field(template.format(arch=arch), **kw)

    hidden = key(Keys.LLM.EMBEDDING_LENGTH)
    n_layers = key(Keys.LLM.BLOCK_COUNT)
    heads = key(Keys.Attention.HEAD_COUNT)
    kv = key(Keys.Attention.HEAD_COUNT_KV)
    kv = kv if isinstance(kv, list) else [kv] * n_layers  # a scalar means every layer is attention
    if len(kv) != n_layers:
        raise EdgeError(f"{path}: head_count_kv has {len(kv)} entries for {n_layers} layers; the file is corrupt")
    tokens = field(Keys.Tokenizer.LIST)
    # llama.cpp aborts the process (GGML_ASSERT in llama-vocab.cpp) on a token list with a repeated token
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or len(set(tokens)) < len(tokens):
        raise EdgeError(f"{path}: tokenizer.ggml.tokens is not a list of distinct strings; the file is corrupt, "
                        "re-export it")
    tensor_names = {t.name for t in header.tensors}
    context = key(Keys.LLM.CONTEXT_LENGTH)
    try:
        config = HybridConfig(
            vocab_size=len(tokens), hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=max(kv) or 1,  # all-conv models have no KV heads; 1 keeps the config valid
            layer_types=["full_attention" if n else "conv" for n in kv],
            intermediate_size=key(Keys.LLM.FEED_FORWARD_LENGTH), block_auto_adjust_ff_dim=False,
            conv_L_cache=key(Keys.ShortConv.L_CACHE) if arch == ARCH else 3,  # llama: no conv layers
            norm_eps=key(Keys.Attention.LAYERNORM_RMS_EPS),
            rope_theta=key(Keys.Rope.FREQ_BASE, default=10000.0),  # llama.cpp's default when absent
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in tensor_names,
            # a file whose tokenizer adds no bos (SmolLM2's) gets none from Session.encode either
            bos_token_id=(field(Keys.Tokenizer.BOS_ID, required=False)
                          if field(Keys.Tokenizer.ADD_BOS, default=True, required=False) else None),
            eos_token_id=field(Keys.Tokenizer.EOS_ID, required=False),
            pad_token_id=field(Keys.Tokenizer.PAD_ID, required=False))
    except EdgeError as e:
        raise EdgeError(f"{path}: {e}") from None
    hf_json = field(Keys.Tokenizer.HF_JSON, required=False)
    if hf_json:
        tokenizer = load_tokenizer(hf_json)
    else:
        tokenizer = tokenizer_from_vocab(tokens, field(Keys.Tokenizer.TOKEN_TYPE, required=False),
                                         field(Keys.Tokenizer.MERGES),
                                         field(Keys.Tokenizer.PRE, default="gpt-2", required=False))
    file_type = field(Keys.General.FILE_TYPE, required=False)
    return dict(config=config, arch=arch, tokenizer=tokenizer, context_length=context, quant=_quant_name(file_type),
                kv_cache=field(KV_CACHE_KEY, default=ABSENT_KV_CACHE),
                chat_template=field(Keys.Tokenizer.CHAT_TEMPLATE, required=False))


def _quant_name(file_type) -> str:
    names = {int(ft): name for name, (_, ft) in DIRECT_QUANTS.items()} | {int(ft): n for n, ft in K_QUANTS.items()}
    if file_type is None:
        return "unknown"
    if file_type in names:
        return names[file_type]
    try:
        return LlamaFileType(file_type).name.lower().removeprefix("mostly_")
    except ValueError:
        return f"file_type {file_type}"


def tokenizer_from_vocab(tokens: list[str], types: list[int] | None, merges: list[str], pre: str = "gpt-2"):
    """A byte-level BPE `tokenizers.Tokenizer` from the gpt2-style vocab of a GGUF (stock files have no
    tokenizer.json), pre-tokenized as llama.cpp's `pre` says where edge.tokenizer knows that name (SmolLM's
    digit split), else with GPT-2's regex; control tokens are special tokens."""
    return load_tokenizer(tokenizer_json_from_gguf(tokens, types, merges, pre if pre in PRE_TOKENIZERS else "gpt-2"))


# ---- the session ---------------------------------------------------------------------------------------
class LlamaCppSession(Session):
    format = FORMATS["gguf"]  # kv_cache_at_load: llama.cpp takes the KV type at context creation
    engine = format.engine

    def __init__(self, path, n_threads: int | None = None, kv_cache: str | None = None,
                 max_seq_len: int | None = None):
        path = Path(path)
        info = read_gguf(path)
        config = info["config"]
        if info["arch"] == ARCH:  # a Llama parent is all attention, which llama.cpp's llama runs
            check_llamacpp_can_run(config, path)  # before llama.cpp could abort the process
        kv_cache = kv_cache or info["kv_cache"]
        if kv_cache not in KV_TYPES:
            raise EdgeError(f"unknown KV-cache type {kv_cache!r} for llama.cpp; choose one of {', '.join(KV_TYPES)}")
        self.kv_type = KV_TYPES[kv_cache]
        block = gguf.GGML_QUANT_SIZES[self.kv_type][0]
        if config.attention_layers and config.head_dim % block:
            raise EdgeError(f"KV cache {kv_cache} stores blocks of {block} values but head_dim is "
                            f"{config.head_dim}; use --kv-cache f16 or a head_dim that is a multiple of {block}")
        n_threads = n_threads or max((os.cpu_count() or 2) // 2, 1)  # llama-cpp-python's default
        super().__init__(config, info["tokenizer"], max_seq_len or info["context_length"], n_threads,
                         quant=info["quant"], kv_cache=kv_cache, path=str(path))
        self.chat_template = info["chat_template"]
        self.model = self.ctx = self.batch = None
        self._load(path)

    def _load(self, path: Path):
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        with llama_log() as log:
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise EdgeError(f"llama.cpp could not load {path}: {log.first_error() or 'unknown error'}")
        n_batch = min(self.max_seq_len, MAX_BATCH)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.max_seq_len
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = params.type_v = int(self.kv_type)
        # llama.cpp stores a quantized V cache only with flash attention; otherwise let it choose
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.kv_type != QType.F16
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
        with llama_log() as log:
            self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            self.close()
            raise EdgeError(f"llama.cpp could not create a context for {path} (n_ctx {self.max_seq_len}, KV "
                            f"{self.kv_cache}): {log.first_error() or 'unknown error'}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch

    def _forward(self, ids):
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                b.token[i] = token
                b.pos[i] = self.n_past + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = False
            b.logits[len(chunk) - 1] = True  # only the last position's logits are computed and kept
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                raise EdgeError(f"llama.cpp failed to evaluate {len(chunk)} tokens at position "
                                f"{self.n_past + start} (llama_decode returned {rc}); call reset()")
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.vocab_size,)).copy()

    def _reset(self):
        llama_cpp.llama_memory_clear(self.memory, True)

    def kv_cache_bytes(self) -> int:
        """Bytes of the K and V cells holding the current context: for every attention layer, n_past
        positions x kv heads x head_dim elements each of K and V, in the cache type's blocks."""
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.kv_type]
        return self.config.kv_vectors(self.n_past) * self.config.head_dim * block_bytes // block

    def close(self):
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        self.close()
