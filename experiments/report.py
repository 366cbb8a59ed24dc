"""A study report: one self-contained HTML page about a results folder.

    python -m experiments.report --results-dir <results_dir> [--out FILE] [--title TEXT]

``<results_dir>`` holds one experiment directory per system (``results/`` after
``python -m experiments.run`` for several configs, or ``docs/scaled_protocol/results``). The page
(default ``<results_dir>/report.html``) embeds its figures; a folder without a finished run is
refused with a one-line error (exit 2) and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lop_jax import cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the reference's ``--results_dir`` spelling is accepted too)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_results_dir(parser, help="folder holding one experiment directory per system", required=True)
    parser.add_argument("--out", default=None, help="the HTML file to write (default <results-dir>/report.html)")
    parser.add_argument("--title", default=None, help="the page's title (default: from the folder's name)")
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; exit codes as in ``lop_jax.errors`` (2: no such folder, or no finished run)."""
    args = parse_args(argv)
    from lop_jax.report import write_report

    print(write_report(args.results_dir, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
