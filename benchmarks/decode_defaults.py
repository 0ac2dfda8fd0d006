"""A short decode check of the GGUF and ONNX 4-bit defaults against the same engine's peer defaults (issue 27):
tg64 after a 16-token prompt, interleaved A B A B in one process (runtime.bench.bench_interleaved), on the
lfm2-350m-shaped artifacts benchmarks/bench_fidelity.py leaves in benchmarks/work/artifacts/lfm2-350m
(random weights, max_seq_len 96: depth ~0 only). For a loaded machine where benchmarks.compare's harness
search (hours) cannot run; ratios within one run only.

    PYTHONPATH=$PWD python -m benchmarks.decode_defaults [-t 1] [-r 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from benchmarks import peers
from runtime import load
from runtime.bench import bench_interleaved

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "benchmarks" / "work" / "artifacts" / "lfm2-350m"
MODEL = ROOT / "benchmarks" / "work" / "fidelity-lfm2-350m"
MAX_SEQ_LEN = 96  # bench_fidelity.MAX_SEQ_LEN
GGUF_PEER, ONNX_PEER = "peer llama.cpp C API q4_0", "peer genai builder int4"


def openers(threads: int) -> list:
    a = ARTIFACTS  # GGUF at the f16 cache the C API peer uses (the fidelity artifacts store q8_0 as default)
    return [
        ("ours gguf iq4_xs", lambda: load(a / "gguf-iq4_xs-quant_methodplain.gguf", n_threads=threads,
                                                  kv_cache="f16")),
        ("ours gguf q4_0 imatrix", lambda: load(a / "gguf-q4_0-quant_methodimatrix.gguf", n_threads=threads,
                                                        kv_cache="f16")),
        (GGUF_PEER, lambda: peers.RawLlamaSession(a / "gguf-llama.cpp-q4_0.gguf", threads, MAX_SEQ_LEN)),
        ("peer llama.cpp C API iq4_xs", lambda: peers.RawLlamaSession(a / "gguf-iq4_xs-quant_methodplain.gguf",
                                                                      threads, MAX_SEQ_LEN)),
        ("ours onnx int4 block 64", lambda: load(a / "onnx-int4-quant_methodrtn-group_size64.onnx", n_threads=threads)),
        ("ours onnx int4 block 32", lambda: load(a / "onnx-int4-quant_methodrtn.onnx", n_threads=threads)),
        # genai at its best harness (benchmarks/compare.py): its own loop over one shared K/V buffer
        (ONNX_PEER, lambda: peers.GenaiSession(a / "onnx-genai-builder-int4", MODEL, threads, MAX_SEQ_LEN,
                                               loop="generate", share_buffer=True)),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the records and ratios here")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    records = bench_interleaved(openers(args.threads), n_prompt=16, n_gen=64, repetitions=args.repetitions,
                                progress=False)
    tg = {r["label"]: r["samples_ts"] for r in records if r["test"].startswith("tg")}
    ratios = {}
    for label, samples in tg.items():
        peer = GGUF_PEER if "gguf" in label or "llama.cpp" in label else ONNX_PEER
        per_rep = [x / y for x, y in zip(samples, tg[peer])]  # same repetition: the same machine state
        ratios[f"{label} / {peer}"] = round(statistics.median(per_rep), 3)
        print(f"{label:30} tg64 median {statistics.median(samples):6.2f} t/s  / {peer}: {statistics.median(per_rep):.3f}x")
    print(f"load average before {load_before}, after {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(dict(threads=args.threads, load_before=load_before, load_after=os.getloadavg(),
                                             ratios=ratios, records=records), indent=1, default=str))


if __name__ == "__main__":
    main()
