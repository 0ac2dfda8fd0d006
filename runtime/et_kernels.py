"""Our ExecuTorch custom ops: `edge::int8_sdpa`, causal GQA attention that reads the int8 KV cache
directly, and `edge::int8_update_cache`, which quantizes new K/V rows into it.

Why not ExecuTorch's `llama::custom_quantized_sdpa`: its Q·K runs torchao's int8 matmul, which has NEON
code only; on x86 it is a scalar fallback, ~15x slower than fp32 `custom_sdpa` in prefill (benchmarks/RESULTS.md).

Two halves, one op schema:
  - `define_ops()` (edge/formats/executorch.py, the format's contract: the exporter needs it too)
    registers the schema (functional + out variant, as ExecuTorch's memory planner needs) with
    torch.library, with a reference implementation in torch: what torch.export traces at export time and
    what the tests compare the kernel against;
  - the op library `libedge_ops.so`: runtime/kernels/int8_sdpa.cpp built by its CMake project
    (runtime/kernels/CMakeLists.txt) against the installed executorch wheel, at install time, by
    `python -m runtime.et_kernels build` (`build()`), into `library_path()` = <sys.prefix>/lib/hybrid-edge/.
    Nothing is compiled when a model loads: `load_kernels()` loads that prebuilt library as a plain shared
    library, whose `EXECUTORCH_LIBRARY` registrations add `edge::int8_sdpa.out` and
    `edge::int8_update_cache.out` to the ExecuTorch runtime, or fails in one line naming the build command.
    It is loaded with LOAD_MODE, RTLD_LOCAL (ctypes' default), which works before or after ExecuTorch's
    Python runtime is imported. Never RTLD_GLOBAL before that import: the library needs the runtime's
    `_portable_lib` (DT_NEEDED), and a global load puts it in the process's global scope, where the
    `data_loader` extension the runtime imports next binds its own prim-op registrations to it: ExecuTorch
    then aborts the process ("Re-registering aten::sym_size.int", SIGABRT).
    ExecuTorch's own runner (C++ or its Python binding) runs our .pte once it has loaded the same file; on a
    phone the same CMake project is cross-compiled and linked into the runner (benchmarks/RESULTS.md;
    docs/design.md §4, Deployment targets).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edge.errors import EdgeError
from edge.files import atomic_path, write_json

KERNEL_SOURCE = Path(__file__).with_name("kernels") / "int8_sdpa.cpp"
CMAKE_PROJECT = KERNEL_SOURCE.with_name("CMakeLists.txt")
_loaded: ctypes.CDLL | None = None


# ---- the op library: built once at install time, loaded when a .pte needs it ------------------------
BUILD_COMMAND = "python -m runtime.et_kernels build"
LIBRARY_NAME = "libedge_ops.dylib" if sys.platform == "darwin" else "libedge_ops.so"
LOAD_MODE = os.RTLD_LOCAL  # the mode that works in either order (module docstring); RTLD_GLOBAL does not


def library_path() -> Path:
    """Where the install puts the op library: inside the environment, beside nothing else of ours."""
    return Path(sys.prefix) / "lib" / "hybrid-edge" / LIBRARY_NAME


def _executorch_dirs() -> tuple[Path, Path]:
    try:
        from executorch.extension.pybindings import _portable_lib
    except ImportError as e:
        raise EdgeError(f"the ExecuTorch runtime is not importable ({e}); install the project's pinned "
                        "executorch (`pip install -e .`)") from None

    portable_lib = Path(_portable_lib.__file__)  # executorch/extension/pybindings/_portable_lib*.so
    return portable_lib.parents[2], portable_lib


def _cpu_identity() -> bytes:
    """The CPU's model and feature flags (what -march=native compiles for); the architecture elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))})).encode()
    except OSError:
        return os.uname().machine.encode()


def _stamp(march: str) -> dict:
    """What a built library depends on; a library whose stamp differs must be rebuilt, never loaded."""
    from importlib.metadata import version

    _, portable_lib = _executorch_dirs()
    sources = b"".join(f.read_bytes() for f in (KERNEL_SOURCE, CMAKE_PROJECT))
    return {"source": hashlib.sha256(sources).hexdigest()[:16],
            # the library links the wheel's runtime: another executorch build means another ABI
            "executorch": f"{version('executorch')} {portable_lib.stat().st_size}",
            "march": march,
            "cpu": hashlib.sha256(_cpu_identity()).hexdigest()[:16] if march == "native" else "any"}


def _stamp_path(library: Path) -> Path:
    return library.with_suffix(".json")


def _read_stamp(library: Path) -> dict | None:
    try:
        return json.loads(_stamp_path(library).read_text())
    except (OSError, ValueError):
        return None


def build(library: Path | None = None, march: str | None = None, force: bool = False) -> Path:
    """Build the op library with CMake against the installed executorch wheel (idempotent: an up-to-date
    library is kept). `march` is the -march the kernels are compiled for; by default the existing
    library's, else native, which suits a build that runs on the machine that uses it, as the install does."""
    library = Path(library or library_path())
    march = march or (_read_stamp(library) or {}).get("march", "native")
    stamp = _stamp(march)
    if library.exists() and _read_stamp(library) == stamp and not force:
        return library
    cmake = shutil.which("cmake")
    if not cmake:
        raise EdgeError("building the op library needs CMake >= 3.19 and a C++17 compiler; install them "
                        "(`pip install cmake`, or apt/brew) and rerun `" + BUILD_COMMAND + "`")
    et_dir, _ = _executorch_dirs()
    config_dir = et_dir / "share" / "cmake"
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeError(f"cannot create {library.parent} ({e.strerror}); install into a writable environment") from None
    log = library.parent / "build.log"
    # the wheel's executorch-config.cmake runs `python3` to find the extension suffix: make it this Python
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    with tempfile.TemporaryDirectory(prefix="edge-ops-build-") as build_dir:
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        steps = [[cmake, "-S", str(CMAKE_PROJECT.parent), "-B", build_dir, *generator, "-DEDGE_OPS_WHEEL=ON",
                  f"-Dexecutorch_DIR={config_dir}", "-DCMAKE_BUILD_TYPE=Release", f"-DEDGE_OPS_MARCH={march}"],
                 [cmake, "--build", build_dir]]
        output = ""
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, env=env)
            output += f"$ {' '.join(step)}\n{done.stdout}{done.stderr}"
            if done.returncode:
                log.write_text(output)
                raise EdgeError(f"building the op library failed: {_first_error(output)} (full log: {log}); "
                                "it needs CMake >= 3.19 and a C++17 compiler (or $CXX)")
        built = Path(build_dir) / LIBRARY_NAME
        with atomic_path(library) as tmp:  # a concurrent or interrupted build never leaves half a library
            shutil.copyfile(built, tmp)
    write_json(_stamp_path(library), stamp)
    log.write_text(output)
    return library


def _first_error(output: str) -> str:
    """The line that says what went wrong: a compiler/linker diagnostic, else CMake's error message."""
    lines = [ln.strip() for ln in output.splitlines()]
    diagnostic = next((ln for ln in lines if "error:" in ln.lower()), None)
    if diagnostic:
        return diagnostic
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):  # its message follows on the next lines, broken by blank ones
            return " ".join([line, *(ln for ln in lines[i + 1:i + 6] if ln)])[:300]
    return next((ln for ln in reversed(lines) if ln), "no output")


def load_kernels() -> Path:
    """Load the installed op library into this process (its kernels register with the ExecuTorch runtime);
    returns its path. One-line EdgeError naming the build command if it is missing or stale."""
    global _loaded
    library = library_path()
    if _loaded is not None:
        return library
    if not library.exists():
        raise EdgeError(f"this .pte needs the op library {library} (kernels edge::int8_sdpa, "
                        f"edge::int8_update_cache), which is not built; run `{BUILD_COMMAND}`, or re-export "
                        "with --kv-cache int8-stock for ExecuTorch's stock ops")
    built = _read_stamp(library)
    if built is None or built != _stamp(built.get("march", "native")):
        raise EdgeError(f"the op library {library} was built for another executorch, CPU or kernel source; "
                        f"rebuild it with `{BUILD_COMMAND}`")
    _executorch_dirs()  # the runtime's Python package first: the library registers its kernels into it
    try:
        _loaded = ctypes.CDLL(str(library), mode=LOAD_MODE)
    except OSError as e:
        raise EdgeError(f"cannot load the op library {library} ({str(e).splitlines()[0]}); rebuild it with "
                        f"`{BUILD_COMMAND}`") from None
    return library


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m runtime.et_kernels",
                                description="Build the ExecuTorch op library of our int8 KV-cache kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help=f"build it (if out of date) at {library_path()} and print its path")
    b.add_argument("--march", help="-march of the kernels (default: the existing library's, else native, this "
                   "machine's CPU; e.g. x86-64-v3 for an environment copied between x86 machines)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = p.parse_args(argv)
    try:
        print(f"op library: {build(march=args.march, force=args.force)}")
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
