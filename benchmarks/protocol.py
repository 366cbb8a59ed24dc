"""The whole protocol end to end, lop-jax against the PyTorch twin, as whole processes, alternating.

    python -m benchmarks.protocol --config configs/bench/three_tasks.json --data-dir D \
        [--repeats 3] [--cpus 2] [--compilation-cache cold|warm|off] [--json OUT]

Each call is one process from its start to its results written: ``python -m experiments.run``
against ``python -m benchmarks.torch_twin``, on the same config, data and CPUs (both children are
pinned to the first ``--cpus`` CPUs; the twin runs ``--cpus`` threads). Every call writes into a
fresh results folder, removed afterwards. The side that goes first is swapped every repeat; the
figures are the medians of the wall time and of the CPU time (user + system, all threads, from the
child's resource usage), and their ratios. The final test accuracies of both sides are recorded
too, as a check that both learned the same protocol (they draw different random numbers).

``--compilation-cache`` says what lop-jax's persistent compilation cache holds when a call starts:
``cold`` an empty cache folder per call (every program compiled), ``warm`` one folder shared by
the calls and filled by an untimed run first (the usual case once a config has run on a machine),
``off`` no cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import timing

CACHE_MODES = ("cold", "warm", "off")
CACHE_ENV = "LOP_JAX_COMPILATION_CACHE"  # read by experiments.run: a folder, or "off"


def commands(config: str, data_dir: str, results_dir: str, cpus: int) -> dict[str, list[str]]:
    """The two sides' command lines, writing under ``results_dir/<side>``."""
    py = sys.executable
    return {"lop_jax": [py, "-m", "experiments.run", "--config", config, "--data-dir", data_dir,
                        "--results-dir", str(Path(results_dir) / "lop_jax")],
            "torch": [py, "-m", "benchmarks.torch_twin", "--config", config, "--data-dir", data_dir,
                      "--results-dir", str(Path(results_dir) / "torch"), "--threads", str(cpus)]}


def run_process(argv: Sequence[str], env: dict[str, str], cpus: list[int]) -> dict[str, Any]:
    """Run one child to its end; its exit code, CPU seconds (user + system of all its threads) and
    the tail of its output. The child is pinned to ``cpus`` before it starts."""
    def pin() -> None:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)

    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        tail = out.read()[-2000:].decode(errors="replace")
    return {"exit_code": child.returncode, "cpu": usage.ru_utime + usage.ru_stime, "output_tail": tail}


def final_accuracies(experiment_dir: Path, epochs_per_task: int) -> list[float]:
    """The test accuracy at the last epoch of every task, from a finished run's array."""
    acc = np.load(experiment_dir / "test_accuracy_per_epoch" / "index-0.npy")
    return [round(float(a), 4) for a in acc[epochs_per_task - 1::epochs_per_task]]


RECORDED_TIMES = ("epoch_runtime", "test_evaluation_runtime", "validation_evaluation_runtime")


def recorded_seconds(experiment_dir: Path) -> dict[str, float]:
    """The run's own recorded training and evaluation seconds, summed over its epochs (each side
    times its epochs in-process, so the difference to the wall time is start-up, compilation
    outside the epochs, and writes)."""
    out = {}
    for name in RECORDED_TIMES:
        path = experiment_dir / name / "index-0.npy"
        if path.is_file():
            out[name] = round(float(np.sum(np.load(path))), 3)
    return out


def side_env(side: str, cache_mode: str, cache_dir: Path | None, base: dict[str, str]) -> dict[str, str]:
    """The child's environment: lop-jax's compilation cache as ``cache_mode`` says (a fresh folder
    under ``cache_dir`` for ``cold``, ``cache_dir`` itself for ``warm``)."""
    env = dict(base)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if side == "lop_jax":
        if cache_mode == "off":
            env[CACHE_ENV] = "off"
        else:
            assert cache_dir is not None
            env[CACHE_ENV] = str(tempfile.mkdtemp(dir=cache_dir) if cache_mode == "cold" else cache_dir)
    return env


def make_runners(config: str, data_dir: str, work: Path, cpus: list[int], cache_mode: str,
                 epochs_per_task: int, experiment_name: str,
                 run: Callable[[Sequence[str], dict[str, str], list[int]], dict[str, Any]] = run_process
                 ) -> tuple[dict[str, Callable[[], dict[str, Any]]], dict[str, list[list[float]]]]:
    """One callable per side that runs one whole process into a fresh folder under ``work`` and
    removes it, and the final accuracies they collect (per side, one list per call)."""
    cache_dir = work / "xla-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    accuracies: dict[str, list[list[float]]] = {"lop_jax": [], "torch": []}
    calls = {"n": 0}

    def runner(side: str) -> Callable[[], dict[str, Any]]:
        def call() -> dict[str, Any]:
            calls["n"] += 1
            results = work / f"call-{calls['n']}"
            argv = commands(config, data_dir, str(results), len(cpus))[side]
            got = run(argv, side_env(side, cache_mode, cache_dir, dict(os.environ)), cpus)
            if got["exit_code"] != 0:
                raise RuntimeError(f"{side} exited with {got['exit_code']}: {got['output_tail']}")
            accuracies[side].append(final_accuracies(results / side / experiment_name, epochs_per_task))
            got["recorded_seconds"] = recorded_seconds(results / side / experiment_name)
            shutil.rmtree(results, ignore_errors=True)
            return got

        return call

    return {side: runner(side) for side in ("lop_jax", "torch")}, accuracies


def measure(config: str, data_dir: str, repeats: int, cpus: list[int], cache_mode: str, work: Path,
            run: Callable[[Sequence[str], dict[str, str], list[int]], dict[str, Any]] = run_process,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time ``repeats`` alternating pairs of whole runs (after one untimed lop-jax run that fills a
    warm cache); the figures as a dict."""
    from lop_jax.config import load_config

    cfg = load_config(config)
    runners, accuracies = make_runners(config, data_dir, work, cpus, cache_mode, cfg.epochs_per_task,
                                       cfg.experiment_name, run)
    if cache_mode == "warm":
        runners["lop_jax"]()
        accuracies["lop_jax"].clear()
    recorded: dict[str, list[dict[str, float]]] = {"lop_jax": [], "torch": []}

    def figures(name: str, got: dict[str, Any]) -> dict[str, float]:
        recorded[name].append(got["recorded_seconds"])
        return {"cpu": got["cpu"]}

    times = timing.alternate(runners, repeats, clock=clock, measure=figures)
    out = timing.summary(times, "lop_jax", "torch")
    return {"benchmark": "protocol end to end", "config": config, "repeats": repeats, "compilation_cache": cache_mode,
            "order": timing.alternation(list(runners), repeats), "medians": out["medians"],
            "ratio_wall_lop_jax_over_torch": out["ratios"]["wall_lop_jax_over_torch"],
            "ratio_cpu_lop_jax_over_torch": out["ratios"]["cpu_lop_jax_over_torch"],
            "final_test_accuracy_per_task": accuracies, "recorded_seconds": recorded, "calls": out["calls"]}


def main(argv: list[str] | None = None) -> int:
    """Parse, measure, print and write the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench/three_tasks.json")
    p.add_argument("--data-dir", required=True, help="the folder holding cifar-100-python")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2, help="pin both sides to this many CPUs; the twin's threads")
    p.add_argument("--compilation-cache", choices=CACHE_MODES, default="cold")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))[:args.cpus] if hasattr(os, "sched_getaffinity") else []
    with tempfile.TemporaryDirectory(prefix="lop-jax-bench-") as work:
        out = {"device": timing.device_description(), "pinned_cpus": cpus,
               **measure(args.config, args.data_dir, args.repeats, cpus, args.compilation_cache, Path(work))}
    med = out["medians"]
    print(f"protocol {args.config} end to end on {out['device']['cpu']} ({len(cpus)} CPUs), medians of "
          f"{args.repeats} alternating runs, compilation cache {args.compilation_cache}: lop-jax "
          f"{med['lop_jax']['wall']:.1f} s wall / {med['lop_jax']['cpu']:.1f} s CPU, PyTorch "
          f"{med['torch']['wall']:.1f} s / {med['torch']['cpu']:.1f} s; lop-jax / PyTorch = "
          f"{out['ratio_wall_lop_jax_over_torch']:.3f} wall, {out['ratio_cpu_lop_jax_over_torch']:.3f} CPU")
    timing.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
