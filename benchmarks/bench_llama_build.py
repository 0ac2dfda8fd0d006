"""A/B of two llama.cpp builds (e.g. before and after a change of install.py's flags) on one GGUF.

    python -m benchmarks.bench_llama_build OLD_DIR NEW_DIR model.gguf [-p 256] [-n 32] [-r 3] [--rounds 4]

OLD_DIR and NEW_DIR each hold a `llama_cpp` package (copy `site-packages/llama_cpp` of a venv there).
Two builds cannot share one process, so `edge bench` runs in a child per build, alternating A B B A ...
round by round so that a machine whose speed drifts slows both alike; every child uses the same timer
(`runtime.bench`). Prints the median t/s of each build over all samples and NEW / OLD, and writes
benchmarks/results/llama_build.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import EDGE, RESULTS, ROOT

RESULTS = RESULTS / "llama_build.json"


def bench(build_dir: Path, gguf: Path, args) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, PYTHONPATH=f"{build_dir}{os.pathsep}{ROOT}")
        subprocess.run([*EDGE, "bench", str(gguf), "-p", str(args.n_prompt), "-n",
                        str(args.n_gen), "-r", str(args.repetitions), "-t", str(args.threads), "--json", out.name],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("gguf", type=Path)
    p.add_argument("-p", "--n-prompt", type=int, default=256)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4, help="A/B rounds, order flipped every round (default 4)")
    args = p.parse_args()

    samples = {"old": {}, "new": {}}
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            for record in bench(getattr(args, name), args.gguf, args):
                samples[name].setdefault(record["test"], []).extend(record["samples_ts"])
            print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)
    rows = []
    for test in samples["old"]:
        old, new = statistics.median(samples["old"][test]), statistics.median(samples["new"][test])
        rows.append(dict(test=test, old_median_ts=round(old, 2), new_median_ts=round(new, 2),
                         new_over_old=round(new / old, 3), old_samples_ts=samples["old"][test],
                         new_samples_ts=samples["new"][test]))
        print(f"{test:>8}: old {old:8.2f} t/s   new {new:8.2f} t/s   new/old {new / old:.3f}")
    RESULTS.write_text(json.dumps(dict(model=str(args.gguf), threads=args.threads, rounds=args.rounds,
                                       load_average=os.getloadavg(), tests=rows), indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
