"""The paper's figures and summary table (the reference's ``plots/plot_incremental_cifar_results.py``).

    python -m experiments.plot --results-dir <results_dir> --algorithms a,b,c --metric M \
        [--output-dir O] [--table]

``<results_dir>/<algorithm>`` are experiment directories. ``--metric all`` draws every figure and
the summary (the three panels of the paper's main figure); ``relative_accuracy_per_epoch`` needs
``retrained_network`` among the algorithms. ``--table`` prints the summary table at the last task
and writes it as CSV (and text) to the output folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lop_jax import cli

METRIC_CHOICES = (
    "relative_accuracy_per_epoch", "test_accuracy_per_epoch", "test_loss_per_epoch",
    "weight_magnitude_analysis", "previous_tasks_dormant_units_analysis", "next_task_dormant_units_analysis",
    "previous_tasks_effective_rank_analysis", "next_task_effective_rank_analysis",
    "previous_tasks_stable_rank_analysis", "next_task_stable_rank_analysis", "accuracy_per_class_in_order",
    "summary", "all",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the reference's ``--results_dir`` is accepted as an alias)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_results_dir(parser, help="folder holding one experiment directory per algorithm", required=True)
    parser.add_argument("--algorithms", required=True, help="comma-separated experiment names")
    parser.add_argument("--metric", choices=METRIC_CHOICES, default=None, help="what to draw")
    parser.add_argument("--output-dir", default=None, help="where figures and tables go (default <results-dir>/plots)")
    parser.add_argument("--table", action="store_true", help="print the summary table and write it as CSV")
    parser.add_argument("--reference-next-task-quirk", action="store_true",
                        help="leave out the lowest run index in next-task metrics, as the reference's plot script does")
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Draw and tabulate; exit codes as in ``lop_jax.errors`` (2: missing or inconsistent results)."""
    args = parse_args(argv)
    from lop_jax import plots

    algorithms = cli.split_names(args.algorithms)
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.results_dir) / "plots"
    if not algorithms:
        raise plots.PlotError("--algorithms is empty")
    if args.metric is None and not args.table:
        raise plots.PlotError("nothing to do: give --metric and/or --table")
    if not Path(args.results_dir).is_dir():
        raise plots.PlotError(f"no such results directory: {args.results_dir}")
    quirk = args.reference_next_task_quirk
    written: list[Path] = []
    if args.metric == "all":
        written = plots.plot_all(args.results_dir, algorithms, output_dir, quirk,
                                 log=lambda m: print(m, file=sys.stderr))
    elif args.metric == "summary":
        written = plots.plot_summary(args.results_dir, algorithms, output_dir, quirk)
    elif args.metric is not None:
        written = plots.plot_metric(args.results_dir, algorithms, args.metric, output_dir, quirk)
    for path in written:
        print(path)
    if args.table:
        rows = plots.summary_table(args.results_dir, algorithms)
        text = plots.format_table(rows)
        print(text)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary_table.txt").write_text(text + "\n")
        print(plots.write_table_csv(rows, output_dir / "summary_table.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
