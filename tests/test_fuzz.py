"""Fuzzing the inputs (issue 17): mutated configs, tensors and artifacts give a one-line EdgeError or a
correct result, never an engine traceback, a crashed process or a half-written file.

- config and tensor mutations of the tiny checkpoint: `runtime.load`/`edge info` on the directory and
  the exporters (whose shared check, edge.checkpoint.check_checkpoint, runs before anything is written);
- artifact mutations (truncation at a random offset, random bytes flipped in the header and in the
  metadata, a valid file of another format or model under the name) for every loader: .gguf, .pte,
  .onnx and the checkpoint directory, through `edge info` and then `edge run`.

A mutated artifact can crash an engine's native loader, so every load runs in a child process
(`Loader`): one long-lived worker that runs `edge` commands on request (importing torch and the
engines once, not per attempt), with its stdout/stderr captured per command and its address space
capped, so a crash or a runaway allocation costs the worker, never pytest. A crash is reported with the
input that caused it; each one found is kept below as a regular regression test with its crafted input,
run through a fresh `python -m edge.cli` process.

Bounded in time: every property runs a fixed, derandomized number of examples (FUZZ_EXAMPLES). The
longer campaign is `pytest -m benchmark tests/test_fuzz.py` (test_campaign): the same properties in a
child pytest with EDGE_FUZZ_EXAMPLES (default 60) examples each, randomized by EDGE_FUZZ_SEED.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import select
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from edge.checkpoint import WEIGHTS, check_checkpoint, expected_shapes
from edge.config import HybridConfig
from edge.errors import EdgeError
from engines import ENGINE_OF_FORMAT, needs
from edge.formats import FORMATS
from export import export_model

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = int(os.environ.get("EDGE_FUZZ_EXAMPLES", "0"))
FUZZ_EXAMPLES = CAMPAIGN or 6
SETTINGS = settings(derandomize=not CAMPAIGN, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fuzz(factor: int = 1):
    """The settings of a property: FUZZ_EXAMPLES x factor examples (cheap properties get more)."""
    return settings(SETTINGS, max_examples=FUZZ_EXAMPLES * factor)


SUFFIX_FORMAT = {f.suffix: name for name, f in FORMATS.items()}
WORKER_MEMORY = 6 * 2**30  # address space of the loader child: a corrupt size fails an allocation there


# ---- the child process that loads ----------------------------------------------------------------
WORKER = r"""
import faulthandler, json, os, resource, sys
workdir, limit = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
reply = os.fdopen(os.dup(1), "w")
from edge.cli import main
import runtime, runtime.llamacpp, runtime.onnxruntime, runtime.executorch  # imported once, not per attempt
for line in sys.stdin:
    argv = json.loads(line)
    out, err = (os.open(os.path.join(workdir, n), os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for n in ("out", "err"))
    saved = os.dup(1), os.dup(2)
    os.dup2(out, 1); os.dup2(err, 2)
    faulthandler.enable(file=2)  # a native crash leaves its stack in the err file the parent reads
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    for fd in (*saved, out, err):
        os.close(fd)
    reply.write(json.dumps(rc) + "\n"); reply.flush()
"""


@dataclasses.dataclass
class Outcome:
    argv: list
    rc: int      # edge's exit status, or the worker's (negative: the signal) when it died
    out: str
    err: str
    died: bool = False

    def __str__(self):
        return f"edge {' '.join(self.argv)} -> {'died ' if self.died else ''}{self.rc}: {self.err.strip()[-600:]}"


class Loader:
    """Runs `edge ARGV` in a long-lived child process; restarts it after a crash or a hang."""

    def __init__(self, workdir: Path):
        self.workdir, self.proc = workdir, None

    def _start(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(self.workdir), str(WORKER_MEMORY)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def _read(self, name):
        return (self.workdir / name).read_text(errors="replace") if (self.workdir / name).exists() else ""

    def __call__(self, *argv, timeout: float = 180) -> Outcome:
        argv = [str(a) for a in argv]
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else None
        if not line:  # died (EOF) or hung (timeout): a finding either way
            if line is None:
                self.proc.kill()
            rc = self.proc.wait()
            self.proc = None
            return Outcome(argv, rc, self._read("out"), self._read("err") + ("" if line == "" else " [hung]"),
                           died=True)
        return Outcome(argv, json.loads(line), self._read("out"), self._read("err"))

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def loader(tmp_path_factory):
    worker = Loader(tmp_path_factory.mktemp("loader"))
    yield worker
    worker.close()


def one_line_or_ok(outcome: Outcome) -> bool:
    """The contract: True for success, False for a one-line `error:` that is an EdgeError; fails otherwise."""
    assert not outcome.died, f"the process died: {outcome}"
    if outcome.rc == 0:
        assert "Traceback" not in outcome.err, str(outcome)
        return True
    lines = outcome.err.strip().splitlines()
    assert outcome.rc == 1 and lines and lines[-1].startswith("error: "), str(outcome)
    assert "rerun with --debug" not in lines[-1], f"not an EdgeError: {outcome}"
    assert len(lines) == 1, f"more than one line on stderr: {outcome}"
    return False


def load_and_run(loader: Loader, path: Path, engine: str) -> bool:
    """`edge info` then, if it loaded, `edge run` two tokens: both keep the contract; True if it loaded."""
    if not one_line_or_ok(info := loader("info", path)):
        return False
    assert engine in info.out, str(info)
    ran = loader("run", path, "--prompt", "hello", "-n", "2", "-t", "1")
    one_line_or_ok(ran)
    return True


def assert_nothing_written(out_dir: Path):
    assert not any(out_dir.iterdir()), f"an export left {[p.name for p in out_dir.iterdir()]}"


def export_refused(model_dir: Path, out_dir: Path, fmt: str, *words) -> str:
    """export_model raises a one-line EdgeError naming `words` and writes nothing."""
    out = out_dir / f"model{FORMATS[fmt].suffix}"
    with pytest.raises(EdgeError) as e:
        export_model(fmt, model_dir, out)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert_nothing_written(out_dir)
    return message


# ---- inputs ------------------------------------------------------------------------------------------
def fresh_dir(base: Path, name: str) -> Path:
    path = base / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def checkpoint_copy(src: Path, dst: Path, weights: bytes | None = None, config: dict | None = None) -> Path:
    """A copy of checkpoint `src` (hard links) with its weights file and/or config.json replaced."""
    for f in src.iterdir():
        if not (f.name == WEIGHTS and weights is not None) and not (f.name == "config.json" and config is not None):
            os.link(f, dst / f.name)
    if weights is not None:
        (dst / WEIGHTS).write_bytes(weights)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of an artifact: its fixed header and its metadata (everything before the weights)."""
    data = path.read_bytes() if path.is_file() else (path / WEIGHTS).read_bytes()
    if path.is_dir():  # safetensors: u64 header length, then the JSON header
        return {"header": (0, 8), "metadata": (8, 8 + int.from_bytes(data[:8], "little"))}
    if path.suffix == ".gguf":  # magic, version, tensor and KV counts; then the KV pairs and tensor infos
        return {"header": (0, 24), "metadata": (24, gguf.GGUFReader(path).data_offset)}
    if path.suffix == ".pte":  # flatbuffer root offset, "ET12", extended header "eh00" (program size, segment base)
        program_size = int.from_bytes(data[16:24], "little")
        return {"header": (0, 32), "metadata": (32, program_size)}
    # ONNX: the ModelProto's first fields, then (serialized last) our metadata_props
    meta = data.find(b"edge.config") - 4
    return {"header": (0, 48), "metadata": (meta, len(data))}


def flips(region: tuple[int, int]):
    lo, hi = region
    return st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(1, 255)), min_size=1, max_size=4)


def flipped(data: bytes, changes) -> bytes:
    data = bytearray(data)
    for offset, xor in changes:
        data[offset] ^= xor
    return bytes(data)


LOADERS = [pytest.param(kind, marks=needs(kind)) for kind in ("checkpoint", "gguf", "executorch", "onnx")]
FORMAT_PARAMS = [pytest.param(fmt, marks=needs(fmt)) for fmt in ("gguf", "executorch", "onnx")]
ENGINE = {"checkpoint": "pytorch", **ENGINE_OF_FORMAT}  # loader kind -> the engine name it reports


@pytest.fixture(scope="session")
def artifact(tiny_dir, tiny_artifact):
    """loader kind -> the valid input it is fuzzed from (the tiny checkpoint, or its unquantized export)."""
    return lambda kind: tiny_dir if kind == "checkpoint" else tiny_artifact(kind)


def raw_bytes(path: Path) -> bytes:
    return (path / WEIGHTS).read_bytes() if path.is_dir() else path.read_bytes()


def write_mutated(base: Path, kind: str, data: bytes, workdir: Path) -> Path:
    """`data` as the artifact of `kind` to load: a file, or a copy of the checkpoint with those weights."""
    if kind == "checkpoint":
        return checkpoint_copy(base, fresh_dir(workdir, "ckpt"), weights=data)
    path = workdir / f"mutated{FORMATS[kind].suffix}"
    path.write_bytes(data)
    return path


# ---- artifact mutations, every loader ------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOADERS)
@fuzz()
@given(data=st.data())
def test_truncated_artifact(kind, data, artifact, loader, tmp_path):
    raw = raw_bytes(artifact(kind))
    cut = data.draw(st.integers(0, len(raw) - 1), label="truncated at")
    load_and_run(loader, write_mutated(artifact(kind), kind, raw[:cut], tmp_path), ENGINE[kind])


@pytest.mark.parametrize("region", ["header", "metadata"])
@pytest.mark.parametrize("kind", LOADERS)
@fuzz()
@given(data=st.data())
def test_flipped_bytes(kind, region, data, artifact, loader, tmp_path):
    base = artifact(kind)
    changes = data.draw(flips(regions(base)[region]), label="(offset, xor)")
    load_and_run(loader, write_mutated(base, kind, flipped(raw_bytes(base), changes), tmp_path), ENGINE[kind])


@pytest.mark.parametrize("kind, other", [pytest.param(kind, other, marks=needs(kind) + needs(other))
                                         for kind in FORMATS for other in FORMATS if kind != other])
def test_file_of_another_format_renamed(kind, other, artifact, loader, tmp_path):
    path = write_mutated(artifact(kind), kind, artifact(other).read_bytes(), tmp_path)
    assert not load_and_run(loader, path, ENGINE[kind])


@pytest.mark.parametrize("replaced", ["weights", "config"])
def test_checkpoint_with_another_models_file(replaced, tiny_dir, checkpoints, loader, tmp_path):
    """The mqa checkpoint's weights (or config.json) in the tiny checkpoint: one line naming a tensor."""
    other = checkpoints("mqa")
    ckpt = fresh_dir(tmp_path, "ckpt")
    if replaced == "weights":
        checkpoint_copy(tiny_dir, ckpt, weights=(other / WEIGHTS).read_bytes())
    else:
        checkpoint_copy(tiny_dir, ckpt, config=json.loads((other / "config.json").read_text()))
    assert not load_and_run(loader, ckpt, "pytorch")
    assert "self_attn.k_proj.weight" in loader("info", ckpt).err


# ---- config mutations ------------------------------------------------------------------------------------
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "conv_L_cache", "max_position_embeddings", "block_multiple_of")
ALIEN = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(), st.text(max_size=6),
                  st.lists(st.integers(-2, 300), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                               max_size=2))
LAYER_TYPE = st.sampled_from(["mamba", "attention", "", "CONV", "full_attention "]) | st.text(max_size=12)


@st.composite
def config_mutations(draw, base: dict):
    """`base` with 1-3 of: a field removed, a field of another type, a size changed, a layer type unknown."""
    d = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3), label="mutations")):
        kind = draw(st.sampled_from(("remove", "retype", "resize", "layer_type")))
        if kind == "remove":
            d.pop(draw(st.sampled_from(sorted(d))), None)
        elif kind == "retype":
            d[draw(st.sampled_from(sorted(d)))] = draw(ALIEN)
        elif kind == "resize":
            key = draw(st.sampled_from(SIZE_FIELDS))
            old = d[key] if type(d.get(key)) is int else 8
            d[key] = n = draw(st.sampled_from([0, -1, 1, old - 1, old + 1, old * 2, old // 2]) | st.integers(-9, 10**6))
            if key == "num_hidden_layers" and 0 < n <= 64 and draw(st.booleans(), label="layer_types follow"):
                d["layer_types"] = (["conv", "full_attention"] * n)[:n]
        else:
            types = d.get("layer_types")
            types = list(types) if isinstance(types, list) and types else ["conv"] * 6
            types[draw(st.integers(0, len(types) - 1))] = draw(LAYER_TYPE)
            d["layer_types"] = types
    return d


def state_shapes(model_dir: Path) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(model_dir / WEIGHTS).items()}


def implied_shapes(config: HybridConfig) -> dict[str, tuple]:
    """The oracle: the shapes the reference model built from `config` really has (small configs only)."""
    from edge.model import HybridLM

    with torch.device("meta"):
        state = HybridLM(config).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}


@fuzz(4)
@given(data=st.data())
def test_config_mutations(data, tiny_dir, loader, tmp_path):
    """A mutated config.json: the directory loads iff the config is valid and implies the weights' shapes;
    otherwise every exporter refuses it in one line before writing anything."""
    base = json.loads((tiny_dir / "config.json").read_text())
    mutated = data.draw(config_mutations(base), label="config.json")
    ckpt = checkpoint_copy(tiny_dir, fresh_dir(tmp_path, "ckpt"), config=mutated)
    try:
        config = HybridConfig.from_dict(mutated)  # only ever a ConfigError: anything else fails the test
        config.tie_word_embeddings = True  # the tiny checkpoint has no lm_head.weight
        consistent = implied_shapes(config) == state_shapes(tiny_dir)
    except EdgeError:
        consistent = False
    assert load_and_run(loader, ckpt, "pytorch") == consistent
    if not consistent:
        export_refused(ckpt, fresh_dir(tmp_path, "out"), data.draw(st.sampled_from(sorted(FORMATS)), label="format"))


# ---- tensor mutations ------------------------------------------------------------------------------------
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.uint8, torch.bool]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_state(tiny_dir):
    return load_file(tiny_dir / WEIGHTS)


@st.composite
def tensor_mutations(draw, state: dict):
    """(state, names touched): 1-2 of a shape changed, a dtype changed, a tensor missing or extra, NaN/Inf."""
    state, touched = dict(state), set()
    for _ in range(draw(st.integers(1, 2), label="mutations")):
        kind = draw(st.sampled_from(("shape", "dtype", "missing", "extra", "nonfinite")))
        name = draw(st.sampled_from(sorted(state)))
        t = state[name]
        if kind == "shape":
            dim = draw(st.integers(0, t.dim() - 1))
            shape = list(t.shape)
            shape[dim] = draw(st.sampled_from(sorted({1, max(shape[dim] - 1, 1), shape[dim] + 1, shape[dim] * 2})))
            if draw(st.booleans(), label="extra dim"):
                shape.append(1)
            state[name] = torch.randn(shape) * 0.02
        elif kind == "dtype":
            dtype = draw(st.sampled_from(DTYPES))
            state[name] = (t if dtype.is_floating_point else torch.nan_to_num(t, 0.0, 0.0, 0.0)).to(dtype)
        elif kind == "missing":
            del state[name]
        elif kind == "extra":
            name = draw(st.sampled_from(["lm_head.weight", "model.layers.0.conv.extra.weight", f"{name}.copy",
                                         "model.layers.99.ffn_norm.weight"]))
            state[name] = t.clone()
        else:
            t = t.clone() if t.is_floating_point() else t.float()  # an int tensor holds no NaN/Inf
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"),
                                                                                   float("-inf")]))
            state[name] = t
        touched.add(name)
        if not state:
            break
    return state, touched


def consistent_state(state: dict, config: HybridConfig) -> bool:
    config = config.replace(tie_word_embeddings="lm_head.weight" not in state)
    return ({k: tuple(v.shape) for k, v in state.items()} == implied_shapes(config)
            and all(v.dtype in FLOATS and bool(torch.isfinite(v).all()) for v in state.values()))


@fuzz(4)
@given(data=st.data())
def test_tensor_mutations(data, tiny_dir, tiny_state, loader, tmp_path):
    """Mutated weights: loaded iff they are what config.json implies (float, finite); otherwise each
    exporter refuses them in one line naming a mutated tensor, and writes nothing."""
    state, touched = data.draw(tensor_mutations(tiny_state), label="tensors")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    ckpt = checkpoint_copy(tiny_dir, fresh_dir(tmp_path, "ckpt"), weights=path.read_bytes())
    consistent = consistent_state(state, HybridConfig.load(tiny_dir))
    assert load_and_run(loader, ckpt, "pytorch") == consistent
    out = fresh_dir(tmp_path, "out")
    if consistent:  # e.g. an fp16 tensor, or an lm_head of the embedding's shape (untied): it exports
        load_and_run(loader, export_model("gguf", ckpt, out / "model.gguf", quant="f32"), "llamacpp")
    else:
        message = export_refused(ckpt, out, data.draw(st.sampled_from(sorted(FORMATS)), label="format"))
        assert any(name in message for name in touched) or not state, message


# ---- the shared check: every exporter, one line, nothing written -----------------------------------------
@pytest.fixture(scope="session")
def mismatched(tiny_dir, tmp_path_factory):
    """The issue's case: tiny's config.json with hidden_size doubled, its weights unchanged."""
    config = json.loads((tiny_dir / "config.json").read_text())
    config["hidden_size"] *= 2
    return checkpoint_copy(tiny_dir, tmp_path_factory.mktemp("mismatched"), config=config)


@pytest.mark.parametrize("fmt", FORMAT_PARAMS)
def test_every_exporter_refuses_weights_that_do_not_match_the_config(fmt, mismatched, tmp_path):
    export_refused(mismatched, tmp_path, fmt, "model.embed_tokens.weight", "(1024, 128)", "(1024, 256)")


def test_cli_export_of_a_mismatched_checkpoint_is_one_line(mismatched, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    run = subprocess.run([sys.executable, "-m", "edge.cli", "export", "gguf", str(mismatched), "-o", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert "model.embed_tokens.weight" in run.stderr and not out.parent.exists()


@pytest.mark.parametrize("fmt", FORMAT_PARAMS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_exporter_refuses_nonfinite_weights(fmt, value, tiny_dir, tiny_state, tmp_path):
    state = dict(tiny_state)
    state["model.layers.2.self_attn.q_proj.weight"] = state["model.layers.2.self_attn.q_proj.weight"].clone()
    state["model.layers.2.self_attn.q_proj.weight"][3, 5] = value
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    ckpt = checkpoint_copy(tiny_dir, fresh_dir(tmp_path, "ckpt"), weights=path.read_bytes())
    export_refused(ckpt, fresh_dir(tmp_path, "out"), fmt, "model.layers.2.self_attn.q_proj.weight", "NaN/Inf")


@pytest.mark.parametrize("fmt", FORMAT_PARAMS)
def test_every_exporter_refuses_a_tokenizer_larger_than_the_embedding(fmt, tokenizer, tmp_path):
    from conftest import build_checkpoint

    ckpt = build_checkpoint(fresh_dir(tmp_path, "ckpt"), tokenizer, vocab_size=512)  # the tokenizer has 1024
    export_refused(ckpt, fresh_dir(tmp_path, "out"), fmt, "token id 1023", "512")


def test_check_passes_the_valid_checkpoints(checkpoints):
    for variant in ("tiny", "untied", "all_conv"):
        config = check_checkpoint(checkpoints(variant))
        assert config.tie_word_embeddings == (variant != "untied")
        assert expected_shapes(config) == state_shapes(checkpoints(variant))


# ---- the longer campaign ---------------------------------------------------------------------------------
@pytest.mark.benchmark
def test_campaign(tmp_path):
    """The properties above with EDGE_FUZZ_EXAMPLES examples each (default 60), random but seeded
    (EDGE_FUZZ_SEED, default 0); every failure is printed with its falsifying input, to become a
    regular test here."""
    examples, seed = os.environ.get("EDGE_FUZZ_EXAMPLES", "60"), os.environ.get("EDGE_FUZZ_SEED", "0")
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-m", "not benchmark", "-q",
                          f"--hypothesis-seed={seed}", "-k", "mutations or truncated or flipped"],
                         env={**os.environ, "EDGE_FUZZ_EXAMPLES": examples}, cwd=ROOT)  # streams its report
    assert run.returncode == 0, "the campaign found inputs that break the contract (above)"


@pytest.mark.parametrize("kind", LOADERS)
def test_valid_inputs_load_in_the_child(kind, artifact, loader):
    """The baseline of every property above: the unmutated input loads and runs."""
    assert load_and_run(loader, artifact(kind), ENGINE[kind])


# ---- findings of the fuzzing, kept as regular tests (crafted inputs built here) ------------------------
def replaced(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and old in data, old
    return data.replace(old, new, 1)


@pytest.mark.engine("llamacpp")
def test_gguf_with_a_corrupt_embedded_tokenizer(artifact, loader, tmp_path):
    """Found by test_flipped_bytes[gguf-metadata]: a control character in the embedded tokenizer.json made
    `tokenizers` raise a bare Exception (`error: Exception: control character ...`, not an EdgeError)."""
    path = write_mutated(artifact("gguf"), "gguf", replaced(raw_bytes(artifact("gguf")), b'"<|pad|>"', b'"<|p\x01d|>"'),
                         tmp_path)
    assert not load_and_run(loader, path, "llamacpp")
    assert "embedded in the artifact" in loader("info", path).err


@pytest.mark.engine("onnxruntime")
def test_onnx_with_undecodable_metadata(artifact, loader, tmp_path):
    """Found by test_flipped_bytes[onnx-metadata]: a metadata value that is not UTF-8 made ONNX Runtime's
    get_modelmeta() raise UnicodeDecodeError (`error: UnicodeDecodeError: ...`)."""
    data = raw_bytes(artifact("onnx"))
    key = data.index(b"edge.quant")
    value = data.index(b"fp32", key)
    data = data[:value] + b"\xe5p32" + data[value + 4:]
    path = write_mutated(artifact("onnx"), "onnx", data, tmp_path)
    assert not load_and_run(loader, path, "onnxruntime")
    assert "unreadable metadata" in loader("info", path).err


@pytest.mark.engine("executorch")
def test_pte_whose_delegate_data_key_is_corrupt(artifact, loader, tmp_path):
    """Found by test_flipped_bytes[executorch-metadata]: a flipped byte in the key of XNNPACK's constant data
    fails the forward method's init, and ExecuTorch printed its C++ log (XNNCompiler.cpp, method.cpp) above
    our error: now those lines are captured and the last one is quoted in the single error line."""
    import re

    data = raw_bytes(artifact("executorch"))
    key = re.search(rb"[0-9a-f]{64}", data).group()
    path = write_mutated(artifact("executorch"), "executorch", replaced(data, key, b"g" + key[1:]), tmp_path)
    assert not load_and_run(loader, path, "executorch")
    assert "XNNCompiler.cpp" in loader("info", path).err


@pytest.mark.engine("llamacpp")
def test_gguf_with_a_repeated_token(artifact, loader, tmp_path):
    """Found by the campaign (test_flipped_bytes[gguf-metadata], one bit of a token string): two equal
    tokens in tokenizer.ggml.tokens made llama.cpp abort the process (SIGABRT, `GGML_ASSERT(id_to_token.size()
    == token_to_id.size())` in llama-vocab.cpp); read_gguf now refuses the list before llama.cpp sees it."""
    length = (2).to_bytes(8, "little")  # gguf strings: u64 length, then the bytes; "¡" becomes "¢"
    data = replaced(raw_bytes(artifact("gguf")), length + "¡".encode(), length + "¢".encode())
    path = write_mutated(artifact("gguf"), "gguf", data, tmp_path)
    assert not load_and_run(loader, path, "llamacpp")
    assert "distinct strings" in loader("info", path).err


def test_checkpoint_without_a_bos_token(tiny_dir, loader, tmp_path):
    """Found by the campaign (test_config_mutations): `"bos_token_id": null` is a valid config (HF allows
    it), but `edge run` then failed with `TypeError: int() ... 'NoneType'`; now the prompt gets no bos."""
    config = json.loads((tiny_dir / "config.json").read_text()) | {"bos_token_id": None}
    ckpt = checkpoint_copy(tiny_dir, fresh_dir(tmp_path, "ckpt"), config=config)
    assert one_line_or_ok(loader("run", ckpt, "--prompt", "hello", "-n", "2"))


@pytest.mark.engine("llamacpp")
def test_gguf_with_a_token_that_is_not_utf8(artifact, loader, tmp_path):
    """Found by the campaign (test_flipped_bytes[gguf-metadata], offset 2603 ^ 32): a token string that is
    not UTF-8 made gguf-py raise UnicodeDecodeError (`error: UnicodeDecodeError: ...`, not an EdgeError)."""
    length = (2).to_bytes(8, "little")
    data = replaced(raw_bytes(artifact("gguf")), length + "¡".encode(), length + b"\xc2\xc1")
    path = write_mutated(artifact("gguf"), "gguf", data, tmp_path)
    assert not load_and_run(loader, path, "llamacpp")
    assert "tokenizer.ggml.tokens is unreadable" in loader("info", path).err


# ---- header bombs (issue 29): declared counts a trusting reader follows ----------------------------------
def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def gguf_bomb() -> bytes:
    """The issue's 158 bytes: one metadata array declaring 2^60 uint8 items (gguf-py looped over them
    without reading a byte, to gigabytes)."""
    s = lambda b: struct.pack("<Q", len(b)) + b  # noqa: E731 - a GGUF string
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + s(b"general.architecture") + struct.pack("<I", 8) + s(b"llama")
            + s(b"x") + struct.pack("<IIQ", 9, 0, 2**60) + b"\0" * 64)


def onnx_bomb(nodes: int = 3 * 10**6) -> bytes:
    """A ModelProto whose graph holds `nodes` empty nodes: 2 bytes each on the wire, ~100 in an engine."""
    return b"\x08\x08" + b"\x3a" + _varint(2 * nodes) + b"\x0a\x00" * nodes


def pte_bomb(pte: Path) -> bytes:
    """`pte` with its forward method planning 1 PiB of memory (ExecutionPlan.non_const_buffer_sizes)."""
    from edge.headers import check_pte

    planned = check_pte(pte)["forward"]
    return replaced(pte.read_bytes(), struct.pack("<q", planned), struct.pack("<q", 2**50))


@pytest.mark.parametrize("kind", [pytest.param("gguf", marks=needs("gguf")), pytest.param("onnx", marks=needs("onnx")),
                                  pytest.param("executorch", marks=needs("executorch"))])
def test_header_bombs_are_one_line_within_the_readers_budget(kind, artifact, loader, tmp_path):
    """`edge info` (runtime.load) reads headers with the bounded readers of edge/headers.py: what
    the file declares costs no more than the budget, in memory and time."""
    import time

    data, word = {"gguf": (gguf_bomb, "budget"), "onnx": (onnx_bomb, "budget"),
                  "executorch": (lambda: pte_bomb(artifact("executorch")), "GiB of memory")}[kind]
    path = tmp_path / f"bomb{FORMATS[kind].suffix}"
    path.write_bytes(data())
    started = time.monotonic()
    outcome = loader("info", path)
    assert not one_line_or_ok(outcome) and word in outcome.err, str(outcome)
    assert time.monotonic() - started < 30, f"took {time.monotonic() - started:.0f} s"


@pytest.mark.engine("executorch")
def test_the_op_library_loads_before_or_after_the_executorch_runtime(tiny_dir, tmp_path):
    """Loaded RTLD_GLOBAL before ExecuTorch's Python runtime, libedge_ops made ExecuTorch abort the process
    (`Re-registering aten::sym_size.int`, SIGABRT). runtime.et_kernels.LOAD_MODE works in either order."""
    from runtime.et_kernels import library_path

    if not library_path().exists():
        pytest.skip("the op library is not built here (python -m runtime.et_kernels build)")
    pte = export_model("executorch", tiny_dir, tmp_path / "int8.pte", kv_cache="int8", max_seq_len=64)
    load_first = ("import ctypes; from runtime import et_kernels; "
                  "ctypes.CDLL(str(et_kernels.library_path()), mode=et_kernels.LOAD_MODE)")
    run = f"import runtime; s = runtime.load({str(pte)!r}); s.prefill([1, 2, 3]); s.decode(4); print(s.op_library)"
    for script in (f"{load_first}\n{run}", f"{run}\n{load_first}\n{run}"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0 and str(library_path()) in done.stdout, done.stderr[-2000:]


# ---- the agent's upload path under a crafted-header campaign (issue 29) ---------------------------------
def header_mutants(rng, bases: dict[str, bytes]):
    """Endless crafted uploads: a valid artifact's header with flipped bytes, huge counts written over its
    count fields, a truncation, or another format's magic; each (name, bytes)."""
    from edge.headers import sniff

    kinds = sorted(bases)
    while True:
        kind = kinds[rng.randrange(len(kinds))]
        data = bytearray(bases[kind])
        how = rng.choice(["flip", "count", "truncate", "flip+truncate"])
        header_end = min(len(data), 4096)
        if "flip" in how:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(header_end)] ^= rng.randint(1, 255)
        if how == "count":  # a u64 or varint field set to a huge value somewhere in the header
            at = rng.randrange(8, header_end - 8)
            data[at:at + 8] = struct.pack("<Q", rng.choice([2**60, 2**32 - 1, 2**63 - 1, rng.getrandbits(64)]))
        if "truncate" in how:
            data = data[:rng.randrange(16, len(data))]
        if sniff(bytes(data[:16])) is None:
            data[:4] = {"gguf": b"GGUF", "onnx": b"\x08\x08\x12\x00", "executorch": data[:4]}[kind]
        yield f"{kind}/{how}", bytes(data)


@pytest.mark.benchmark
def test_agent_upload_campaign(artifact, tmp_path):
    """`PUT /artifacts` with crafted headers for EDGE_AGENT_FUZZ_S seconds (default 1200) against an agent
    capped at 4 GiB of address space: every answer is 201 (a mutant that is still a valid header) or a 4xx
    with a one-line error; the agent's own peak RSS stays under AGENT_RSS_MB. The record goes to
    EDGE_AGENT_FUZZ_RECORD (default OUT/agent_fuzz.json)."""
    import hashlib
    import random
    import resource
    import time

    import httpx

    from test_device import TOKEN, AgentProc  # the device tests' agent process

    seconds = float(os.environ.get("EDGE_AGENT_FUZZ_S", "1200"))
    rng = random.Random(int(os.environ.get("EDGE_FUZZ_SEED", "0")))
    bases = {k: artifact(k).read_bytes() for k in ("gguf", "onnx", "executorch")}
    agent = AgentProc(tmp_path, "fuzzed", "0").start(limits={resource.RLIMIT_AS: 4 << 30})
    statuses: dict[str, int] = {}
    worst = {}
    hwm = 0.0
    started = time.monotonic()
    try:
        client = httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        for name, data in header_mutants(rng, bases):
            if time.monotonic() - started > seconds:
                break
            r = client.put(f"{agent.url}/artifacts/{hashlib.sha256(data).hexdigest()}", content=data)
            key = f"{r.status_code}"
            statuses[key] = statuses.get(key, 0) + 1
            assert r.status_code == 201 or 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
            if r.status_code != 201:
                assert "\n" not in r.json()["error"], r.text
            status = Path(f"/proc/{agent.proc.pid}/status").read_text()
            hwm = max(hwm, int(status.split("VmHWM:")[1].split()[0]) / 1024)
            worst.setdefault(r.status_code, (name, r.json().get("error", "")[:160] if r.status_code != 201 else ""))
        client.close()
    finally:
        agent.stop()
    record = {"seconds": round(time.monotonic() - started), "uploads": sum(statuses.values()), "statuses": statuses,
              "agent_peak_rss_mb": round(hwm, 1), "agent_address_space_gib": 4, "header_check_address_space_gib": 1,
              "examples": {str(k): v for k, v in worst.items()}, "seed": os.environ.get("EDGE_FUZZ_SEED", "0")}
    out = Path(os.environ.get("EDGE_AGENT_FUZZ_RECORD", tmp_path / "agent_fuzz.json"))
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    assert hwm < AGENT_RSS_MB, f"the agent's peak RSS {hwm:.0f} MB"


AGENT_RSS_MB = 300  # the agent never parses a header itself: its RSS is uvicorn's and the upload buffers'
