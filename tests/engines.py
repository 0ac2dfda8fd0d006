"""Can each engine's native code run on this machine? One probe per engine, in a child process.

llama.cpp is compiled on the machine that installs it (`-march=native`) and our ExecuTorch kernels are
too: a build whose instructions or kernels crash on this CPU (ggml's AMX matmul on Sapphire Rapids
raised SIGILL) would kill pytest itself at the first decode. The probe exports a two-layer model in the
engine's 4-bit-weights / 8-bit-KV format (the demo's), loads it and decodes, in a child; the test run
then skips that engine's tests with the cause in one line, fails `test_engines.py`, and the other
engines still run and report (conftest.py wires the `engine` marker to `engine_failure`).

    python tests/engines.py llamacpp      # the probe itself (what the child runs)
"""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile

from edge.formats import FORMATS

# engine -> (export format, weights, KV cache) of the probe: the 4-bit weights and 8-bit KV whose native
# kernels are likeliest to crash on a CPU (the demo's); a format not listed here, its defaults
PROBE_QUANTS = {"gguf": ("q4_0", "q8_0"), "executorch": ("8da4w", "int8"), "onnx": ("int4", "int8")}
ENGINES = {f.engine: (f.name, *PROBE_QUANTS.get(f.name, (f.default_quant, f.default_kv_cache)))
           for f in FORMATS.values()}
ENGINE_OF_FORMAT = {f.name: f.engine for f in FORMATS.values()}  # the `engine` marker's names
PROBE_TIMEOUT_S = 600
_children: dict[str, subprocess.Popen] = {}
PROBED: dict[str, str | None] = {}  # engine -> cause of failure (None: runs), for this test session


def start_probes(*engines: str) -> None:
    """Start the probes in the background (they run side by side; engine_failure collects them)."""
    for engine in engines:
        if engine not in _children:
            _children[engine] = subprocess.Popen([sys.executable, __file__, engine], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE, text=True)


def needs(fmt: str) -> list:
    """pytest marks for a parameter that runs format `fmt` (none for the PyTorch reference)."""
    import pytest

    return [pytest.mark.engine(ENGINE_OF_FORMAT[fmt])] if fmt in ENGINE_OF_FORMAT else []


def engine_failure(engine: str) -> str | None:
    """None if the engine exports, loads and decodes here; else the cause, in one line. Probed once."""
    if engine not in PROBED:
        start_probes(engine)
        PROBED[engine] = _outcome(engine, _children[engine])
    return PROBED[engine]


def _outcome(engine: str, child: subprocess.Popen) -> str | None:
    fmt, quant, kv = ENGINES[engine]
    what = f"the probe ({fmt} {quant}/{kv} export, load, decode)"
    try:
        _, stderr = child.communicate(timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        return f"{what} hung for {PROBE_TIMEOUT_S} s"
    if child.returncode == 0:
        return None
    if child.returncode < 0:
        sig = signal.Signals(-child.returncode)
        return f"{what} was killed by {sig.name} ({signal.strsignal(sig)})"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"{what} failed: {lines[-1] if lines else f'exit status {child.returncode}'}"


def probe(engine: str) -> None:
    from edge.checkpoint import save_model
    from edge.config import preset
    from edge.model import HybridLM
    from edge.tokenizer import default_corpus, save_tokenizer, train_tokenizer
    import runtime
    from export import export_model

    fmt, quant, kv = ENGINES[engine]
    config = preset("tiny").replace(num_hidden_layers=2, layer_types=["conv", "full_attention"])
    with tempfile.TemporaryDirectory() as tmp:
        save_model(HybridLM(config).init_weights(0), tmp)
        save_tokenizer(train_tokenizer(default_corpus(), config.vocab_size), tmp)
        suffix = FORMATS[fmt].suffix
        artifact = export_model(fmt, tmp, f"{tmp}/probe{suffix}", quant=quant, kv_cache=kv, max_seq_len=64)
        session = runtime.load(artifact, n_threads=1)
        session.prefill(list(range(1, 40)))
        session.decode(5)


if __name__ == "__main__":
    probe(sys.argv[1])
