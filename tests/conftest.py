"""Session-scoped tiny checkpoints and artifacts: each is built once per test session and shared by every test."""
from __future__ import annotations

import pytest

from edge.checkpoint import save_model
from edge.config import preset
from edge.model import HybridLM
from edge.tokenizer import default_corpus, save_tokenizer, train_tokenizer
from parity import random_ids, reference_logits

TINY = preset("tiny")
PARITY_IDS = random_ids(TINY.vocab_size)  # the docs/design.md §5 sequence every exporter's parity test uses

# Small configs that cover the architecture's corners (docs/design.md §2). head_dim 32 everywhere so
# 4-bit KV blocks of 32 fit; widths are multiples of 32 for 4-bit weight groups.
VARIANTS = {
    "tiny": {},
    "attn_first_last": dict(layer_types=["full_attention", "conv", "conv", "full_attention"], num_hidden_layers=4),
    "all_conv": dict(layer_types=["conv"] * 3, num_hidden_layers=3),
    "mqa": dict(num_key_value_heads=1),
    "untied": dict(tie_word_embeddings=False),
    "lcache4": dict(conv_L_cache=4),
}


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(default_corpus(), TINY.vocab_size)


# Steps of language-model training for the "trained:<variant>" checkpoints. Random weights make a
# chaotic network whose logits carry no signal, so 4-bit rounding noise compounds through it (q4_0
# gives mean cos ~0.975 on random tiny models, and llama.cpp's own quantizer gives the same); the
# docs/design.md §5 bounds describe real, trained models, which a few dozen steps on text already resemble.
TRAIN_STEPS = 30


def build_checkpoint(path, tokenizer, seed=0, train_steps=0, **changes):
    model = HybridLM(TINY.replace(**changes)).init_weights(seed)
    if train_steps:
        from edge.train import train_on_text

        train_on_text(model, tokenizer, default_corpus(), train_steps, seed=seed, threads=1)
    save_model(model, path)
    save_tokenizer(tokenizer, path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """name -> checkpoint dir, for every variant (random weights) and every "trained:<variant>" (the
    variant after TRAIN_STEPS of training, for the 4-bit bounds); built lazily, cached for the session."""
    cache = {}

    def get(name):
        if name not in cache:
            variant = name.removeprefix("trained:")
            steps = TRAIN_STEPS if name != variant else 0
            path = tmp_path_factory.mktemp(name.replace(":", "_"))
            cache[name] = build_checkpoint(path, tokenizer, train_steps=steps, **VARIANTS[variant])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_dir(checkpoints):
    return checkpoints("tiny")


@pytest.fixture(scope="session")
def reference():
    """checkpoint dir -> reference logits of the parity protocol on PARITY_IDS, computed once per session
    and shared by every exporter's tests."""
    cache = {}

    def get(model_dir):
        key = str(model_dir)
        if key not in cache:
            cache[key] = reference_logits(model_dir, PARITY_IDS)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def op_library():
    """Our ExecuTorch op library (libedge_ops.so), built by the same function the install runs
    (`python -m runtime.et_kernels build`) if missing or stale, once per session: no test skips for want of it."""
    pytest.importorskip("executorch")
    from runtime.et_kernels import build

    return build()


def pytest_configure(config):
    config.addinivalue_line("markers", "engine(name, ...): needs that engine's native code; skipped with the "
                            "cause when engines.py's probe finds it cannot run on this machine")


# test modules that import an engine at the top: not even imported (an import could crash pytest) when the
# engine's probe fails; the module is reported skipped with the cause and test_engines.py fails
ENGINE_MODULES = {"test_gguf.py": "llamacpp", "test_executorch.py": "executorch", "test_onnx.py": "onnxruntime"}


class EngineDownModule(pytest.Module):
    cause = ""

    def collect(self):
        pytest.skip(self.cause, allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    from engines import engine_failure, start_probes

    engine = ENGINE_MODULES.get(module_path.name)
    if engine:
        start_probes(*ENGINE_MODULES.values())  # side by side, while this one is awaited
        cause = engine_failure(engine)
        if cause:
            module = EngineDownModule.from_parent(parent, path=module_path)
            module.cause = f"{engine} cannot run on this machine: {cause}"
            return module
    return None


def pytest_runtest_setup(item):
    from engines import engine_failure

    for mark in item.iter_markers("engine"):
        for engine in mark.args:
            cause = engine_failure(engine)
            if cause:
                pytest.skip(f"{engine} cannot run on this machine: {cause}")


def pytest_terminal_summary(terminalreporter):
    from engines import PROBED

    for engine, cause in PROBED.items():
        if cause:
            terminalreporter.write_line(f"ENGINE DOWN: {engine} cannot run on this machine: {cause}", red=True)


ARTIFACT_MAX_SEQ_LEN = 96


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_dir):
    """export format (gguf, executorch, onnx) -> the tiny checkpoint exported with unquantized weights and
    cache (fp16 KV where the engine has no fp32 cache) at max_seq_len ARTIFACT_MAX_SEQ_LEN, once per session."""
    from edge.formats import FORMATS
    from export import export_model

    built = {}

    def get(fmt):
        if fmt not in built:
            spec = FORMATS[fmt]
            built[fmt] = export_model(
                fmt, tiny_dir, tmp_path_factory.mktemp(f"tiny-{fmt}") / f"tiny{spec.suffix}",
                quant=spec.exact_quant, kv_cache=spec.exact_kv_cache, max_seq_len=ARTIFACT_MAX_SEQ_LEN)
        return built[fmt]

    return get
