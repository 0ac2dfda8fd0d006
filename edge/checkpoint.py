"""Hugging Face LFM2 checkpoints: config.json + safetensors (single file or sharded with an index).

Loading never unpickles: a directory with only .bin/.pt weights is refused with a clear error.
"""
from __future__ import annotations

import json
import struct
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
        by_shard = {}
        for name, (path, _) in where.items():
            by_shard.setdefault(path, []).append(name)
        where.clear()  # the memory maps (see read_tensors); one tensor at a time in memory from here
        for path, names in by_shard.items():
            try:
                for name, tensor in read_tensors(path, names):
                    check_finite(name, tensor, path)
            except (OSError, ValueError, KeyError) as e:
                raise EdgeError(f"cannot read {path}: {first_line(e)}; the file is corrupt or truncated") from None
    return config


def check_finite(name: str, tensor: torch.Tensor, where) -> None:
    # a sum is finite only if every value is (NaN and Inf propagate): one pass without the bool copy
    # isfinite makes, several times faster on big checkpoints; an overflowing sum takes the exact path
    if tensor.is_floating_point() and torch.isfinite(tensor.sum(dtype=torch.float64)):
        return
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
        names = list(f.keys())
        del f  # its memory map: every page of it read would count in the RSS next to the copies
        try:
            state.update(read_tensors(path, names))
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise EdgeError(f"cannot read {path}: {first_line(e)}; the file is corrupt or truncated") from None
    return state


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(path: Path, names=None):
    """Yield (name, tensor) from one safetensors file with plain reads into each tensor's own memory.

    safetensors' safe_open memory-maps the file, and every page a read touches stays in the process's
    RSS until the map is closed: reading a whole checkpoint through it costs the checkpoint twice (the
    copies plus the mapped file). Read here, the file only passes through the page cache, which the
    kernel reclaims, so loading costs the tensors alone (the exporters' peak memory, issue 15)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for name in names if names is not None else header:
            entry = header[name]
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
            buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
            if buffer is not None and buffer.nbytes != end - begin:
                raise ValueError(f"tensor {name} has {end - begin} bytes for shape {entry['shape']}")
            fh.seek(8 + n + begin)
            if buffer is not None and fh.readinto(memoryview(buffer)) != end - begin:
                raise ValueError(f"tensor {name} is truncated")
            yield name, tensor


def load_model(model_dir: str | Path, dtype=torch.float32) -> HybridLM:
    """Load a Hugging Face LFM2 checkpoint directory into the reference model (fp32 by default)."""
    model_dir = Path(model_dir)
    config = check_checkpoint(model_dir, read_data=False)  # shapes from the headers, before any allocation
    state = read_state_dict(model_dir)
    for name in list(state):
        check_finite(name, state[name], model_dir)
        state[name] = state[name].to(dtype)  # one tensor at a time: never a second whole copy
    # built on the meta device and given the loaded tensors themselves (assign): a model built on the CPU
    # would hold a randomly initialized copy next to the state dict, twice the checkpoint in RAM
    with torch.device("meta"):
        model = HybridLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:  # assign replaced the embedding's Parameter: tie the head to the new one
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()


def return_freed_memory() -> None:
    """Hand memory freed by Python back to the OS (glibc's malloc_trim), after a model is dropped.

    Weights up to 32 MB are allocated from malloc's heap once glibc has raised its mmap threshold (it does
    after the first big free), and a heap returns little of it by itself: after an exporter drops the fp32
    model, its RSS would stay at the model's size through quantization and writing (issue 15)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


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
