"""The one registry of artifact formats (docs/design.md §4): what every layer reads about a format.

    from edge.formats import FORMATS, for_suffix
    fmt = FORMATS["gguf"]; fmt.suffix, fmt.engine, fmt.quants, fmt.default_kv_cache
    export = fmt.exporter()          # the format's `export(model_dir, out, ...)`, imported on first use
    Session = fmt.backend()          # its runtime.Session subclass, imported on first use

Each format's contract (key and I/O names, metadata, quant tables, op schemas) lives beside this file in
`edge/formats/<name>.py`, imported by both its exporter (export/) and its backend (runtime/), which
never import each other. Exporter and backend are named here as lazy "module:attr" strings, so this core
layer imports neither (tests/test_layers.py enforces the order).

Vocabularies: each format's weight and KV spellings are written here once, in the spelling its engine
and its artifacts use (GGUF: llama.cpp's `f32`/`f16`/`q8_0`; ExecuTorch and ONNX: `fp32`/`fp16`/`int8`,
docs/design.md §3). `exact_quant`/`exact_kv_cache` name the unquantized pair of each, so no caller has
to translate one spelling into another.

Adding a format (Core ML, LiteRT, MLX): one entry in FORMATS, its contract module here, its exporter in
export/ and its backend in runtime/.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeError


@dataclass(frozen=True)
class Format:
    name: str                         # `edge export NAME`, `edge search --target NAME`
    suffix: str                       # the artifact's file suffix
    engine: str                       # the engine its backend reports as Session.engine
    engine_package: tuple[str, str]   # the engine's Python package: (import name, distribution)
    exporter_ref: str                 # "module:function" writing the artifact
    backend_ref: str                  # "module:Session subclass" running it
    quants: tuple[str, ...]           # weight formats `--quant` takes
    kv_caches: tuple[str, ...]        # KV-cache formats `--kv-cache` takes
    default_quant: str                # the CLI's rule: each format's 8-bit weights
    default_kv_cache: str
    exact_quant: str                  # unquantized weights (what parity's "exact" bound assumes)
    exact_kv_cache: str               # the most precise KV cache the engine stores
    kv_cache_at_load: bool            # True: load(kv_cache=...) may pick another; False: fixed at export
    # how the 4-bit weights are rounded (`--quant-method`), the default first (GGUF's varies by quant): each
    # format's contract module and exporter say which quants take which method and what each costs
    quant_methods: tuple[str, ...] = ()
    folder: bool = False              # an output path without the suffix is a model folder (onnxruntime-genai)

    def exporter(self):
        return _resolve(self.exporter_ref)

    def backend(self):
        return _resolve(self.backend_ref)

    def check(self, quant: str | None, kv_cache: str | None, flags: bool = False, quant_method: str | None = None
              ) -> None:
        """One-line EdgeError for a quant, KV-cache or quant-method name this format does not take (None: the
        default); flags: name them as the CLI's --quant/--kv-cache."""
        if quant_method is not None and quant_method not in self.quant_methods:
            raise EdgeError(f"unsupported --quant-method {quant_method!r} for {self.name}; "
                            f"choose one of {', '.join(self.quant_methods)}")
        if quant is not None and quant not in self.quants:
            raise EdgeError(f"unsupported {'--quant' if flags else 'quant'} {quant!r} for {self.name}; "
                            f"choose one of {', '.join(self.quants)}")
        if kv_cache is not None and kv_cache not in self.kv_caches:
            raise EdgeError(f"unsupported {'--kv-cache' if flags else 'KV cache'} {kv_cache!r} for {self.name}; "
                            f"choose one of {', '.join(self.kv_caches)}")


def _resolve(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("gguf", ".gguf", engine="llamacpp", engine_package=("llama_cpp", "llama-cpp-python"),
           exporter_ref="export.gguf:export", backend_ref="runtime.llamacpp:LlamaCppSession",
           quants=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_s", "q4_k_m", "iq4_xs", "q5_k_m", "q6_k"),
           kv_caches=("f16", "q8_0", "q4_0"), default_quant="q8_0", default_kv_cache="f16",
           exact_quant="f32", exact_kv_cache="f16", kv_cache_at_load=True,
           # imatrix: llama.cpp's quantizer with an importance matrix from --calib; plain: without one (the
           # default per quant: edge/formats/gguf.py DEFAULT_METHODS)
           quant_methods=("imatrix", "plain")),
    Format("executorch", ".pte", engine="executorch", engine_package=("executorch", "executorch"),
           exporter_ref="export.executorch:export", backend_ref="runtime.executorch:ExecuTorchSession",
           quants=("fp32", "8da8w", "8da4w"),
           # int8: our edge:: kernels (edge/formats/executorch.py); int8-stock: ExecuTorch's own llama:: ops,
           # for runners without our op library
           kv_caches=("fp32", "int8", "int8-stock"), default_quant="8da8w",
           # fp32: the exact cache; int8 holds ~0.27x the bytes at mean cos ~0.9999 and decodes faster deep in the context
           default_kv_cache="fp32", exact_quant="fp32", exact_kv_cache="fp32", kv_cache_at_load=False,
           quant_methods=("hqq", "rtn")),  # torchao's HQQ scale search, or absmax round-to-nearest
    Format("onnx", ".onnx", engine="onnxruntime", engine_package=("onnxruntime", "onnxruntime"),
           exporter_ref="export.onnx:export", backend_ref="runtime.onnxruntime:OnnxSession",
           quants=("fp32", "int8", "int4"), kv_caches=("fp32", "fp16", "int8"), default_quant="int8",
           default_kv_cache="fp32", exact_quant="fp32", exact_kv_cache="fp32", kv_cache_at_load=False,
           quant_methods=("rtn", "hqq", "k_quant", "gptq"), folder=True),  # onnxruntime's quantizers
)}
SUFFIXES = tuple(f.suffix for f in FORMATS.values())
REFERENCE_ENGINE = "pytorch"  # a Hugging Face checkpoint directory, run by runtime.reference
ENGINES = (REFERENCE_ENGINE, *(f.engine for f in FORMATS.values()))


def get(name: str) -> Format:
    if name not in FORMATS:
        raise EdgeError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def for_suffix(path: str | Path) -> Format | None:
    """The format whose artifacts end like `path`, or None."""
    suffix = Path(path).suffix
    return next((f for f in FORMATS.values() if f.suffix == suffix), None)


def for_engine(engine: str) -> Format | None:
    return next((f for f in FORMATS.values() if f.engine == engine), None)


__all__ = ["Format", "FORMATS", "SUFFIXES", "ENGINES", "REFERENCE_ENGINE", "get", "for_suffix", "for_engine"]
