"""Post-run analysis of one experiment directory (semantics §9), the reference's ``post_run_analysis.py``.

    python -m experiments.analyze --results-dir <results_dir>/<experiment_name> \
        [--data-dir D] [--dormant-unit-threshold 0.01] [--bn-mode train|eval] [--log tensorboard|wandb]

Writes ``<metric>/index-<N>.npy`` for every finished run index (see ``lop_jax.analysis``);
``--log`` adds each run's metrics per task to its tracked run (``lop_jax.tracking``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lop_jax import cli, tracking
from lop_jax.errors import CommandFailed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the reference's ``--results_dir``, ``--data_path`` and
    ``--dormant_unit_threshold`` are accepted as aliases)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_results_dir(parser, help="experiment directory: <results_dir>/<experiment_name>", required=True)
    cli.add_data_dir(parser, help="folder with the data set (default: the data_path of the run's config)")
    parser.add_argument("--dormant-unit-threshold", "--dormant_unit_threshold", dest="dormant_unit_threshold",
                        type=float, default=0.01,
                        help="a unit is dormant when its fraction of non-zero activations is below this (0.01)")
    parser.add_argument("--bn-mode", choices=("train", "eval"), default="train",
                        help="BatchNorm statistics of the forward passes: 'train' (batch statistics, as the "
                             "reference) or 'eval' (running statistics)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_log_option(parser, what="each run's analysis per task")
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the analysis; exit codes as in ``lop_jax.errors`` (1: no finished run to analyse)."""
    args = parse_args(argv)
    track = tracking.parse_kinds(args.log)
    tracking.check_available(track)
    from lop_jax.analysis import analyze_experiment, load_experiment_config
    from lop_jax.results import ExperimentDir

    results = analyze_experiment(args.results_dir, data_dir=args.data_dir, threshold=args.dormant_unit_threshold,
                                 bn_mode=args.bn_mode, progress=not args.no_progress)
    if not results:
        raise CommandFailed(f"no finished run to analyse in {args.results_dir}")
    if track:
        tracking.log_analysis(track, ExperimentDir(args.results_dir), load_experiment_config(args.results_dir), results)
    print(f"analysed index {', '.join(str(i) for i in results)} of {args.results_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
