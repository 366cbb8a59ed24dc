"""The scaled protocol's sweep: five systems × seeds, analysis, exported arrays, figures, table.

    python -m experiments.scaled_sweep [--config-dir configs/scaled] [--seeds 0-2] [--systems a,b]
        [--data-dir D] [--results-dir results/scaled] [--export-dir docs/scaled_protocol]
        [--seeds-together] [--skip-runs] [--verbose]
    python -m experiments.scaled_sweep --check [--export-dir docs/scaled_protocol]

Each run is analysed and its small arrays copied to ``<export-dir>/results`` as soon as it ends.
Rerunning the same command resumes: runs in the exported copy are skipped (so a sweep continues
on another machine from the committed copy), an interrupted run continues from its last
checkpoint. The figures and the table are drawn from the exported copy, so ``--skip-runs`` redraws
them from the repository alone.

``--check`` answers "does the export show the loss-of-plasticity signature?" from the exported
arrays alone (no run, no data set): each criterion of ``lop_jax.signature`` with its value ±
standard error over seeds and PASS/FAIL, then the other systems beside them for information.
Exit 0 when every criterion passes, 1 when one fails, 2 (one line) when the export cannot be
judged (no finished run, or a system the criteria need is missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lop_jax import cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    from lop_jax.sweep import SYSTEMS

    p = argparse.ArgumentParser(prog="python -m experiments.scaled_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", default="configs/scaled", help="folder with one <system>.json per system")
    p.add_argument("--seeds", default="0-2", help="run indices: N, A-B or a comma list (default 0-2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated config names (default: all five)")
    cli.add_data_dir(p, help="folder holding cifar-100-python/ or its archive")
    cli.add_results_dir(p, help="where the runs go (default results/scaled)", default="results/scaled")
    p.add_argument("--export-dir", default="docs/scaled_protocol",
                   help="where the small arrays, figures and table go (default docs/scaled_protocol)")
    p.add_argument("--seeds-together", action="store_true",
                   help="vmap the seeds of a system in one process (does not pay at width 8 on 2 CPU cores)")
    p.add_argument("--skip-runs", action="store_true", help="only analyse, export and draw what is there")
    p.add_argument("--verbose", action="store_true", help="per-epoch lines instead of progress bars")
    p.add_argument("--check", action="store_true",
                   help="only judge the exported arrays against the signature's criteria (exit 0: all pass)")
    return p.parse_args(argv)


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Run, analyse, export, draw (or --check); exit codes as in ``lop_jax.errors``."""
    args = parse_args(argv)
    if args.check:
        return check(Path(args.export_dir))
    from lop_jax.experiment import RunInterrupted
    from lop_jax.sweep import SYSTEMS, draw_sweep, load_system_configs, per_task_summary, run_sweep

    systems = cli.split_names(args.systems)
    seeds = None if args.skip_runs else cli.parse_indices(args.seeds, "--seeds")
    overrides = {"data_path": args.data_dir} if args.data_dir is not None else {}
    export_dir = Path(args.export_dir)
    configs = load_system_configs(args.config_dir, systems, overrides)
    if seeds is not None:
        try:
            run_sweep(configs, seeds, args.results_dir, export_dir, seeds_together=args.seeds_together,
                      verbose=args.verbose)
        except RunInterrupted as err:
            raise RunInterrupted(f"{err}; rerun the same command to resume the sweep") from None
    drawn = systems + [s for s in SYSTEMS if s not in systems]  # a --systems subset keeps the others' curves
    for path in draw_sweep(export_dir / "results", drawn, export_dir / "figures",
                           log=lambda m: print(m, file=sys.stderr)):
        print(path)
    summary = per_task_summary(export_dir / "results", drawn)
    (export_dir / "per_task_means.json").write_text(json.dumps(summary, indent=1) + "\n")
    print((export_dir / "figures" / "summary_table.txt").read_text())
    return 0


def check(export_dir: Path) -> int:
    """Print the signature's criteria for an export; 0 when all pass, 1 when any fails; an export that
    cannot be judged is an ``InputError`` (2)."""
    from lop_jax.signature import report_lines

    lines, criteria = report_lines(export_dir / "results")  # SignatureError is an InputError: exit 2
    for line in lines:
        print(line)
    failed = [c.name for c in criteria if not c.passed]
    if failed:
        print(f"signature: {len(failed)} of {len(criteria)} criteria fail: {'; '.join(failed)}")
        return 1
    print(f"signature: all {len(criteria)} criteria pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
