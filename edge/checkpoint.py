"""Hugging Face LFM2 checkpoints: config.json + safetensors (single file or sharded with an index).

Loading never unpickles: a directory with only .bin/.pt weights is refused with a clear error.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import HybridConfig
from .errors import EdgeError
from .files import atomic_path, write_json
from .model import HybridLM

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def weight_shards(model_dir: Path) -> list[str]:
    """The safetensors file names of a checkpoint (one, or the shards its index lists)."""
    if (model_dir / INDEX).exists():
        return sorted(set(json.loads((model_dir / INDEX).read_text())["weight_map"].values()))
    if (model_dir / WEIGHTS).exists():
        return [WEIGHTS]
    pickled = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
    hint = (f"found only pickled weights ({', '.join(pickled)}), which are not loaded for safety; "
            "re-save them as safetensors" if pickled else "expected model.safetensors")
    raise EdgeError(f"no safetensors weights in {model_dir}: {hint}")


def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    model_dir = Path(model_dir)
    shards = weight_shards(model_dir)
    state = {}
    for shard in shards:
        try:
            state.update(load_file(model_dir / shard))
        except (SafetensorError, OSError) as e:
            raise EdgeError(f"cannot read {model_dir / shard}: {e}; the file is corrupt or truncated") from None
    return state


def load_model(model_dir: str | Path, dtype=torch.float32) -> HybridLM:
    """Load a Hugging Face LFM2 checkpoint directory into the reference model (fp32 by default)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EdgeError(f"{model_dir} is not a directory; expected a Hugging Face LFM2 checkpoint directory")
    config = HybridConfig.load(model_dir)
    state = read_state_dict(model_dir)
    config.tie_word_embeddings = "lm_head.weight" not in state  # the file decides, as ExecuTorch's converter does
    model = HybridLM(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise EdgeError(f"checkpoint {model_dir} does not match its config.json ({what}"
                        f"{' and more' if len(missing) + len(unexpected) > 1 else ''})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise EdgeError(f"checkpoint {model_dir}: {name} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    return model.to(dtype).eval()


def save_model(model: HybridLM, model_dir: str | Path) -> None:
    """Write config.json + model.safetensors that transformers' Lfm2ForCausalLM loads."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    with atomic_path(model_dir / WEIGHTS) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    write_json(model_dir / "config.json", model.config.to_dict())
