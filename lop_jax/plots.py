"""The paper's figures and a summary table from results directories (semantics §10).

``results_dir`` holds one experiment directory per algorithm (``<results_dir>/<algorithm>``,
the experiment name), each with ``<metric>/index-<N>.npy`` files and, for lop-jax runs,
``config.json`` and ``run_status/``. Directories without ``config.json`` (the reference's own
results) are read at the paper's scale: 20 tasks of 5 classes, 200 epochs, width 64.

Per-task values, as the reference's ``plot_incremental_cifar_results.py`` computes them:

- ``*_accuracy_per_epoch``: best test accuracy over each task's epochs, in percent;
  ``relative_accuracy_per_epoch``: that minus the retrained network's, index by index;
  ``*_loss_per_epoch``: lowest loss of each task.
- analysis metrics: one value per task-boundary snapshot; dormant units in percent; effective and
  stable rank as a percentage of the representation width (8 × network_width = 512).
- ``accuracy_per_class_in_order``: the final network's test accuracy, averaged over the classes
  of each task (in percent).

The x axis is the number of classes: task t (1-based) is drawn at 5·t. Next-task metrics of the
snapshot before task t are drawn at 5·t, previous-tasks metrics of the snapshot after task t at
5·t (the reference's meaningless 0 at the first snapshot is left out). Curves are the mean over
run indices (only finished runs where ``run_status`` exists) with a shaded standard-error band.

Matplotlib is used through its object API with the Agg canvas: no global pyplot state.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lop_jax.analysis import ANALYSIS_METRICS
from lop_jax.errors import InputError
from lop_jax.results import ExperimentDir, ResultsError

BASELINE = "retrained_network"
PAPER_COLORS = {
    "base_deep_learning_system": "#d62728",  # red
    "continual_backpropagation": "#1f77b4",  # blue
    "head_resetting": "#2ca02c",  # green
    "shrink_and_perturb": "#ff7f0e",  # orange
    "retrained_network": "#7f7f7f",  # grey
}
EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#FBB829", "#5A395F")
EPOCH_METRICS = ("relative_accuracy_per_epoch", "test_accuracy_per_epoch", "test_loss_per_epoch")
PLOT_METRICS = EPOCH_METRICS + ANALYSIS_METRICS
SUMMARY_METRICS = ("relative_accuracy_per_epoch", "next_task_dormant_units_analysis", "next_task_stable_rank_analysis")
SUMMARY_NAME = "summary"
X_LABEL = "Number of Classes"


class PlotError(InputError, ValueError):
    """Missing or inconsistent results; the message is one line."""


@dataclass(frozen=True)
class Scale:
    """The sizes of an experiment that the per-task values depend on."""

    num_tasks: int = 20
    classes_per_task: int = 5
    epochs_per_task: int = 200
    network_width: int = 64

    @property
    def representation_width(self) -> int:
        return 8 * self.network_width


@dataclass
class Curve:
    """Per-task values of one algorithm: ``values`` [runs, points] drawn at ``x``."""

    algorithm: str
    metric: str
    x: np.ndarray
    values: np.ndarray
    indices: list[int] = field(default_factory=list)

    @property
    def mean(self) -> np.ndarray:
        return self.values.mean(axis=0)

    @property
    def standard_error(self) -> np.ndarray:
        n = self.values.shape[0]
        if n < 2:
            return np.zeros(self.values.shape[1])
        return self.values.std(axis=0, ddof=1) / np.sqrt(n)


def experiment_scale(alg_dir: str | Path) -> Scale:
    """Scale of an experiment directory, from its ``config.json`` (paper scale without one)."""
    folder = ExperimentDir(alg_dir)
    if not folder.has_config():
        return Scale()
    try:
        cfg = folder.read_config()
    except ResultsError as err:
        raise PlotError(str(err)) from None
    return Scale(cfg.num_tasks, cfg.classes_per_task, cfg.epochs_per_task, cfg.network_width)


def finished_indices(alg_dir: str | Path) -> set[int] | None:
    """Indices of finished runs per ``run_status``; None when there is no ``run_status`` folder."""
    done = ExperimentDir(alg_dir).finished_indices()
    return None if done is None else set(done)


def load_metric_arrays(alg_dir: str | Path, metric: str) -> dict[int, np.ndarray]:
    """``{index: array}`` of one metric of one experiment, finished runs only (every run of a folder
    without run status: the reference's)."""
    folder = ExperimentDir(alg_dir)
    done = folder.finished_indices()
    return {i: folder.load_metric(metric, i) for i in folder.metric_indices(metric) if done is None or i in done}


def per_task_values(metric: str, array: np.ndarray, scale: Scale) -> tuple[np.ndarray, np.ndarray]:
    """(x, values) of one run's metric array: the per-task values drawn in the figures."""
    t, c = scale.num_tasks, scale.classes_per_task
    a = np.asarray(array, np.float64)
    x = c * np.arange(1, t + 1)
    if metric.endswith("_per_epoch"):
        if a.size != t * scale.epochs_per_task:
            raise PlotError(f"{metric} has {a.size} epochs, expected {t} tasks × {scale.epochs_per_task}")
        bins = a.reshape(t, scale.epochs_per_task)
        if "accuracy" in metric:
            return x, 100.0 * bins.max(axis=1)
        if "loss" in metric:
            return x, bins.min(axis=1)
        raise PlotError(f"no per-task rule for {metric}")
    if metric == "accuracy_per_class_in_order":
        if a.size < t * c:
            raise PlotError(f"{metric} has {a.size} classes, expected at least {t * c}")
        return x, 100.0 * a[:t * c].reshape(t, c).mean(axis=1)
    if a.size != t:
        raise PlotError(f"{metric} has {a.size} values, expected one per task ({t})")
    if "dormant" in metric:
        a = 100.0 * a
    elif "rank" in metric:
        a = 100.0 * a / scale.representation_width
    elif metric != "weight_magnitude_analysis":
        raise PlotError(f"no per-task rule for {metric}")
    if metric.startswith("previous_tasks"):
        return c * np.arange(1, t), a[1:]
    return x, a


def _algorithm_curve(results_dir: Path, algorithm: str, metric: str, drop_first_next_index: bool) -> Curve:
    alg_dir = results_dir / algorithm
    if not alg_dir.is_dir():
        raise PlotError(f"no results for algorithm '{algorithm}': {alg_dir} does not exist")
    arrays = load_metric_arrays(alg_dir, metric)
    if drop_first_next_index and metric.startswith("next_task") and arrays:
        arrays.pop(min(arrays))
    if not arrays:
        hint = " (run python -m experiments.analyze on it first)" if metric in ANALYSIS_METRICS else ""
        raise PlotError(f"no finished run has {metric} in {alg_dir}{hint}")
    scale = experiment_scale(alg_dir)
    x = None
    rows = []
    for array in arrays.values():
        x, values = per_task_values(metric, array, scale)
        rows.append(values)
    return Curve(algorithm, metric, x, np.stack(rows), list(arrays))


def metric_curves(results_dir: str | Path, algorithms: Sequence[str], metric: str,
                  drop_first_next_index: bool = False) -> dict[str, Curve]:
    """One curve per algorithm (the baseline itself is left out of relative accuracy).

    ``drop_first_next_index`` reproduces a quirk of the reference's plot script, which leaves
    out the lowest run index for the next-task metrics.
    """
    results_dir = Path(results_dir)
    if metric != "relative_accuracy_per_epoch":
        return {a: _algorithm_curve(results_dir, a, metric, drop_first_next_index) for a in algorithms}
    if BASELINE not in algorithms:
        raise PlotError(f"relative_accuracy_per_epoch is measured against {BASELINE}: add it to the algorithms")
    base = _algorithm_curve(results_dir, BASELINE, "test_accuracy_per_epoch", False)
    base_rows = dict(zip(base.indices, base.values, strict=True))
    out = {}
    for alg in algorithms:
        if alg == BASELINE:
            continue
        curve = _algorithm_curve(results_dir, alg, "test_accuracy_per_epoch", False)
        if curve.x.shape != base.x.shape or not np.array_equal(curve.x, base.x):
            raise PlotError(f"{alg} and {BASELINE} were run at different scales: no relative accuracy")
        missing = [i for i in curve.indices if i not in base_rows]
        if missing:
            raise PlotError(f"{BASELINE} has no finished run with index {missing[0]}, which {alg} has: "
                            "relative accuracy pairs runs by index")
        rel = curve.values - np.stack([base_rows[i] for i in curve.indices])
        out[alg] = Curve(alg, "relative_accuracy_per_epoch", curve.x, rel, curve.indices)
    return out


def algorithm_colors(algorithms: Sequence[str]) -> dict[str, str]:
    """The paper's colour for its five systems; other names get further colours in turn."""
    out, k = {}, 0
    for alg in algorithms:
        if alg in PAPER_COLORS:
            out[alg] = PAPER_COLORS[alg]
        else:
            out[alg] = EXTRA_COLORS[k % len(EXTRA_COLORS)]
            k += 1
    return out


def metric_label(metric: str, representation_width: int = 512) -> str:
    """Y-axis label of a metric."""
    data = "previous tasks' data" if metric.startswith("previous_tasks") else "next task's data"
    if metric == "relative_accuracy_per_epoch":
        return f"Accuracy relative to {BASELINE.replace('_', ' ')} (%)"
    if metric.endswith("accuracy_per_epoch"):
        return "Test accuracy (%), best of the task"
    if metric.endswith("loss_per_epoch"):
        return "Test loss, lowest of the task"
    if metric == "weight_magnitude_analysis":
        return "Average weight magnitude"
    if metric == "accuracy_per_class_in_order":
        return "Final test accuracy on the task's classes (%)"
    if "dormant" in metric:
        return f"Dormant units (%), {data}"
    if "stable_rank" in metric:
        return f"Stable rank (% of {representation_width}), {data}"
    if "effective_rank" in metric:
        return f"Effective rank (% of {representation_width}), {data}"
    return metric


def draw_curves(ax: Any, curves: dict[str, Curve], colors: dict[str, str], metric: str,
                representation_width: int = 512) -> None:
    """Mean line and standard-error band of every curve on one axes."""
    for alg, curve in curves.items():
        mean, se = curve.mean, curve.standard_error
        color = colors.get(alg, EXTRA_COLORS[0])
        ax.plot(curve.x, mean, color=color, linewidth=1.5, label=f"{alg.replace('_', ' ')} (n={len(curve.indices)})")
        ax.fill_between(curve.x, mean - se, mean + se, color=color, alpha=0.25, linewidth=0)
    if metric == "relative_accuracy_per_epoch":
        ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(metric_label(metric, representation_width))
    ax.yaxis.grid(True, alpha=0.5)
    ax.legend(fontsize="small")


def _save(fig: Figure, output_dir: Path, name: str) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    paths = [output_dir / f"{name}.png", output_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=200)
    fig.savefig(paths[1])
    return paths


def _representation_width(results_dir: Path, algorithms: Sequence[str]) -> int:
    return experiment_scale(results_dir / algorithms[0]).representation_width if algorithms else 512


def metric_figure(results_dir: str | Path, algorithms: Sequence[str], metric: str,
                  drop_first_next_index: bool = False) -> Figure:
    """The figure of one metric for the algorithms (a Matplotlib ``Figure`` with an Agg canvas)."""
    if metric not in PLOT_METRICS:
        raise PlotError(f"unknown metric '{metric}'; choose one of {', '.join(PLOT_METRICS)}")
    results_dir = Path(results_dir)
    curves = metric_curves(results_dir, algorithms, metric, drop_first_next_index)
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw_curves(ax, curves, algorithm_colors(algorithms), metric, _representation_width(results_dir, algorithms))
    return fig


def plot_metric(results_dir: str | Path, algorithms: Sequence[str], metric: str, output_dir: str | Path,
                drop_first_next_index: bool = False) -> list[Path]:
    """Draw one metric for the algorithms; writes ``<output_dir>/<metric>.png`` and ``.svg``."""
    fig = metric_figure(results_dir, algorithms, metric, drop_first_next_index)
    return _save(fig, Path(output_dir), metric)


def summary_figure(results_dir: str | Path, algorithms: Sequence[str], drop_first_next_index: bool = False) -> Figure:
    """The paper's main figure: relative accuracy, dormant units, stable rank, side by side.

    Without the retrained network among the algorithms the first panel shows test accuracy.
    The retrained network is not drawn in the dormant-unit and stable-rank panels (as in the paper).
    """
    results_dir = Path(results_dir)
    colors = algorithm_colors(algorithms)
    learners = [a for a in algorithms if a != BASELINE] or list(algorithms)
    metrics = list(SUMMARY_METRICS)
    if BASELINE not in algorithms:
        metrics[0] = "test_accuracy_per_epoch"
    fig = Figure(figsize=(16.0, 4.8))
    FigureCanvasAgg(fig)
    width = _representation_width(results_dir, learners)
    for k, metric in enumerate(metrics):
        algs = algorithms if "accuracy" in metric else learners
        curves = metric_curves(results_dir, algs, metric, drop_first_next_index)
        ax = fig.add_subplot(1, 3, k + 1)
        draw_curves(ax, curves, colors, metric, width)
    return fig


def plot_summary(results_dir: str | Path, algorithms: Sequence[str], output_dir: str | Path,
                 drop_first_next_index: bool = False) -> list[Path]:
    """Draw the paper's main figure (``summary_figure``); writes ``<output_dir>/summary.png`` and ``.svg``."""
    return _save(summary_figure(results_dir, algorithms, drop_first_next_index), Path(output_dir), SUMMARY_NAME)


def plot_all(results_dir: str | Path, algorithms: Sequence[str], output_dir: str | Path,
             drop_first_next_index: bool = False, log: Callable[[str], None] | None = None) -> list[Path]:
    """Every figure of ``PLOT_METRICS`` plus the summary; figures without data are skipped with a note."""
    say = log or print
    written: list[Path] = []
    for metric in PLOT_METRICS + (SUMMARY_NAME,):
        try:
            if metric == SUMMARY_NAME:
                written += plot_summary(results_dir, algorithms, output_dir, drop_first_next_index)
            else:
                written += plot_metric(results_dir, algorithms, metric, output_dir, drop_first_next_index)
        except PlotError as err:
            say(f"skipped {metric}: {err}")
    if not written:
        raise PlotError(f"no figure could be drawn from {results_dir}")
    return written


# ---------------------------------------------------------------------------------------------
# summary table
# ---------------------------------------------------------------------------------------------
TABLE_COLUMNS = (
    ("accuracy", "accuracy (%)"),
    ("relative_accuracy", "relative (%)"),
    ("dormant_percent", "dormant (%)"),
    ("stable_rank_percent", "stable rank (%)"),
    ("effective_rank", "effective rank"),
)


def _last(curve: Curve) -> tuple[float, float]:
    return float(curve.mean[-1]), float(curve.standard_error[-1])


def _try_curve(results_dir: Path, algorithms: Sequence[str], metric: str, alg: str) -> Curve | None:
    try:
        return metric_curves(results_dir, algorithms, metric).get(alg)
    except PlotError:
        return None


def summary_table(results_dir: str | Path, algorithms: Sequence[str]) -> list[dict[str, Any]]:
    """Per algorithm, at the last task: mean and standard error of test accuracy (%), accuracy
    relative to the retrained network (%), dormant units (%), stable rank (% of width) and
    effective rank (raw), all on the last snapshot's next-task data, with the numbers of runs."""
    results_dir = Path(results_dir)
    rows = []
    for alg in algorithms:
        acc = _algorithm_curve(results_dir, alg, "test_accuracy_per_epoch", False)
        scale = experiment_scale(results_dir / alg)
        row: dict[str, Any] = {"algorithm": alg, "classes": scale.num_tasks * scale.classes_per_task,
                               "n": len(acc.indices)}
        row["accuracy"] = _last(acc)
        rel = _try_curve(results_dir, [alg, BASELINE], "relative_accuracy_per_epoch", alg) \
            if BASELINE in algorithms and alg != BASELINE else None
        row["relative_accuracy"] = _last(rel) if rel is not None else None
        dormant = _try_curve(results_dir, [alg], "next_task_dormant_units_analysis", alg)
        row["dormant_percent"] = _last(dormant) if dormant is not None else None
        stable = _try_curve(results_dir, [alg], "next_task_stable_rank_analysis", alg)
        row["stable_rank_percent"] = _last(stable) if stable is not None else None
        erank = _try_curve(results_dir, [alg], "next_task_effective_rank_analysis", alg)
        if erank is not None:
            erank.values = erank.values * scale.representation_width / 100.0
        row["effective_rank"] = _last(erank) if erank is not None else None
        row["n_analysed"] = len(dormant.indices) if dormant is not None else 0
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: mean ± standard error; '-' where a value is missing."""
    headers = ["algorithm", "n"] + [h for _, h in TABLE_COLUMNS] + ["analysed"]
    body = []
    for row in rows:
        cells = [row["algorithm"], str(row["n"])]
        for key, _ in TABLE_COLUMNS:
            v = row[key]
            cells.append("-" if v is None else f"{v[0]:.2f} ± {v[1]:.2f}")
        cells.append(str(row["n_analysed"]))
        body.append(cells)
    widths = [max(len(r[k]) for r in [headers] + body) for k in range(len(headers))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    classes = sorted({row["classes"] for row in rows})
    title = f"at the last task ({', '.join(str(c) for c in classes)} classes); mean ± standard error over runs"
    return "\n".join([title, line(headers)] + [line(c) for c in body])


def write_table_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The table as CSV: one mean and one standard-error column per quantity (empty when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["algorithm", "classes", "n"]
    for key, _ in TABLE_COLUMNS:
        header += [f"{key}_mean", f"{key}_se"]
    header.append("n_analysed")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            out = [row["algorithm"], row["classes"], row["n"]]
            for key, _ in TABLE_COLUMNS:
                out += ["", ""] if row[key] is None else [f"{row[key][0]:.6g}", f"{row[key][1]:.6g}"]
            out.append(row["n_analysed"])
            writer.writerow(out)
    return path
