"""One step in a child process, and the work folder parent and child share (docs/design.md §6, §10).

Both sides of a measurement run their risky steps through `run_child`: the search (export, candidate
timing), the device agent (header checks of uploads, `edge bench --device` measurements). A crash, an
engine abort or a hang then costs one child, reported in one line (`MeasureFailed`), never the parent.

    run_child("arch_search.measure", ["bench", str(workdir)], timeout_s, "bench")   # parent
    sys.exit(child_main(lambda: work(...)))                                          # child's __main__

The work folder: the parent writes SETTINGS (or REQUEST), the child writes RESULT (or RECORDS)
beside the artifact, `model_name(suffix)`. These names are the contract; nothing else is shared.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge.errors import first_line

PARENT_ENV = "EDGE_SEARCH_PARENT_PID"
CPUS_ENV, MEMORY_ENV = "EDGE_CHILD_CPUS", "EDGE_CHILD_MEMORY"  # limits child_main applies to itself
REASON = "edge-child-failed: "  # the line a child prints its own reason on (child_main)
ROOT = Path(__file__).resolve().parents[1]  # the project the child must import, wherever it runs
POLL_S = 0.2  # how often a waiting parent looks at `cancel`

# ---- the work folder --------------------------------------------------------------------------------
SETTINGS = "settings.json"  # the measurement protocol (MeasureSettings.to_dict())
RESULT = "result.json"      # the candidate's figures, written by the timing child
REQUEST = "request.json"    # `edge bench --device`: {"files": [names], "options": {...}}
RECORDS = "records.json"    # ... and the records its child writes


def model_name(suffix: str, index: int | None = None) -> str:
    """The artifact's name in a work folder: model.gguf (a candidate), model0.gguf (a bench's first file)."""
    return f"model{'' if index is None else index}{suffix}"


class MeasureFailed(Exception):
    """A step in a child could not finish (export error, engine crash, timeout); the message says why."""


# ---- parent side ------------------------------------------------------------------------------------
def run_child(module: str, args: list[str], timeout_s: float, step: str, *, cwd: Path | None = None,
              cancel=None, cpus: set[int] | None = None, memory_bytes: int | None = None) -> None:
    """Run `python -m MODULE ARGS` in its own process group; kill the group on timeout, or as soon as
    `cancel` (a threading.Event) is set. Raises MeasureFailed naming `step` and the child's telling line.

    cwd: the child's working directory (the agent gives paths relative to it, so no message a child
    writes names a host path); cpus: the CPUs it may run on; memory_bytes: its address-space limit."""
    # -P: the working directory is never on the child's import path, the project's root always is
    cmd = [sys.executable, "-P", "-m", module, *args]
    env = {**os.environ, PARENT_ENV: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if cpus:
        env[CPUS_ENV] = ",".join(map(str, sorted(cpus)))
    if memory_bytes:
        env[MEMORY_ENV] = str(int(memory_bytes))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env, cwd=cwd)
    end = time.monotonic() + timeout_s
    step_s = POLL_S if cancel is not None else timeout_s
    try:
        while True:
            try:
                out, _ = proc.communicate(timeout=max(0.0, min(step_s, end - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= end:
                    _kill_group(proc)
                    raise MeasureFailed(f"{step} timed out after {timeout_s:.0f} s") from None
                if cancel is not None and cancel.is_set():
                    _kill_group(proc)
                    raise MeasureFailed(f"{step} cancelled") from None
    except BaseException:  # KeyboardInterrupt included: never leave a child behind
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
        own = [ln.removeprefix(REASON) for ln in lines if ln.startswith(REASON)]  # child_main's reason
        # an engine abort prints a backtrace after its message: prefer the line that says what failed
        telling = [ln for ln in lines if "GGML_ASSERT" in ln or "Error" in ln or "error:" in ln]
        last = (own or telling or lines or [""])[-1]
        if proc.returncode < 0:
            reason = f"killed by signal {signal.Signals(-proc.returncode).name}" + (f" ({last[:240]})" if last else "")
        else:
            reason = last[:300] if last else f"exit status {proc.returncode}"
        raise MeasureFailed(f"{step} failed: {reason}")


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---- child side -------------------------------------------------------------------------------------
def die_with_parent() -> None:
    """In the child, Linux: SIGKILL when the parent dies, so a killed search or agent leaves no orphan
    measuring on. Set here rather than in a preexec_fn, which is unsafe in the threaded parent; the
    parent's pid in the environment closes the window where it died before this call."""
    parent = os.environ.get(PARENT_ENV)
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != int(parent):
        sys.exit("the process that started this child is gone")


def _apply_limits() -> None:
    """The CPUs and the address space run_child asked for (set by the child itself: a preexec_fn in
    the threaded parent is unsafe). A MemoryError then fails this child, never the parent."""
    if os.environ.get(CPUS_ENV) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS_ENV].split(",")})
    if os.environ.get(MEMORY_ENV):
        import resource

        limit = int(os.environ[MEMORY_ENV])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def child_main(work) -> int:
    """The body of a child's main: die with the parent, run `work()`, and on failure print the one line
    the parent quotes (exit status 1): an EdgeError's message as it is, another exception with its type."""
    from edge.errors import EdgeError

    die_with_parent()
    try:
        _apply_limits()
        work()
    except Exception as e:  # noqa: BLE001 - the parent quotes the reason
        reason = first_line(e) if isinstance(e, EdgeError) else f"{type(e).__name__}: {first_line(e)}"
        print(REASON + reason, file=sys.stderr, flush=True)
        return 1
    return 0
