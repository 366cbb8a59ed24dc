"""The plasticity methods beside the paper's five systems on the laptop protocol, from committed arrays.

    python -m experiments.compare_methods [--paper docs/scaled_protocol] [--methods docs/methods_comparison]
        [--only redo,l2_init] [--figures-dir D] [--update docs/methods_comparison/README.md]

Reads two sweep exports of the same protocol (``<folder>/results``: the paper's systems and the
methods, ``lop_jax.comparison``), prints the comparison table (mean ± standard error over seeds,
n per row) and draws ``comparison.png`` (in ``--figures-dir``, default ``<methods>/figures``).
``--update DOC`` writes the table into DOC's ``<!-- report: comparison -->`` … ``<!-- /report -->``
block and refuses (one line, DOC untouched) when the block has no arrays behind it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lop_jax import cli
from lop_jax.errors import InputError

MARKER_NAME = "comparison"


class ReportError(InputError, ValueError):
    """The document cannot be updated from the arrays (a marker without a table)."""


def comparison_text(paper: Path, methods: Path, only: Sequence[str] | None = None) -> str:
    """The comparison table with its legend line, as the document shows it."""
    from lop_jax import comparison

    comp = comparison.load_comparison(paper / "results", methods / "results", only)
    table = comparison.markdown_table(comparison.rows(comp), comparison.last_classes(comp))
    return (f"{table}\n\nLast analysed snapshot (dormant units, stable rank) and last task (accuracy), mean ± "
            f"standard error over the n seeds of each row; methods in bold. 'keeps plasticity': the laptop "
            f"protocol's three criteria for CBP (dormant units ≤ {comparison.CBP_DORMANT_MAX:g} %, stable rank "
            f"within {comparison.CBP_RANK_CHANGE_MAX:g} % of its first-task value, accuracy at or above the "
            f"retrained network), on the means, with at least {comparison.MIN_SEEDS} seeds.")


def draw(paper: Path, methods: Path, figures_dir: Path, only: Sequence[str] | None = None) -> Path:
    """Draw ``<figures_dir>/comparison.png`` from the arrays."""
    from lop_jax import comparison

    fig = comparison.figure(comparison.load_comparison(paper / "results", methods / "results", only))
    out = figures_dir / "comparison.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return out


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Print (and with ``--update`` write) the table and draw the figure; exit codes as in ``lop_jax.errors``."""
    p = argparse.ArgumentParser(prog="python -m experiments.compare_methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", type=Path, default=Path("docs/scaled_protocol"),
                   help="export of the paper's five systems (holds results/)")
    p.add_argument("--methods", type=Path, default=Path("docs/methods_comparison"),
                   help="export of the methods (holds results/)")
    p.add_argument("--only", default=None, help="comma-separated methods, in this order (default: every one exported)")
    p.add_argument("--figures-dir", type=Path, default=None, help="where comparison.png goes (<methods>/figures)")
    p.add_argument("--update", type=Path, metavar="DOC", help="write the table into DOC's report block")
    args = p.parse_args(argv)
    only = [m for m in args.only.split(",") if m] if args.only else None
    text = comparison_text(args.paper, args.methods, only)
    figure = draw(args.paper, args.methods, args.figures_dir or args.methods / "figures", only)
    if args.update is None:
        print(text)
    else:
        from lop_jax.doc_markers import MissingArrays, update_document

        try:
            update_document(args.update, {MARKER_NAME: text})
        except MissingArrays as err:
            raise ReportError(str(err)) from None
        print(f"{args.update}: updated {MARKER_NAME}")
    print(f"figure: {figure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
