"""Where the wall time of one ``python -m experiments.run`` goes, stage by stage.

    python -m benchmarks.profile_run --config configs/bench/three_tasks.json --data-dir D [--json OUT]

Runs ``experiments.run``'s command in this process, with a timer around every stage of the run
loop (``lop_jax.experiment``) and of what happens before and after it, and JAX's compilation
events (tracing, lowering, XLA compilation) charged to the stage that triggered them. Stages do
not overlap: a stage nested in another (a snapshot write inside the end of a task) is counted
in its own row only. The rows add up to the wall time from process start to the end of the
command; ``interpreter`` is the time before this module's first line (read from /proc), and
``other`` what no row covers. The figures are of one run, so run it twice and read the order
of magnitude; the side-by-side ratio is ``benchmarks.protocol``'s job.
"""

from __future__ import annotations

import time

_T_FIRST_LINE = time.perf_counter()
_WALL_FIRST_LINE = time.time()

import argparse  # noqa: E402 - the first line's time is taken before any import
import os  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks import timing  # noqa: E402

COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "xla_compile"}


def process_age_seconds() -> float | None:
    """Seconds since this process started, from /proc (None where there is no /proc)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class Stages:
    """Exclusive wall time per stage (a nested stage pauses its parent) and the compilations each
    stage triggered, by program."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.compiles: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.programs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.beside: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [name, start of the current uninterrupted span]

    @contextmanager
    def stage(self, name: str):
        now = time.perf_counter()
        if self._stack:
            parent = self._stack[-1]
            self.seconds[parent[0]] += now - parent[1]
        self._stack.append([name, now])
        self.calls[name] += 1
        try:
            yield
        finally:
            now = time.perf_counter()
            top = self._stack.pop()
            self.seconds[top[0]] += now - top[1]
            if self._stack:
                self._stack[-1][1] = now

    def wrap(self, owner: Any, attribute: str, name: str, beside: bool = False) -> None:
        """Replace ``owner.attribute`` by a function timing each call as stage ``name``; ``beside``:
        the calls run on another thread, so they are timed apart and pause no stage."""
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if beside:
                t0 = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.beside[name] += time.perf_counter() - t0
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        """A JAX monitoring event: compilation phases are charged to the current stage."""
        kind = COMPILE_EVENTS.get(event)
        if kind is None:
            return
        where = self._stack[-1][0] if self._stack else "(no stage)"
        self.compiles[where][kind] += duration
        if kind == "xla_compile":
            self.programs[where][str(kwargs.get("fun_name", "?"))] += 1


def instrument(stages: Stages) -> None:
    """Time the run loop's stages and the writes inside them (imports lop-jax)."""
    from lop_jax import checkpoint, experiment, records, results, summary

    for attribute, name in (("load_data", "data loading"), ("init_state", "model init"),
                            ("class_order_for", "model init"), ("resume", "resume check"),
                            ("_prepare", "results folder"), ("_train", "train epochs"),
                            ("_evaluate", "evaluation"), ("_record", "record"),
                            ("_end_of_task", "end of task"), ("_checkpoint", "checkpoint stage"),
                            ("task_data", "task data")):
        stages.wrap(experiment, attribute, name)
    stages.wrap(experiment._Runs, "start", "checkpointers (Orbax managers)")
    stages.wrap(experiment._Loop, "start", "images to device, build functions")
    stages.wrap(experiment._Runs, "close", "close (wait for writes)")
    stages.wrap(results.ExperimentDir, "save_snapshot", "snapshot writes")
    stages.wrap(checkpoint.Checkpointer, "save", "checkpoint pack and copy")
    stages.wrap(checkpoint.Checkpointer, "_write", "checkpoint writes (writer thread)", beside=True)
    stages.wrap(checkpoint.Checkpointer, "wait", "waiting for checkpoint writes")
    stages.wrap(records.RunResults, "save", "results writes")
    stages.wrap(summary, "end_of_run_text", "end-of-run summary")


def profile(argv: list[str]) -> dict[str, Any]:
    """Run ``experiments.run`` with ``argv`` under the timers; the breakdown as a dict."""
    stages = Stages()
    with stages.stage("imports"):
        import jax

        from experiments import run
        from lop_jax import experiment, summary  # noqa: F401 - what run's main imports lazily
    jax.monitoring.register_event_duration_secs_listener(stages.on_event)
    instrument(stages)
    with stages.stage("command (config, rest)"):
        code = run.main(argv)
    end = time.perf_counter()
    age = process_age_seconds()
    interpreter = None if age is None else max(age - (time.time() - _WALL_FIRST_LINE), 0.0)
    total = (end - _T_FIRST_LINE) + (interpreter or 0.0)
    rows = {}
    for name, seconds in stages.seconds.items():
        compiled = sum(stages.compiles[name].values())
        rows[name] = {"seconds": round(seconds - compiled, 4), "calls": stages.calls[name]}
        if compiled:
            rows[f"compile in {name}"] = {"seconds": round(compiled, 4),
                                          "phases": {k: round(v, 4) for k, v in stages.compiles[name].items()},
                                          "programs": dict(stages.programs[name])}
    if interpreter is not None:
        rows["interpreter start"] = {"seconds": round(interpreter, 4), "calls": 1}
    covered = sum(r["seconds"] for r in rows.values())
    rows["other"] = {"seconds": round(total - covered, 4), "calls": 0}
    writer = stages.beside.get("checkpoint writes (writer thread)", 0.0)
    return {"exit_code": code, "total_seconds": round(total, 4), "rows": rows,
            "checkpoint_writes_on_writer_thread_seconds": round(writer, 4),
            "compile_seconds": round(sum(sum(c.values()) for c in stages.compiles.values()), 4)}


def format_rows(out: dict[str, Any]) -> str:
    """The breakdown as a table, largest first."""
    total = out["total_seconds"]
    lines = [f"{'stage':<48} {'seconds':>8} {'share':>6}"]
    for name, row in sorted(out["rows"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"{name:<48} {row['seconds']:8.2f} {100 * row['seconds'] / total:5.1f}%")
    lines.append(f"{'total (process start to end)':<48} {total:8.2f}")
    lines.append(f"checkpoint writes on the writer thread (beside the loop): "
                 f"{out['checkpoint_writes_on_writer_thread_seconds']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None, write: Callable[[str], None] = print) -> int:
    """Profile; everything but ``--json`` goes to ``experiments.run``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_run", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the breakdown to this file")
    args, rest = p.parse_known_args(argv)
    out = profile(rest)
    write(format_rows(out))
    timing.write_json(args.json, {**out, "device": timing.device_description()})
    return int(out["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
