"""What the device is and how it is doing: CPU, engines and their versions, and where Linux exposes them,
the cpufreq governor, the current frequency and the thermal zones' temperatures (docs/design.md §6)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import socket
from pathlib import Path

from edge.formats import FORMATS


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def engines() -> dict:
    """suffix -> version of each engine installed here (found without importing it)."""
    out = {}
    for suffix, (module, dist) in ((f.suffix, f.engine_package) for f in FORMATS.values()):
        if importlib.util.find_spec(module) is not None:
            try:
                out[suffix] = f"{dist} {importlib.metadata.version(dist)}"
            except importlib.metadata.PackageNotFoundError:
                out[suffix] = f"{dist} (version unknown)"
    return out


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


# arm64 Linux: bits of AT_HWCAP / AT_HWCAP2 (arch/arm64/include/uapi/asm/hwcap.h) and the names the kernel
# gives them in /proc/cpuinfo's Features; those the int8/fp16 kernels of the engines dispatch on
ARM_HWCAP = {1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve", 23: "asimdfhm"}
ARM_HWCAP2 = {1: "sve2", 13: "i8mm", 14: "bf16", 23: "sme"}
AT_HWCAP, AT_HWCAP2 = 16, 26


def arm_features() -> list[str] | None:
    """The ARM features the kernel reports to this process (getauxval; also under qemu-user, whose
    /proc/cpuinfo is the host's), or None off arm64 Linux."""
    if platform.machine() not in ("aarch64", "arm64") or platform.system() != "Linux":
        return None
    import ctypes

    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    words = ((getauxval(AT_HWCAP), ARM_HWCAP), (getauxval(AT_HWCAP2), ARM_HWCAP2))
    return sorted(name for word, names in words for bit, name in names.items() if word >> bit & 1)


def describe(name: str | None = None) -> dict:
    """The static part of the device block every measurement carries."""
    from runtime.bench import cpu_info

    info = cpu_info()
    block = {"name": name or socket.gethostname(), "cpu_model": info["model"], "isa": info["isa"],
             "cores": info["cores"], "cpus": cpus(), "machine": platform.machine(),
             "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
             "engines": engines()}
    arm = arm_features()
    if arm is not None:
        block["isa"] = arm
        if "Features" not in (_read(Path("/proc/cpuinfo")) or ""):  # qemu-user shows the host's cpuinfo
            block["cpu_model"] = f"aarch64, emulated? (/proc/cpuinfo describes another CPU: {info['model']})"
    return block


def conditions(measured: list[int] | None = None) -> dict:
    """Governor and frequency of the CPUs measurements run on (default: this process's), and every thermal
    zone's temperature; empty where the kernel does not expose them (containers, most phones without root)."""
    out: dict = {}
    cpufreq = {c: Path(f"/sys/devices/system/cpu/cpu{c}/cpufreq") for c in (measured or cpus())}
    governors = {c: _read(p / "scaling_governor") for c, p in cpufreq.items()}
    if any(governors.values()):
        out["governor"] = {str(c): g for c, g in governors.items() if g}
    freqs = {c: _read(p / "scaling_cur_freq") for c, p in cpufreq.items()}
    if any(freqs.values()):
        out["freq_mhz"] = {str(c): int(f) / 1000 for c, f in freqs.items() if f and f.isdigit()}
    temps = temperatures()
    if temps:
        out["temp_c"] = temps
    return out


def temperatures() -> dict:
    temps = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        t = _read(zone / "temp")
        if t and t.lstrip("-").isdigit():
            temps[f"{zone.name}:{_read(zone / 'type') or '?'}"] = int(t) / 1000
    return temps
