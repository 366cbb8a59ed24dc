"""lop-jax's whole protocol run against an earlier checkout of itself, as whole processes, alternating.

    python -m benchmarks.before_after --before DIR --config configs/bench/three_tasks.json --data-dir D \
        [--repeats 2] [--cpus 2] [--json OUT]

``DIR`` holds another checkout of lop-jax (e.g. ``git archive <commit> | tar -x -C DIR``); its
``python -m experiments.run`` runs from there, so it imports that checkout's package. Three sides
alternate: ``before``, ``after_cold`` (this checkout, an empty compilation cache per call) and
``after_warm`` (this checkout, a compilation cache filled by an untimed run first). The figures
are the medians of wall and CPU time and their ratios to ``before``: what this checkout's changes
gave, measured side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import protocol, timing


def main(argv: list[str] | None = None) -> int:
    """Parse, run the alternation, print and write the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.before_after", description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the folder of the earlier checkout")
    p.add_argument("--config", default="configs/bench/three_tasks.json")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))[:args.cpus] if hasattr(os, "sched_getaffinity") else []
    data_dir, config = str(Path(args.data_dir).absolute()), str(Path(args.config).absolute())
    with tempfile.TemporaryDirectory(prefix="lop-jax-before-after-") as tmp:
        work = Path(tmp)
        warm = work / "warm-cache"
        calls = {"n": 0}

        def side(cwd: str, cache: str | None):
            def call() -> dict[str, Any]:
                calls["n"] += 1
                results = work / f"call-{calls['n']}"
                env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
                env[protocol.CACHE_ENV] = cache if cache is not None else tempfile.mkdtemp(dir=work)
                argv = [sys.executable, "-m", "experiments.run", "--config", config, "--data-dir", data_dir,
                        "--results-dir", str(results)]
                here = os.getcwd()
                os.chdir(cwd)
                try:
                    got = protocol.run_process(argv, env, cpus)
                finally:
                    os.chdir(here)
                if got["exit_code"] != 0:
                    raise RuntimeError(f"{cwd}: exit {got['exit_code']}: {got['output_tail']}")
                shutil.rmtree(results, ignore_errors=True)
                return got
            return call

        runners = {"before": side(args.before, "off"), "after_cold": side(os.getcwd(), None),
                   "after_warm": side(os.getcwd(), str(warm))}
        runners["after_warm"]()
        times = timing.alternate(runners, args.repeats, measure=lambda name, got: {"cpu": got["cpu"]})
    med = timing.medians(times)
    out = {"device": timing.device_description(), "pinned_cpus": cpus, "config": args.config,
           "repeats": args.repeats, "order": timing.alternation(list(runners), args.repeats), "medians": med,
           "ratios_to_before": {name: {k: med[name][k] / med["before"][k] for k in med[name]} for name in med},
           "calls": times}
    for name, m in med.items():
        print(f"{name:<11} {m['wall']:7.1f} s wall {m['cpu']:7.1f} s CPU  "
              f"(x{out['ratios_to_before'][name]['wall']:.3f} / x{out['ratios_to_before'][name]['cpu']:.3f} of before)")
    timing.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
