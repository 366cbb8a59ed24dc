"""Measure what saving a checkpoint every epoch costs, against saving at task boundaries only.

    python scripts/checkpoint_cost.py [--config configs/quick.json] [--epochs 16] [--pairs 2]
        [--set key=value ...]

Runs one task of ``--epochs`` epochs per variant, the variants interleaved in pairs in one
process (so that machine load hits both alike), and prints the mean wall time per epoch of each
the cost per epoch. Compilation is paid once per run in both variants and cancels in the difference.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from lop_jax.config import load_config, parse_override
from lop_jax.data import load_data
from lop_jax.experiment import run_experiments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quick.json")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    overrides = dict(parse_override(s) for s in args.set)
    overrides.update(num_tasks=1, epochs_per_task=args.epochs)
    walls: dict[int, list[float]] = {1: [], 0: []}
    epoch_seconds: list[float] = []
    data = None
    for _ in range(args.pairs):
        for every in (1, 0):
            with tempfile.TemporaryDirectory() as root:
                cfg = load_config(args.config, {**overrides, "results_dir": root, "checkpoint_every_epochs": every})
                data = data or load_data(cfg)
                t0 = time.perf_counter()
                (run,) = run_experiments(cfg, [0], data=data, progress=False, log=lambda m: None)
                walls[every].append(time.perf_counter() - t0)
                a = run.arrays
                epoch_seconds.append(float(np.mean(a["epoch_runtime"] + a["test_evaluation_runtime"]
                                                   + a["validation_evaluation_runtime"])))
    every, bounds = np.mean(walls[1]), np.mean(walls[0])
    print(f"runs of {args.epochs} epochs, {args.pairs} interleaved pairs: every epoch {every:.1f} s, "
          f"task boundaries only {bounds:.1f} s")
    per_epoch = float(np.mean(epoch_seconds))
    cost = (every - bounds) / args.epochs
    print(f"an epoch (training and evaluation) takes {per_epoch:.2f} s; saving every epoch costs "
          f"{cost:.3f} s per epoch ({cost / per_epoch * 100:+.1f} %)")


if __name__ == "__main__":
    main()
