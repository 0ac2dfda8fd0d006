"""Can a synthetic copy curriculum make in-context copying emerge within proxy_validation's CPU budget?
(issue 25: the ground truth's recall column stayed at zero for all 16 architectures.)

    PYTHONPATH=$PWD python -m benchmarks.recall_pilot ARCH --mode periodic --fraction 0.5 --span 32 --steps 600 --lr 1e-2
    PYTHONPATH=$PWD python -m benchmarks.recall_pilot ARCH --mode copies --fraction 0.5 --copies 12 --steps 600

Trains one architecture of benchmarks.proxy_validation (its text windows, optimizer and seed 0) with a
fraction of each batch's rows replaced by random-token rows that only in-context copying can predict:
  periodic  one random span of --span tokens repeated to fill the row (a fixed offset: RoPE alone can learn it)
  copies    random tokens with --copies spans of 32 copied forward to random places (content-addressed, as the
            held-out copy test is)
then scores it as the ground truth is (loss@512/1024, first_loss, copy_loss, recall on real held-out text).
One thread, deterministic; one JSON line per run is appended to benchmarks/results/proxy_validation/recall_pilots.jsonl.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks import proxy_validation as pv


def curriculum_batches(steps: int, mode: str, fraction: float, span: int, copies: int):
    inputs, labels = pv.training_batches(steps, 0)
    windows = np.concatenate([inputs, labels[:, -1:]], 1)
    rng, vocab, length = np.random.default_rng(7), pv.TRUTH["vocab"], windows.shape[1]
    for i in range(len(windows)):
        if i % pv.TRUTH["batch"] < round(fraction * pv.TRUTH["batch"]):  # the same rows of every batch
            if mode == "periodic":
                windows[i] = np.tile(rng.integers(8, vocab, span), -(-length // span))[:length]
            else:
                windows[i] = pv.with_copies(rng.integers(8, vocab, (1, length)), rng, copies)[0][0]
    return windows[:, :-1], windows[:, 1:]


def main(argv=None):
    import torch

    from edge.train import train_fresh

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arch", choices=sorted(pv.archs(pv.TRUTH["vocab"])))
    p.add_argument("--mode", choices=("periodic", "copies"), default="copies")
    p.add_argument("--fraction", type=float, default=0.5, help="share of each batch's rows made synthetic")
    p.add_argument("--span", type=int, default=32, help="periodic: the repeated span's length")
    p.add_argument("--copies", type=int, default=12, help="copies: spans of 32 copied per row")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    inputs, labels = curriculum_batches(args.steps, args.mode, args.fraction, args.span, args.copies)
    started = time.perf_counter()
    model, final = train_fresh(pv.archs(pv.TRUTH["vocab"])[args.arch].to_config(), inputs, labels, args.steps,
                               pv.TRUTH["batch"], args.lr, 0, 1)
    row = {**vars(args), **pv.score_truth(model, pv.eval_sets()), "final_train_loss": round(final, 4),
           "train_s": round(time.perf_counter() - started)}
    print(json.dumps(row), flush=True)
    pv.RECORDS.mkdir(parents=True, exist_ok=True)
    with open(pv.RECORDS / "recall_pilots.jsonl", "a") as f:  # one line per finished run: nothing half-written
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
