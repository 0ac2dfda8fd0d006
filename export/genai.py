"""onnxruntime-genai model folders: what `edge export onnx MODEL -o DIR` writes (docs/design.md §4).

onnxruntime-genai's `og.Model(DIR)` opens a folder, not a file: the graph (`model.onnx`, + external data
`model.onnx.data` past protobuf's 2 GiB), `genai_config.json` naming the graph's I/O and the generation
defaults, and the tokenizer files. Our graph's I/O already follows the names its LFM2 builder uses
(export/onnx.py), so the config only has to say so: `past_conv.%d`/`present_conv.%d` for the conv
states (the builder's own graphs call them `past.%d.conv`), `conv_cache_size` = conv_L_cache - 1 (our
state keeps that many columns, as the builder's CausalConvWithState graphs do), logits of the last
position only (genai samples from the last position either way).

KV caches: fp32 and int8 graphs use GroupQueryAttention with an `attention_mask` input, whose lengths
come from the mask, so genai may bind past and present to one max-length buffer
(`past_present_share_buffer`, no cache copy per token). int8 is GQA's native int8 cache with its scales
inside the graph, so genai sees int8 past/present tensors and nothing else. The fp16 graph has no mask
input (MultiHeadAttention over concatenated K/V); genai drives it with separate past and present.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from edge.config import HybridConfig
from edge.errors import EdgeError
from edge.files import atomic_dir
from edge.formats.onnx import GENAI_CONFIG, MODEL_FILE, is_model_folder

TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
SINGLE_FILE_LIMIT = 2**31  # protobuf's limit on one serialized ModelProto


def generation_defaults(model_dir: Path) -> dict:
    """The checkpoint's generation_config.json (bos/eos/pad and sampling defaults), {} if absent."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or remove it") from None


def genai_config(config: HybridConfig, graph_inputs: list[str], max_seq_len: int, kv_cache: str,
                 generation: dict) -> dict:
    """genai_config.json for our graph, laid out as onnxruntime-genai's builder writes it (builders/base.py
    `make_genai_config`, builders/lfm2.py `update_genai_config`)."""
    inputs = {"input_ids": "input_ids"}
    if "attention_mask" in graph_inputs:
        inputs["attention_mask"] = "attention_mask"
    outputs = {"logits": "logits"}
    if config.attention_layers:
        inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
        outputs |= {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    if config.conv_layers:
        inputs["past_conv_names"] = "past_conv.%d"
        outputs["present_conv_names"] = "present_conv.%d"
    eos = generation.get("eos_token_id", config.eos_token_id)
    bos = generation.get("bos_token_id", config.bos_token_id)
    return {
        "model": {
            # genai refuses a null: a model without bos (a SmolLM2 child, edge/derive) leaves the key out
            **({"bos_token_id": bos} if bos is not None else {}),
            "context_length": max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
                "layer_types": list(config.layer_types),
                "conv_cache_size": config.conv_L_cache - 1,
            },
            "eos_token_id": eos,
            "pad_token_id": generation.get("pad_token_id", config.pad_token_id),
            "type": "lfm2",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_seq_len,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention graphs (with the mask) append to one shared buffer; see the docstring
            "past_present_share_buffer": "attention_mask" in graph_inputs,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k", 50)),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }


def tokenizer_config(model_dir: Path, config: HybridConfig, tokenizer_text: str, max_seq_len: int,
                     chat_template: str | None) -> dict:
    """The checkpoint's tokenizer_config.json (or a minimal one from its special tokens) with the chat
    template in it, where onnxruntime-genai's tokenizer (and transformers) read it."""
    path = model_dir / "tokenizer_config.json"
    try:
        tc = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise EdgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from None
    if not tc:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(tokenizer_text)
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True}
        for name, i in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id),
                        ("pad_token", config.pad_token_id)):
            if i is not None and tok.id_to_token(i) is not None:
                tc[name] = tok.id_to_token(i)
    tc["model_max_length"] = max_seq_len  # as the builder does: HF's 1e30 "no limit" is no valid int here
    if chat_template:
        tc["chat_template"] = chat_template
    return tc


def write_model_folder(out: Path, graph, *, model_dir: Path, config: HybridConfig, tokenizer_text: str,
                       kv_cache: str, max_seq_len: int, chat_template: str | None) -> Path:
    """Write the folder atomically: model.onnx (+ .data), genai_config.json, tokenizer files."""
    import onnx

    graph_inputs = [i.name for i in graph.graph.input]
    with atomic_dir(out, replaceable=is_model_folder) as tmp:
        external = graph.ByteSize() >= SINGLE_FILE_LIMIT
        onnx.save_model(graph, str(tmp / MODEL_FILE), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=MODEL_FILE + ".data", size_threshold=1024)
        write(tmp / GENAI_CONFIG, genai_config(config, graph_inputs, max_seq_len, kv_cache,
                                               generation_defaults(model_dir)))
        (tmp / "tokenizer.json").write_text(tokenizer_text, encoding="utf-8")
        for name in TOKENIZER_FILES[1:]:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        write(tmp / "tokenizer_config.json",
              tokenizer_config(model_dir, config, tokenizer_text, max_seq_len, chat_template))
    return out


def write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
