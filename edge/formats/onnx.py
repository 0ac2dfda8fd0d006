"""The ONNX contract: what export/onnx.py (and export/genai.py) write and runtime/onnxruntime.py reads.

A graph maps (input_ids, past state) -> (logits, present state). The state names follow
onnxruntime-genai's LFM2 builder: `past_key_values.{layer}.key|value` per attention layer and
`past_conv.{layer}` per conv layer, each with a `present.*` / `present_conv.*` output; fp32 and int8 KV
graphs (GroupQueryAttention) also take an `attention_mask`. Everything else `runtime.load` needs is in
the model's metadata under META_PREFIX. A path without `.onnx` is an onnxruntime-genai model folder: the
graph plus GENAI_CONFIG naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

from edge.config import HybridConfig
from edge.errors import EdgeError

from . import FORMATS

FORMAT = FORMATS["onnx"]
META_PREFIX = "edge."
REQUIRED_META = ("config", "tokenizer", "quant", "kv_cache", "max_seq_len")
ATTENTION_MASK = "attention_mask"
GENAI_CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"


def state_names(config: HybridConfig) -> list[str]:
    """Names of the past-state inputs, in graph order (present names: see `present_name`)."""
    names = []
    for i in range(config.num_hidden_layers):
        if i in config.attention_layers:
            names += [f"past_key_values.{i}.{kind}" for kind in ("key", "value")]
        else:
            names.append(f"past_conv.{i}")
    return names


def present_name(past: str) -> str:
    """The output name that carries a past_* input's next value."""
    return past.replace("past_key_values.", "present.").replace("past_conv.", "present_conv.")


def is_model_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / GENAI_CONFIG).is_file()


def model_file(folder: str | Path) -> Path:
    """The .onnx graph a model folder's genai_config.json names."""
    folder = Path(folder)
    try:
        name = json.loads((folder / GENAI_CONFIG).read_text())["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgeError(f"{folder / GENAI_CONFIG} is unreadable ({type(e).__name__}: {e}); re-export the folder "
                        "with `edge export onnx MODEL_DIR -o DIR`") from None
    return folder / name
