"""Measure what saving a checkpoint every epoch costs, against saving at task boundaries only.

    python scripts/checkpoint_cost.py [--config configs/quick.json] [--epochs 16] [--pairs 2]
        [--set key=value ...]

Runs one task of ``--epochs`` epochs per variant, the variants interleaved in pairs in one
process (so that machine load hits both alike), and prints the cost per epoch of saving every
epoch, in wall time and in CPU time (all threads of the process; the CPU figure is the one to
trust on a loaded machine, where other processes stretch the wall time). Compilation is paid once
per run in both variants and cancels in the difference.
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
    cpus: dict[int, list[float]] = {1: [], 0: []}
    epoch_seconds: list[float] = []
    data = None
    # a first, untimed run pays the process's one-off costs (jit caches of module-level functions,
    # Orbax's first use); the pairs then alternate their order so that drift hits both alike
    order = [(1, False)] + [(every, True) for pair in range(args.pairs)
                            for every in ((1, 0) if pair % 2 == 0 else (0, 1))]
    for every, timed in order:
        with tempfile.TemporaryDirectory() as root:
            cfg = load_config(args.config, {**overrides, "results_dir": root, "checkpoint_every_epochs": every})
            data = data or load_data(cfg)
            t0, c0 = time.perf_counter(), time.process_time()
            (run,) = run_experiments(cfg, [0], data=data, progress=False, log=lambda m: None)
        if not timed:
            continue
        walls[every].append(time.perf_counter() - t0)
        cpus[every].append(time.process_time() - c0)
        a = run.arrays
        epoch_seconds.append(float(np.mean(a["epoch_runtime"] + a["test_evaluation_runtime"]
                                           + a["validation_evaluation_runtime"])))
    every, bounds = np.mean(walls[1]), np.mean(walls[0])
    print(f"runs of {args.epochs} epochs, {args.pairs} interleaved pairs: every epoch {every:.1f} s, "
          f"task boundaries only {bounds:.1f} s")
    per_epoch = float(np.mean(epoch_seconds))
    cost = (every - bounds) / args.epochs
    print(f"an epoch (training and evaluation) takes {per_epoch:.2f} s; saving every epoch costs "
          f"{cost:.3f} s of wall time per epoch ({cost / per_epoch * 100:+.1f} %)")
    cpu_every, cpu_bounds = np.mean(cpus[1]), np.mean(cpus[0])
    cpu_cost = (cpu_every - cpu_bounds) / args.epochs
    print(f"CPU time (all threads): every epoch {cpu_every:.1f} s, task boundaries only {cpu_bounds:.1f} s; "
          f"saving costs {cpu_cost:.3f} CPU-s per epoch ({cpu_cost / (cpu_bounds / args.epochs) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
