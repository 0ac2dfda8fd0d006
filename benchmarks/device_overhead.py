"""Per-candidate overhead of measuring through a device agent against the local child process.

One candidate of the tiny space (the first LFM2 layout) is exported once, then timed with the search's
settings (prefill 64, decode at 64) through both transports, alternating: the local child process, and
an agent on loopback (first call: hash + upload + header check; later calls: cache hits). Prints the
wall time of each `measure_candidate` call and the medians: the cost of the transport around a
measurement, which runtime.bench (timing the engine inside each call) does not see. Usage:
    python -m benchmarks.device_overhead [ROUNDS]
"""
from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import optuna

from arch_search.budgets import measure_settings_for, parse_budget
from arch_search.candidates import RandomBackbones
from arch_search.measure import measure
from device.client import DeviceTransport
from device.transport import LocalTransport
from edge.tokenizer import default_corpus, train_tokenizer


def main(rounds: int = 3) -> None:
    work = Path(tempfile.mkdtemp(prefix="device-overhead-"))
    tok = work / "tokenizer.json"
    train_tokenizer(default_corpus(), 1024).save(str(tok))
    settings = measure_settings_for([parse_budget("prefill_ms@64=1e5"), parse_budget("decode_ms@64=1e3")],
                                    target="gguf", threads=1)
    source = RandomBackbones("tiny", tok, 1024)
    candidate = source.suggest(optuna.trial.FixedTrial(source.seeds()[0]))
    checkpoint = source.write_checkpoint(candidate, work / "cand" / "checkpoint")
    measure(checkpoint, settings, work / "cand", keep=True)  # the export (and a first local measurement)
    artifact = work / "cand" / "model.gguf"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = subprocess.Popen([sys.executable, "-m", "edge.cli", "device", "serve", "--no-token", "--port", str(port),
                              "--cache", str(work / "cache")], cwd=work, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(url + "/info")
            break
        except httpx.TransportError:
            time.sleep(0.2)
    local, remote = LocalTransport(), DeviceTransport(url, None)
    times = {"local": [], "device": []}
    try:
        for i in range(rounds + 1):
            for name, t in (("local", local), ("device", remote)):
                started = time.perf_counter()
                t.measure_candidate(artifact, settings)
                times[name].append(time.perf_counter() - started)
            print(f"round {i}: local {times['local'][-1]:.2f} s, device {times['device'][-1]:.2f} s"
                  + (" (upload)" if i == 0 else " (cache hit)"), flush=True)
    finally:
        agent.terminate()
        agent.wait()
    print(f"artifact {artifact.stat().st_size / 2**20:.2f} MiB; first device call (hash + upload + header check) "
          f"{times['device'][0] - times['local'][0]:+.2f} s vs local; cache hits: median local "
          f"{statistics.median(times['local'][1:]):.2f} s, device {statistics.median(times['device'][1:]):.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
