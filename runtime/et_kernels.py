"""Our ExecuTorch custom ops: `edge::int8_sdpa`, causal GQA attention that reads the int8 KV cache
directly, and `edge::int8_update_cache`, which quantizes new K/V rows into it.

Why not ExecuTorch's `llama::custom_quantized_sdpa`: its Q·K runs torchao's int8 matmul, which has NEON
code only; on x86 it is a scalar fallback, ~15x slower than fp32 `custom_sdpa` in prefill (README).

Two halves, one op schema:
  - `define_ops()` registers the schema (functional + out variant, as ExecuTorch's memory planner needs)
    with torch.library, with a reference implementation in torch: what torch.export traces at export time
    and what the tests compare the kernel against;
  - `load_kernels()` compiles runtime/kernels/int8_sdpa.cpp against the headers of the installed
    executorch wheel (once per source/executorch build/CPU, cached) and loads it into this process, where
    it registers the `edge::int8_sdpa.out` and `edge::int8_update_cache.out` kernels with the ExecuTorch
    runtime. Call it before loading a .pte that uses the ops. It is built with -march=native: the kernel
    is compiled on the device that runs it, as a C++ ExecuTorch runner on a phone would compile the same
    file into its app.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from edge.errors import EdgeError

KERNEL_SOURCE = Path(__file__).with_name("kernels") / "int8_sdpa.cpp"
_loaded: ctypes.CDLL | None = None


def int8_sdpa_reference(q, k_cache, v_cache, k_scales, v_scales, start_pos: int) -> torch.Tensor:
    """What the kernel computes, in torch: q [1,T,H,D] float; caches int8 [1,S,KV,D]; scales [1,S,KV,1]."""
    from edge.model import causal_mask, grouped_attention

    T, end = q.shape[1], start_pos + q.shape[1]
    keys = k_cache[:, :end].to(torch.float32) * k_scales[:, :end]
    values = v_cache[:, :end].to(torch.float32) * v_scales[:, :end]
    y = grouped_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                          causal_mask(T, end, start_pos))
    return y.transpose(1, 2).contiguous()


def quantize_symmetric(x: torch.Tensor):
    """int8 values and one fp32 scale per vector over the last dim (symmetric: zero point 0)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def int8_update_cache_reference(value, cache, scales, start_pos: int) -> None:
    """What the cache writer does, in torch: value [1,T,KV,D] float -> cache int8 / scales at start_pos.."""
    end = start_pos + value.shape[1]
    quantized, scale = quantize_symmetric(value)
    cache[:, start_pos:end].copy_(quantized)
    scales[:, start_pos:end].copy_(scale)


def define_ops() -> None:
    """Register edge::int8_sdpa and edge::int8_update_cache (functional + .out) with torch (idempotent)."""
    if hasattr(torch.ops.edge, "int8_sdpa"):
        return
    lib = torch.library.Library("edge", "DEF")
    args = "Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, Tensor v_scales, SymInt start_pos"
    lib.define(f"int8_sdpa({args}) -> Tensor")
    lib.define(f"int8_sdpa.out({args}, *, Tensor(a!) out) -> Tensor(a!)")

    def functional(q, k_cache, v_cache, k_scales, v_scales, start_pos):
        return int8_sdpa_reference(q, k_cache, v_cache, k_scales, v_scales, start_pos)

    def out_variant(q, k_cache, v_cache, k_scales, v_scales, start_pos, *, out):
        return out.copy_(int8_sdpa_reference(q, k_cache, v_cache, k_scales, v_scales, start_pos))

    lib.impl("int8_sdpa", functional, "CompositeExplicitAutograd")
    lib.impl("int8_sdpa.out", out_variant, "CompositeExplicitAutograd")
    lib.impl("int8_sdpa", lambda q, *rest: torch.empty_like(q), "Meta")
    lib.impl("int8_sdpa.out", lambda q, *rest, out: out, "Meta")

    # the cache writer: mutates cache and scales in place (as llama::update_cache does), returns a dummy [1]
    args = "Tensor value, Tensor(a!) cache, Tensor(b!) scales, SymInt start_pos"
    lib.define(f"int8_update_cache({args}) -> Tensor")
    lib.define(f"int8_update_cache.out({args}, *, Tensor(c!) out) -> Tensor(c!)")

    def update(value, cache, scales, start_pos):
        int8_update_cache_reference(value, cache, scales, start_pos)
        return value.new_zeros(1)

    def update_out(value, cache, scales, start_pos, *, out):
        int8_update_cache_reference(value, cache, scales, start_pos)
        return out

    lib.impl("int8_update_cache", update, "CompositeExplicitAutograd")
    lib.impl("int8_update_cache.out", update_out, "CompositeExplicitAutograd")
    lib.impl("int8_update_cache", lambda value, *rest: value.new_empty(1), "Meta")
    lib.impl("int8_update_cache.out", lambda *args, out: out, "Meta")
    define_ops.library = lib  # a Library unregisters its ops when collected


def _executorch_dirs() -> tuple[Path, Path]:
    from executorch.extension.pybindings import _portable_lib

    portable_lib = Path(_portable_lib.__file__)  # executorch/extension/pybindings/_portable_lib*.so
    return portable_lib.parents[2], portable_lib


def load_kernels() -> None:
    """Build (if needed) and load the runtime kernel into this process; one-line EdgeError if impossible."""
    global _loaded
    if _loaded is not None:
        return
    et_dir, portable_lib = _executorch_dirs()  # importing _portable_lib first: the kernel links against it
    source = KERNEL_SOURCE.read_bytes()
    # -march=native: a library built on one CPU may not run on another sharing this cache (e.g. an NFS home)
    key = hashlib.sha256(source + str(portable_lib.stat().st_mtime_ns).encode() + _cpu_identity())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybrid-edge" / "kernels"
    library = cache / f"libedge_kernels-{key.hexdigest()[:16]}.so"
    if not library.exists():
        _build(library, et_dir, portable_lib)
    try:
        _loaded = ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL)
    except OSError as e:
        raise EdgeError(f"cannot load the kernel library {library} ({str(e).splitlines()[0]}); delete it to "
                        "rebuild it on the next load") from None


def _cpu_identity() -> bytes:
    """The CPU's model and feature flags (what -march=native compiles for); the architecture elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))})).encode()
    except OSError:
        return os.uname().machine.encode()


def _build(library: Path, et_dir: Path, portable_lib: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise EdgeError("this .pte uses the int8 KV-cache kernel edge::int8_sdpa, which is compiled on first use "
                        "and needs a C++ compiler (g++ or clang++; or set CXX); or export with --kv-cache fp32")
    torch_include = Path(torch.__file__).parent / "include"  # only for torch/headeronly/macros/cmake_macros.h
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeError(f"cannot create the kernel cache {library.parent} ({e.strerror}); set XDG_CACHE_HOME "
                        "to a writable directory") from None
    tmp = library.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, "-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC",
           "-DET_USE_THREADPOOL", f"-I{et_dir / 'include'}",
           f"-I{et_dir / 'include/executorch/runtime/core/portable_type/c10'}", "-idirafter", str(torch_include),
           str(KERNEL_SOURCE), "-o", str(tmp), str(portable_lib), f"-Wl,-rpath,{portable_lib.parent}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        raise EdgeError(f"building the int8 KV-cache kernel {KERNEL_SOURCE.name} failed: {first}; "
                        "export with --kv-cache fp32 to avoid it")
    os.replace(tmp, library)  # atomic: a concurrent or interrupted build never leaves a half-written library
