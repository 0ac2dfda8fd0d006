#!/usr/bin/env python3
"""Install hybrid-edge into a virtual environment, building the native engines for this machine.

    python3 install.py                 # .venv with the product (run `python3.13 install.py` for 3.13)
    python3 install.py --extras test   # ... plus the test dependencies (what CI runs)

Why a script and not a bare `pip install -e .`: llama-cpp-python compiles llama.cpp from source with
`-march=native`, and two things about that need care (docs/design.md §11):
- On Intel CPUs with AMX (Sapphire Rapids and newer) `-march=native` switches on ggml's AMX matmul
  backend, which crashes (SIGILL in `ggml_backend_amx_mul_mat`) in the pinned llama.cpp. We add
  `-mno-amx-*` on x86-64 and keep every other native feature and ggml's weight repacking; the flags are
  harmless on CPUs without AMX. Only what the project uses is built (no multimodal library).
- pip caches a built wheel under its version alone, so a wheel compiled on another CPU or with other
  flags would be reused silently. We build with pip's cache off and keep the wheel in our own cache,
  keyed by the version, the flags, the compiler and the CPU's feature flags.
Then our ExecuTorch op library (`python -m runtime.et_kernels build`, CMake against the executorch wheel).
Everything else comes from `pyproject.toml` (the base and the `host` extra; a device agent installs the
light `agent` extras instead, README). Uses only the standard library.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# ggml's AMX kernels in the pinned llama.cpp crash; these keep them out of a -march=native build
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_RECORD = "hybrid-edge-llama-build.json"  # in the venv: how its llama.cpp was built (tests read it)


def pinned(name: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in [*project["dependencies"], *project["optional-dependencies"]["host"]]:
        if dep.split("==")[0].strip() == name:
            return dep.split("==")[1].strip()
    raise SystemExit(f"error: pyproject.toml pins no {name}")


def cpu_features() -> str:
    """The CPU's feature flags as the kernel reports them (x86 `flags`, arm64 `Features`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return " ".join(sorted(value.split()))
    except OSError:
        pass
    return platform.processor()


def compiler() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return cc


def compiler_accepts(flags: str) -> bool:
    cc = os.environ.get("CC", "cc")
    try:
        return subprocess.run([cc, *flags.split(), "-E", "-"], input="", capture_output=True).returncode == 0
    except OSError:
        return False


def llama_build() -> dict:
    """Flags and cache key of this machine's llama.cpp build."""
    cmake_args = ["-DGGML_NATIVE=ON", "-DLLAVA_BUILD=OFF"]
    # a compiler too old to know the AMX flags cannot emit AMX code either
    if platform.machine().lower() in ("x86_64", "amd64") and compiler_accepts(NO_AMX):
        cmake_args += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    build = {"version": pinned("llama-cpp-python"), "cmake_args": cmake_args, "machine": platform.machine(),
             "compiler": compiler(), "cpu_features": cpu_features()}
    build["key"] = hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()[:16]
    return build


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    if subprocess.run(cmd, **kwargs).returncode != 0:
        raise SystemExit(f"error: {' '.join(str(c) for c in cmd[:5])} ... failed (see above)")


def llama_wheel(build: dict, pip: list[str], rebuild: bool) -> Path:
    """The wheel for this build, from our keyed cache or compiled now (pip's own cache never used)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybrid-edge" / "wheels" / build["key"]
    wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
    if wheels and not rebuild:
        print(f"llama.cpp: reusing the wheel built for this CPU and these flags ({wheels[0]})", flush=True)
        return wheels[0]
    print(f"llama.cpp: compiling llama-cpp-python {build['version']} for this CPU with "
          f"{' '.join(build['cmake_args'])} (12-21 minutes on 2 cores)", flush=True)
    env = dict(os.environ, CMAKE_ARGS=shlex.join(build["cmake_args"]),  # scikit-build-core shlex-splits it
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    with tempfile.TemporaryDirectory() as tmp:
        run([*pip, "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
             "-w", tmp, f"llama-cpp-python=={build['version']}"], env=env)
        built = next(Path(tmp).glob("llama_cpp_python-*.whl"))
        cache.mkdir(parents=True, exist_ok=True)
        shutil.move(built, cache / (built.name + ".partial"))
        os.replace(cache / (built.name + ".partial"), cache / built.name)  # no half-written wheel in the cache
        (cache / "build.json").write_text(json.dumps(build, indent=1))
    return cache / built.name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default=str(ROOT / ".venv"), help="virtual environment to create or update "
                   "(default: .venv beside this script; it uses the Python that runs this script)")
    p.add_argument("--extras", default="", help="comma-separated extras of pyproject.toml: test, bench")
    p.add_argument("--rebuild", action="store_true", help="compile llama.cpp even if a wheel for this CPU "
                   "and these flags is cached")
    args = p.parse_args()
    start = time.monotonic()

    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    version = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
                             capture_output=True, text=True).stdout.strip()
    if version != "{}.{}".format(*sys.version_info[:2]):
        raise SystemExit(f"error: {venv} is Python {version}, this script runs {sys.version.split()[0]}; "
                         f"remove {venv} or give another --venv")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]

    build = llama_build()
    record = venv / BUILD_RECORD
    installed = json.loads(record.read_text()) if record.exists() else {}
    if installed.get("key") != build["key"] or args.rebuild:
        wheel = llama_wheel(build, pip, args.rebuild)
        run([*pip, "install", "--no-deps", "--force-reinstall", str(wheel)])
        record.write_text(json.dumps(build, indent=1))
    else:
        print(f"llama.cpp: {venv} already has the build for this CPU and these flags", flush=True)
    t_llama = time.monotonic() - start

    target = f".[{','.join(['host', *filter(None, args.extras.split(','))])}]"  # the host: every engine
    run([*pip, "install", "-e", target], cwd=ROOT)  # llama-cpp-python's pin is already satisfied above
    # our ExecuTorch kernels (edge::int8_sdpa, edge::int8_update_cache) as a shared library, built with
    # CMake against the executorch wheel; a .pte with the int8 KV cache needs it (docs/design.md §11)
    run([str(python), "-m", "runtime.et_kernels", "build"], cwd=ROOT)
    print(f"installed hybrid-edge into {venv} in {time.monotonic() - start:.0f} s "
          f"(llama.cpp {t_llama:.0f} s); run it with {python.parent}/edge", flush=True)


if __name__ == "__main__":
    main()
