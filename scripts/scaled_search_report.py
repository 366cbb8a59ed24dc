"""Print the markdown tables of docs/scaled_protocol.md from the committed result arrays.

    python scripts/scaled_search_report.py [--root docs/scaled_protocol] [--update docs/scaled_protocol.md]

For the chosen protocol (``<root>/results``) and every candidate of the search
(``<root>/search/<name>/results``): per task, the best test accuracy of each system (the value
the paper plots), the base system's dormant units and stable rank on the next task's data and
its average weight magnitude, and the wall time of each run from ``sweep_timing.json``. Where a
system has several run indices, each cell is the mean ± standard error over them, and the
accuracy difference to the retrained network is taken seed by seed (same class order). The
block ``check: configs/scaled`` is what ``python -m experiments.scaled_sweep --check`` prints for
the chosen protocol (``lop_jax.signature``).

``--update DOC`` regenerates every ``<!-- report: NAME -->`` … ``<!-- /report -->`` block of DOC
and refuses (one line on stderr, exit 2, DOC untouched) when a marker names a folder without
result arrays: a table in the document must always be one the committed arrays give.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lop_jax.doc_markers import update_for_command
from lop_jax.results import ExperimentDir
from lop_jax.sweep import SYSTEMS


def _indices(exp: Path) -> list[int]:
    """The run indices of one system that have results."""
    return ExperimentDir(exp).metric_indices("test_accuracy_per_epoch")


def _load(exp: Path, metric: str, indices: list[int]) -> np.ndarray | None:
    """One row per run index, or None when the metric is missing for any of them."""
    folder = ExperimentDir(exp)
    if not indices or not all(folder.has_metric(metric, i) for i in indices):
        return None
    return np.stack([folder.load_metric(metric, i) for i in indices])


def _cell(values: np.ndarray, fmt: str) -> str:
    """Mean over runs, with the standard error when there are several."""
    if len(values) == 1:
        return fmt.format(values[0])
    se = values.std(ddof=1) / np.sqrt(len(values))
    return f"{fmt.format(values.mean())} ± {fmt.replace('+', '').format(se)}"


def _end_of_task_training_accuracy(exp: Path, indices: list[int]) -> np.ndarray | None:
    """Per run and task, the mean running training accuracy (augmented images, in %) over the
    last tenth of the task's train summaries: whether a system fits its task."""
    summaries = _load(exp, "train_accuracy_per_checkpoint", indices)
    if summaries is None:
        return None
    cfg = ExperimentDir(exp).read_config()
    per_task = [cfg.steps_per_epoch(t) // cfg.running_avg_window * cfg.epochs_per_task for t in range(cfg.num_tasks)]
    if summaries.shape[1] != sum(per_task) or min(per_task) < 1:
        return None
    ends = np.cumsum(per_task)
    tails = [summaries[:, e - max(1, k // 10):e].mean(axis=1) for e, k in zip(ends, per_task, strict=True)]
    return np.stack(tails, axis=1) * 100


def candidate_table(results: Path, timing: dict) -> str:
    """One markdown table: a row per (system, quantity), a column per task; mean ± standard error
    over the run indices a system has (the row label says how many)."""
    systems = [s for s in SYSTEMS if ExperimentDir(results / s).has_config()]
    cfg = ExperimentDir(results / systems[0]).read_config()
    tasks, cpt = cfg.num_tasks, cfg.classes_per_task
    runs = {s: _indices(results / s) for s in systems}
    seeds = sorted({len(v) for v in runs.values()})
    label = "seed 0" if seeds == [1] else "mean ± s.e. over seeds"
    header = f"| {label} | " + " | ".join(str(cpt * (t + 1)) for t in range(tasks)) + " |"
    rows = [header, "| --- " * (tasks + 1) + "|"]
    n = {s: f" (n={len(runs[s])})" if seeds != [1] else "" for s in systems}
    best = {}
    for s in systems:
        acc = _load(results / s, "test_accuracy_per_epoch", runs[s])
        if acc is not None:
            best[s] = acc.reshape(len(runs[s]), tasks, -1).max(axis=2) * 100
            rows.append(f"| {s}{n[s]}: best test accuracy (%) | "
                        + " | ".join(_cell(best[s][:, t], "{:.1f}") for t in range(tasks)) + " |")
    ref = "retrained_network"
    if ref in best and seeds != [1]:
        for s in systems:
            common = [i for i in runs[s] if i in runs[ref]]
            if s == ref or s not in best or len(common) < 2:
                continue
            diff = np.stack([best[s][runs[s].index(i)] - best[ref][runs[ref].index(i)] for i in common])
            rows.append(f"| {s} (n={len(common)}): minus retrained, same seed (points) | "
                        + " | ".join(_cell(diff[:, t], "{:+.1f}") for t in range(tasks)) + " |")
    for s in systems:
        fit = _end_of_task_training_accuracy(results / s, runs[s])
        if fit is not None:
            rows.append(f"| {s}{n[s]}: running training accuracy, last tenth of the task (%) | "
                        + " | ".join(_cell(fit[:, t], "{:.0f}") for t in range(tasks)) + " |")
    for s in systems:
        for metric, name, fmt in (("next_task_dormant_units_analysis", "dormant units (%)", "{:.2f}"),
                                  ("next_task_stable_rank_analysis", "stable rank (of 64)", "{:.0f}"),
                                  ("weight_magnitude_analysis", "weight magnitude", "{:.3f}")):
            v = _load(results / s, metric, runs[s])
            if v is None:
                continue
            v = v * 100 if metric == "next_task_dormant_units_analysis" else v
            rows.append(f"| {s}{n[s]}: {name} | " + " | ".join(_cell(v[:, t], fmt) for t in range(v.shape[1])) + " |")
    walls = ", ".join(f"{k.replace('/index-', ' seed ')} {v['seconds'] / 60:.1f} min"
                      for k, v in sorted(timing.items()) if v.get("finished"))
    return "\n".join(rows) + (f"\n\nWall time per run: {walls}." if walls else "")


def has_arrays(results: Path) -> bool:
    """Whether a results folder holds at least one system with a config and test-accuracy arrays."""
    return any(ExperimentDir(results / s).has_config() and _indices(results / s) for s in SYSTEMS)


def collect_tables(root: Path) -> dict[str, str]:
    """The table of the chosen protocol (named ``configs/scaled``) and of every search candidate
    (``configs/scaled_search/<name>``) whose folder holds result arrays."""
    search = root / "search"
    folders = [("configs/scaled", root)] + [(f"configs/scaled_search/{d.name}", d)
                                           for d in (sorted(search.iterdir()) if search.is_dir() else [])
                                           if d.is_dir()]
    tables = {}
    for name, folder in folders:
        timing_file = folder / "sweep_timing.json"
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        if has_arrays(folder / "results"):
            tables[name] = candidate_table(folder / "results", timing)
    if "configs/scaled" in tables:
        tables["check: configs/scaled"] = signature_block(root)
    return tables


def signature_block(root: Path) -> str:
    """What ``python -m experiments.scaled_sweep --check`` prints for the chosen protocol, as a code block."""
    from lop_jax.signature import SignatureError, report_lines

    try:
        lines, _ = report_lines(root / "results")
    except SignatureError as err:
        lines = [f"error: {err}"]
    return "```\n" + "\n".join(lines) + "\n```"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables, or write them into the document's markers; 2 on a marker without arrays."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("docs/scaled_protocol"))
    p.add_argument("--update", type=Path, metavar="DOC",
                   help="write the tables into DOC between <!-- report: NAME --> and <!-- /report --> markers")
    args = p.parse_args(argv)
    tables = collect_tables(args.root)
    if args.update is not None:
        return update_for_command(args.update, tables)
    for name, table in tables.items():
        print(f"### {name}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
