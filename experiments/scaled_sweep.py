"""The scaled protocol's sweep: five systems × seeds, analysis, exported arrays, figures, table.

    python -m experiments.scaled_sweep [--config-dir configs/scaled] [--seeds 0-2] [--systems a,b]
        [--data-dir D] [--results-dir results/scaled] [--export-dir docs/scaled_protocol]
        [--seeds-together] [--skip-runs] [--verbose]

Each run is analysed and its small arrays copied to ``<export-dir>/results`` as soon as it ends.
Rerunning the same command resumes: runs in the exported copy are skipped (so a sweep continues
on another machine from the committed copy), an interrupted run continues from its last
checkpoint. The figures and the table are drawn from the exported copy, so ``--skip-runs`` redraws
them from the repository alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.run import parse_indices


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    from lop_jax.sweep import SYSTEMS

    p = argparse.ArgumentParser(prog="python -m experiments.scaled_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", default="configs/scaled", help="folder with one <system>.json per system")
    p.add_argument("--seeds", default="0-2", help="run indices: N, A-B or a comma list (default 0-2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated config names (default: all five)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-100-python/ or its archive")
    p.add_argument("--results-dir", default="results/scaled", help="where the runs go (default results/scaled)")
    p.add_argument("--export-dir", default="docs/scaled_protocol",
                   help="where the small arrays, figures and table go (default docs/scaled_protocol)")
    p.add_argument("--seeds-together", action="store_true",
                   help="vmap the seeds of a system in one process (does not pay at width 8 on 2 CPU cores)")
    p.add_argument("--skip-runs", action="store_true", help="only analyse, export and draw what is there")
    p.add_argument("--verbose", action="store_true", help="per-epoch lines instead of progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, analyse, export, draw; errors are one line on stderr (exit 2), an interrupt exits 130."""
    args = parse_args(argv)
    from lop_jax.analysis import AnalysisError
    from lop_jax.config import ConfigError
    from lop_jax.data import DataError
    from lop_jax.experiment import RunError, RunInterrupted
    from lop_jax.plots import PlotError
    from lop_jax.sweep import SYSTEMS, draw_sweep, load_system_configs, per_task_summary, run_sweep

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    overrides = {"data_path": args.data_dir} if args.data_dir is not None else {}
    export_dir = Path(args.export_dir)
    try:
        configs = load_system_configs(args.config_dir, systems, overrides)
        if not args.skip_runs:
            run_sweep(configs, parse_indices(args.seeds), args.results_dir, export_dir,
                      seeds_together=args.seeds_together, verbose=args.verbose)
        drawn = systems + [s for s in SYSTEMS if s not in systems]  # a --systems subset keeps the others' curves
        for path in draw_sweep(export_dir / "results", drawn, export_dir / "figures",
                               log=lambda m: print(m, file=sys.stderr)):
            print(path)
        summary = per_task_summary(export_dir / "results", drawn)
        (export_dir / "per_task_means.json").write_text(json.dumps(summary, indent=1) + "\n")
        print((export_dir / "figures" / "summary_table.txt").read_text())
    except RunInterrupted as err:
        print(f"{err}; rerun the same command to resume the sweep", file=sys.stderr)
        return 130
    except (ConfigError, DataError, AnalysisError, PlotError, RunError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
