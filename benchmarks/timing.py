"""What the side-by-side runners share: the alternation order, the timing loop, the ratio of
medians and the description of the machine. Nothing here imports JAX or PyTorch, so that the
logic is tested without either and without timing anything (``tests/test_bench.py``).

Why alternate: on a shared machine the load changes over minutes; timing the two sides in turns,
the first one swapped every round, lets a change of load hit both alike, and the ratio of their
medians is what stays comparable.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def alternation(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of each round: the names rotated by one more place every round, so that each
    name goes first in turn (two names: A B, B A, A B, ...)."""
    if rounds < 1 or not names:
        raise ValueError(f"expected names and rounds >= 1, got {list(names)} and {rounds}")
    names = list(names)
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]


def alternate(runners: dict[str, Callable[[], Any]], rounds: int,
              clock: Callable[[], float] = time.perf_counter,
              measure: Callable[[str, Any], dict[str, float]] | None = None) -> dict[str, list[dict[str, float]]]:
    """Call each runner once per round in ``alternation`` order; per call, ``{"wall": seconds}``
    from ``clock`` around it, plus whatever ``measure(name, returned value)`` adds (e.g. the CPU
    time a child process reports). Returns every call's figures by name, in call order."""
    out: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for order in alternation(list(runners), rounds):
        for name in order:
            t0 = clock()
            value = runners[name]()
            figures = {"wall": clock() - t0}
            if measure is not None:
                figures.update(measure(name, value))
            out[name].append(figures)
    return out


def medians(times: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per name and per figure (wall, cpu, ...), the median over the calls."""
    return {name: {key: statistics.median(call[key] for call in calls) for key in calls[0]}
            for name, calls in times.items() if calls}


def ratio_of_medians(times: dict[str, list[dict[str, float]]], numerator: str, denominator: str,
                     key: str = "wall") -> float:
    """median(numerator's ``key``) / median(denominator's ``key``): below 1 the numerator is faster."""
    med = medians(times)
    return med[numerator][key] / med[denominator][key]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description() -> dict[str, Any]:
    """The machine a measurement ran on: CPU model, cores usable, load averages at the time, and the
    process's ``XLA_FLAGS`` (process-wide XLA options change what the CPU runs)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpu": cpu_model(), "machine": platform.machine(), "system": platform.system(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_1_5_15_min": load, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def pin_cpus(count: int) -> list[int]:
    """Restrict this process (and the threads and children it starts later) to its first ``count``
    usable CPUs, so that XLA's thread pool, sized from the CPUs it may use, and PyTorch's threads see
    the same cores; returns them. A no-op where the platform cannot pin."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    cpus = sorted(os.sched_getaffinity(0))[:count]
    if len(cpus) < count:
        raise ValueError(f"asked for {count} CPUs, this process may use {len(cpus)}")
    os.sched_setaffinity(0, cpus)
    return cpus


def summary(times: dict[str, list[dict[str, float]]], numerator: str, denominator: str) -> dict[str, Any]:
    """The figures a runner writes: every call's, the medians, and the ratio of medians of each
    figure the calls have (wall, and cpu where measured)."""
    med = medians(times)
    keys = list(next(iter(times.values()))[0])
    return {"calls": times, "medians": med,
            "ratios": {f"{key}_{numerator}_over_{denominator}": med[numerator][key] / med[denominator][key]
                       for key in keys}}


def write_json(path: str | Path | None, out: dict[str, Any]) -> None:
    """Write a benchmark's figures to ``path`` (nothing when None), creating its folder."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
