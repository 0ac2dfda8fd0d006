"""Hugging Face LFM2 checkpoints: config.json + safetensors (single file or sharded with an index).

Loading never unpickles: a directory with only .bin/.pt weights is refused with a clear error.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .config import HybridConfig
from .errors import EdgeError, first_line
from .files import atomic_path, write_json
from .model import HybridLM

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def weight_shards(model_dir: Path) -> list[str]:
    """The safetensors file names of a checkpoint (one, or the shards its index lists)."""
    if (model_dir / INDEX).exists():
        try:
            shards = sorted(set(json.loads((model_dir / INDEX).read_text())["weight_map"].values()))
            if not all(isinstance(s, str) for s in shards):
                raise TypeError("shard names must be strings")
            return shards
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EdgeError(f"{model_dir / INDEX} is not a safetensors index ({type(e).__name__}: {e}); "
                            "regenerate it or merge the shards into model.safetensors") from None
    if (model_dir / WEIGHTS).exists():
        return [WEIGHTS]
    pickled = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
    hint = (f"found only pickled weights ({', '.join(pickled)}), which are not loaded for safety; "
            "re-save them as safetensors" if pickled else "expected model.safetensors")
    raise EdgeError(f"no safetensors weights in {model_dir}: {hint}")


# dtypes the exporters and the reference read as weights; anything else (ints, bools, fp8) would be
# converted silently into numbers the checkpoint never meant
FLOAT_DTYPES = ("F32", "F16", "BF16")


def _open_shards(model_dir: Path):
    """(shard path, open safetensors handle) for every shard; only headers are read here."""
    from safetensors import safe_open

    for shard in weight_shards(model_dir):
        try:
            f = safe_open(model_dir / shard, framework="pt")
        except (SafetensorError, OSError) as e:
            raise EdgeError(f"cannot read {model_dir / shard}: {first_line(e)}; "
                            "the file is corrupt or truncated") from None
        yield model_dir / shard, f


def expected_shapes(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face Lfm2ForCausalLM tensor name -> the shape `config` implies, lm_head included only when
    untied. Built on the meta device: the model's own definition, no memory allocated."""
    with torch.device("meta"):
        model = HybridLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_checkpoint(model_dir: str | Path, read_data: bool = True) -> HybridConfig:
    """Validate a checkpoint before anything is written from it (docs/design.md §4: one line on bad input).

    The config is valid; every tensor it implies is present with the implied shape and a float dtype,
    and there is no other; the tokenizer's ids fit the embedding; with `read_data`, every weight is
    finite (read one tensor at a time). Whether lm_head is tied is the file's choice, as for transformers'
    converters: no lm_head.weight means tied. Returns the config, tie_word_embeddings set from the file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EdgeError(f"{model_dir} is not a directory; expected a Hugging Face LFM2 checkpoint directory")
    config = HybridConfig.load(model_dir)
    where = {}  # tensor name -> open shard
    for path, f in _open_shards(model_dir):
        where.update({name: (path, f) for name in f.keys()})
    config.tie_word_embeddings = "lm_head.weight" not in where
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected))
    if missing or unexpected:
        what = (f"missing tensor {missing[0]} of shape {expected[missing[0]]}" if missing
                else f"unexpected tensor {unexpected[0]}")
        more = len(missing) + len(unexpected) - 1
        raise EdgeError(f"checkpoint {model_dir} does not match its config.json: {what}"
                        f"{f' (and {more} more)' if more else ''}; the weights and config.json do not belong together")
    for name, (path, f) in where.items():
        tensor = f.get_slice(name)
        shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
        if shape != expected[name]:
            raise EdgeError(f"checkpoint {model_dir}: tensor {name} has shape {shape}, config.json implies "
                            f"{expected[name]}; the weights and config.json do not belong together")
        if dtype not in FLOAT_DTYPES:
            raise EdgeError(f"checkpoint {model_dir}: tensor {name} is {dtype}, expected a float dtype "
                            f"({', '.join(FLOAT_DTYPES)}); re-save the weights in float")
    check_tokenizer_fits(model_dir, config)
    if read_data:
        for name, (path, f) in where.items():
            check_finite(name, f.get_tensor(name), path)
    return config


def check_finite(name: str, tensor: torch.Tensor, where) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise EdgeError(f"{where}: tensor {name} has {bad} NaN/Inf values; the weights are corrupt (or a training "
                        "run diverged), export a checkpoint with finite weights")


def check_tokenizer_fits(model_dir: Path, config: HybridConfig) -> None:
    """Every id the checkpoint's tokenizer can produce has an embedding row."""
    if not (model_dir / "tokenizer.json").exists():
        return  # the exporters refuse a missing tokenizer themselves (edge.tokenizer.tokenizer_json)
    from .tokenizer import load_tokenizer

    vocab = load_tokenizer(model_dir).get_vocab(with_added_tokens=True)
    top = max(vocab.values(), default=-1)
    if top >= config.vocab_size:
        raise EdgeError(f"{model_dir}: the tokenizer has token id {top} but the embedding has {config.vocab_size} "
                        "rows (vocab_size); the tokenizer and the checkpoint do not belong together")


def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    model_dir = Path(model_dir)
    state = {}
    for path, f in _open_shards(model_dir):
        try:
            state.update({name: f.get_tensor(name) for name in f.keys()})
        except (SafetensorError, OSError) as e:
            raise EdgeError(f"cannot read {path}: {first_line(e)}; the file is corrupt or truncated") from None
    return state


def load_model(model_dir: str | Path, dtype=torch.float32) -> HybridLM:
    """Load a Hugging Face LFM2 checkpoint directory into the reference model (fp32 by default)."""
    model_dir = Path(model_dir)
    config = check_checkpoint(model_dir, read_data=False)  # shapes from the headers, before any allocation
    state = read_state_dict(model_dir)
    for name, tensor in state.items():
        check_finite(name, tensor, model_dir)
    model = HybridLM(config)
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
