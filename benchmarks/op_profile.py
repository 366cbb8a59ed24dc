"""Where lop-jax's compiled train step spends its time on the CPU, operation by operation.

    python -m benchmarks.op_profile [--config configs/scaled/base_deep_learning_system.json]
        [--set KEY=VALUE] [--steps 20] [--cpus 2] [--top 25] [--json OUT]

The step is the one the loop of steps dispatches (``lop_jax.train.make_step_of_runs``, one run, the
first task, random images of the config's sizes). It is compiled and run untimed, then ``--steps``
steps are traced with ``jax.profiler``. XLA's CPU runtime records one event per executed operation
(a convolution, a fusion, a copy, ...), named after its HLO instruction; the events are summed by
kind (the name without its ``.N`` suffix) and by coarse category. The share of each is of the summed
operation time; ``busy_over_wall`` compares that sum with the traced wall time: below 1 the
runtime spends the rest between operations (dispatch, waiting), above 1 operations ran in
parallel on several threads.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks import timing

DEFAULT_CONFIG = "configs/scaled/base_deep_learning_system.json"
_HLO_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")
# the first matching pattern of an operation kind names its category
CATEGORIES = (
    ("convolution", re.compile(r"convolution|conv_general")),
    ("library fusion (ynn_, xnn_)", re.compile(r"^ynn|^xnn")),
    ("matrix product", re.compile(r"^dot|gemm|matmul")),
    ("reduction", re.compile(r"reduce")),
    ("copy, slice or transpose", re.compile(r"^copy|transpose|concatenate|slice|pad|reverse|^stack")),
    ("scatter or gather", re.compile(r"scatter|gather|dynamic")),
    ("random numbers", re.compile(r"rng|threefry|random")),
    ("control flow", re.compile(r"^while|^conditional|^call")),
    ("element-wise fusion", re.compile(r"fusion|broadcast")),
)


def kind_of(name: str) -> str:
    """An HLO instruction's kind: its name without the ``.N`` suffix XLA numbers copies with."""
    return name.rsplit(".", 1)[0] if re.search(r"\.\d+$", name) else name


def category_of(kind: str) -> str:
    """The coarse category of an operation kind (``other`` when no pattern matches)."""
    for category, pattern in CATEGORIES:
        if pattern.search(kind):
            return category
    return "other"


def operation_events(events: Iterable[dict[str, Any]]) -> list[tuple[str, float]]:
    """(HLO instruction name, duration in µs) of the complete events that are operations, not the
    runtime's own (those have spaces, ``::`` or a ``$`` in their names)."""
    out = []
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and _HLO_NAME.match(name):
            out.append((name, float(e.get("dur", 0.0))))
    return out


def aggregate(ops: list[tuple[str, float]], steps: int, wall_seconds: float, top: int) -> dict[str, Any]:
    """Per-step time and share of the summed operation time, by kind (the ``top`` largest) and by
    category; ``busy_over_wall`` is the summed operation time over the wall time."""
    if steps < 1 or not ops:
        raise ValueError(f"nothing to aggregate: {len(ops)} operation events over {steps} steps")
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, dur in ops:
        entry = by_kind[kind_of(name)]
        entry[0] += dur
        entry[1] += 1
    total = sum(d for d, _ in by_kind.values())
    by_category: dict[str, float] = defaultdict(float)
    for kind, (dur, _) in by_kind.items():
        by_category[category_of(kind)] += dur
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1][0])

    def row(dur: float) -> dict[str, float]:
        return {"ms_per_step": dur / 1e3 / steps, "share": dur / total}

    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall_seconds / steps,
        "operation_ms_per_step": total / 1e3 / steps,
        "busy_over_wall": (total / 1e6) / wall_seconds,
        "operations_per_step": len(ops) / steps,
        "distinct_instructions": len({n for n, _ in ops}),
        "by_category": {c: row(d) for c, d in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "by_kind": [{"kind": k, "count_per_step": n / steps, "category": category_of(k), **row(d)}
                    for k, (d, n) in kinds[:top]],
    }


def _read_trace(folder: Path) -> list[dict[str, Any]]:
    found = sorted(folder.rglob("perfetto_trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {folder}")
    data = json.loads(gzip.open(found[-1]).read())
    return data["traceEvents"] if isinstance(data, dict) else data


def profile_step(cfg: Any, steps: int, top: int, trace_dir: Path) -> dict[str, Any]:
    """Compile the step, run it once untimed, trace ``steps`` steps and aggregate the operations."""
    import jax

    from benchmarks.step import first_task_step
    from experiments.benchmark import synthetic_data

    step, state, images, epoch, lr, batches, numbers = first_task_step(cfg, synthetic_data(cfg))

    def run(st: Any, count: int) -> Any:
        for k in range(count):
            i = k % len(batches)
            st, loss, _, _ = step(st, images, batches[i], epoch, numbers[i], lr)
        jax.block_until_ready((st, loss))
        return st

    state = run(state, 2)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        t0 = time.perf_counter()
        state = run(state, steps)
        wall = time.perf_counter() - t0
    return aggregate(operation_events(_read_trace(trace_dir)), steps, wall, top)


def format_profile(out: dict[str, Any]) -> str:
    """The profile as text: the totals, then the categories and the kinds with their shares."""
    lines = [f"{out['wall_ms_per_step']:.1f} ms per step (wall), {out['operation_ms_per_step']:.1f} ms in "
             f"{out['operations_per_step']:.0f} operations (busy / wall = {out['busy_over_wall']:.2f})", "by category:"]
    lines += [f"  {c:<28} {r['ms_per_step']:8.2f} ms  {100 * r['share']:5.1f} %" for c, r in out["by_category"].items()]
    lines.append("by kind (largest first):")
    lines += [f"  {r['kind']:<40} {r['count_per_step']:5.0f}x {r['ms_per_step']:8.2f} ms  {100 * r['share']:5.1f} %"
              for r in out["by_kind"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, pin, profile, print and write the JSON."""
    import tempfile

    p = argparse.ArgumentParser(prog="python -m benchmarks.op_profile", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--steps", type=int, default=20, help="steps traced (default 20)")
    p.add_argument("--cpus", type=int, default=2, help="pin to this many CPUs")
    p.add_argument("--top", type=int, default=25, help="operation kinds listed (default 25)")
    p.add_argument("--json", help="write the profile to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        p.error("--steps and --top must be at least 1")
    cpus = timing.pin_cpus(args.cpus)
    from lop_jax.config import load_config, parse_override
    from lop_jax.cpu_kernels import prepare_process

    cfg = load_config(args.config, dict(parse_override(s) for s in args.set))
    prepare_process(cfg)
    with tempfile.TemporaryDirectory() as trace_dir:
        profile = profile_step(cfg, args.steps, args.top, Path(trace_dir))
    out = {"benchmark": "operation profile of the train step", "device": timing.device_description(),
           "pinned_cpus": cpus, "config": args.config, "overrides": args.set,
           "network_width": cfg.network_width, "train_batch_size": cfg.train_batch_size, **profile}
    print(f"train step, width {cfg.network_width}, batch {cfg.train_batch_size}, on {out['device']['cpu']} "
          f"({len(cpus)} CPUs):")
    print(format_profile(out))
    timing.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
