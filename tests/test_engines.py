"""Every engine's native build runs on this machine, and llama.cpp was built the way install.py builds it."""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engines import ENGINES, engine_failure

ROOT = Path(__file__).resolve().parents[1]
# x86 AMX instructions (Intel SDM vol. 2: tile load/store/config and the tile dot products)
AMX = re.compile(r"\b(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilezero|tilerelease|tdpb[su]{2}d|tdpbf16ps"
                 r"|tdpfp16ps)\b|%tmm[0-7]")


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_runs_on_this_machine(engine):
    cause = engine_failure(engine)
    assert cause is None, f"{engine} cannot run on this machine: {cause}"


def install_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ggml_cpu_library() -> Path:
    import importlib.util

    package = Path(importlib.util.find_spec("llama_cpp").origin).parent  # found, not imported: it may crash
    libs = sorted((package / "lib").glob("libggml-cpu*.so"))
    assert libs, "llama_cpp ships no libggml-cpu library"
    return libs[0]


def test_llama_cpp_was_built_for_this_cpu_by_install_py():
    """The venv's llama.cpp is install.py's build for this very CPU and flag set: a wheel built on
    another machine, by plain pip (AMX left on, pip's version-keyed cache) or before a flag change fails
    here on any CPU, not only on the one where it would crash."""
    install = install_script()
    record = Path(sys.prefix) / install.BUILD_RECORD
    assert record.exists(), f"no {record}: llama-cpp-python was not installed by install.py"
    built = json.loads(record.read_text())
    expected = install.llama_build()
    assert built["key"] == expected["key"], (
        f"llama.cpp was built for another CPU or flag set ({built['cmake_args']} on {built['machine']}); "
        f"rerun python install.py")
    if platform.machine() == "x86_64":
        assert any(install.NO_AMX in arg for arg in built["cmake_args"])


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AMX is an x86-64 instruction family")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_ggml_has_no_amx_code_and_keeps_native_simd():
    """The shared object holds no AMX instruction (the build was told to leave them out) and still has
    the widest vector code this CPU offers (no generic build that gives up speed)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(ggml_cpu_library())],
                          capture_output=True, text=True, check=True).stdout
    amx = AMX.search(text)
    assert amx is None, f"AMX instruction {amx.group(0)!r} in {ggml_cpu_library()}"
    flags = Path("/proc/cpuinfo").read_text().split()
    if "avx512f" in flags:
        assert "%zmm" in text, "an AVX-512 CPU but no zmm code in ggml: not a native build"
    if "avx2" in flags:
        assert "%ymm" in text, "an AVX2 CPU but no ymm code in ggml: not a native build"
