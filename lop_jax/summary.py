"""What a run did, in a few lines: the per-task table, the time it took, where its results are and
what to run next (``python -m experiments.run`` prints it when the runs end; the study report
shows the same table for every system).

Per task t (1-based, ``classes_per_task`` × t classes seen): the best test accuracy over the task's
epochs (the number the paper plots), the validation accuracy at the task's last epoch, and a column
for every further array the runs' plasticity methods record: ``<name>_per_epoch`` (one row per
epoch, e.g. CBP's ``replaced_units_per_epoch``, units replaced per feature layer) and
``<name>_per_task`` (one row per task boundary, shown in the task it ends). Integer arrays are
counts: summed over the task's epochs and the other axes (the units CBP replaced in the task, all
layers); float arrays are averaged. With several run indices each cell is the mean over them and
the standard error. Everything is read through ``lop_jax.results.ExperimentDir``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lop_jax.config import Config
from lop_jax.results import ExperimentDir, ResultsError

RUNTIMES = ("epoch_runtime", "test_evaluation_runtime", "validation_evaluation_runtime")
# arrays every run has, with their own columns or none: the rest that end in these suffixes are the methods'
STANDARD = ("test_accuracy_per_epoch", "test_loss_per_epoch", "validation_accuracy_per_epoch",
            "validation_loss_per_epoch")
PER_EPOCH, PER_TASK = "_per_epoch", "_per_task"


@dataclass(frozen=True)
class TaskRow:
    """One task of one experiment: a value per run index in each column; ``methods`` maps each
    array the methods record to its values (NaN where a per-task array has no row: the last task);
    ``epochs`` is how many of the task's epochs were run."""

    task: int
    classes: int
    epochs: int
    best_test_accuracy: np.ndarray
    final_validation_accuracy: np.ndarray
    methods: dict[str, np.ndarray]


@dataclass(frozen=True)
class ExperimentSummary:
    """The per-task table of some runs of one experiment directory and their recorded times."""

    folder: ExperimentDir
    config: Config
    indices: list[int]
    tasks: list[TaskRow]
    recorded_seconds: dict[int, float]  # per index: training plus test and validation evaluation

    @property
    def epochs_done(self) -> int:
        return sum(row.epochs for row in self.tasks)

    @property
    def total_seconds(self) -> float:
        """The recorded time of all the runs, those trained together (vmapped: they record the same
        times, to the bit) counted once."""
        return sum(set(self.recorded_seconds.values()))


def summarize(folder: ExperimentDir, indices: Sequence[int] | None = None) -> ExperimentSummary:
    """The summary of ``indices`` (default: the finished runs, or every run of a folder without run
    status) of one experiment directory; ResultsError when there is no run to summarise."""
    if indices is None:
        indices = folder.finished_indices()
        if indices is None:
            indices = folder.metric_indices("test_accuracy_per_epoch")
    indices = sorted(indices)
    if not indices:
        raise ResultsError(f"no finished run in {folder.path}")
    cfg = folder.read_config() if folder.has_config() else Config()
    test, val = (np.stack([_epochs(folder, metric, i, cfg.num_epochs) for i in indices])
                 for metric in ("test_accuracy_per_epoch", "validation_accuracy_per_epoch"))
    done = [folder.status(i) for i in indices]
    epochs_done = min(int(s["epochs_done"]) if s and "epochs_done" in s else cfg.num_epochs for s in done)
    method_arrays = _method_arrays(folder, indices, cfg)
    e = cfg.epochs_per_task
    tasks = []
    for t in range(cfg.num_tasks):
        first, last = t * e, min((t + 1) * e, epochs_done)
        if last <= first:
            break
        methods = {}
        for name, a in method_arrays.items():
            if name.endswith(PER_EPOCH):
                part = a[:, first:last]
                methods[name] = part.sum(axis=1) if a.dtype.kind in "iu" else part.mean(axis=1)
            else:  # one row per task boundary: the boundary after task t, none after the last
                methods[name] = a[:, t] if t < a.shape[1] and last == (t + 1) * e else np.full(len(indices), np.nan)
        tasks.append(TaskRow(t + 1, cfg.active_classes(t), last - first, test[:, first:last].max(axis=1),
                             val[:, last - 1], methods))
    seconds = {i: float(sum(folder.load_metric(m, i)[:epochs_done].sum() for m in RUNTIMES if folder.has_metric(m, i)))
               for i in indices}
    return ExperimentSummary(folder, cfg, indices, tasks, seconds)


def _epochs(folder: ExperimentDir, metric: str, index: int, epochs: int) -> np.ndarray:
    """One run's per-epoch array; ResultsError unless it has the config's number of epochs."""
    a = folder.load_metric(metric, index)
    if a.shape != (epochs,):
        raise ResultsError(f"{folder.metric_path(metric, index)} has shape {a.shape}, the config {epochs} epochs")
    return a


def _method_arrays(folder: ExperimentDir, indices: Sequence[int], cfg: Config) -> dict[str, np.ndarray]:
    """The methods' arrays every run of ``indices`` has, each reduced to [runs, rows] (the other axes
    summed for counts, averaged otherwise); arrays whose rows do not fit the config are left out."""
    names = set.intersection(*(set(folder.metric_names(i)) for i in indices)) - set(STANDARD) - set(RUNTIMES)
    rows = {PER_EPOCH: cfg.num_epochs, PER_TASK: cfg.num_tasks - 1}
    out = {}
    for name in sorted(names):
        suffix = next((s for s in rows if name.endswith(s)), None)
        if suffix is None:
            continue
        arrays = [folder.load_metric(name, i) for i in indices]
        if any(a.ndim == 0 or a.shape[0] != rows[suffix] or a.dtype.kind not in "iuf" for a in arrays):
            continue
        flat = np.stack([a.reshape(a.shape[0], -1) for a in arrays])
        out[name] = flat.sum(axis=2) if flat.dtype.kind in "iu" else flat.astype(np.float64).mean(axis=2)
    return out


def method_label(name: str) -> str:
    """The column title of a method's array: ``replaced_units_per_epoch`` → ``replaced units``,
    ``x_per_task`` → ``x (at the task's end)``."""
    if name.endswith(PER_TASK):
        return name[:-len(PER_TASK)].replace("_", " ") + " (at the task's end)"
    return name[:-len(PER_EPOCH)].replace("_", " ")


def index_label(indices: Sequence[int]) -> str:
    """``index 3``, ``indices 0-4`` (a contiguous range) or ``indices 0, 2, 5``."""
    if len(indices) == 1:
        return f"index {indices[0]}"
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"indices {indices[0]}-{indices[-1]}"
    return "indices " + ", ".join(map(str, indices))


def format_duration(seconds: float) -> str:
    """``42.0 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _cell(values: np.ndarray, scale: float = 1.0, digits: int = 1) -> str:
    v = np.asarray(values, np.float64) * scale
    if np.isnan(v).any():
        return "-"
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1) / np.sqrt(v.size):.{digits}f}"


def task_table(summary: ExperimentSummary) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the per-task table, accuracies in percent, formatted."""
    headers = ["task", "classes", "best test accuracy (%)", "final validation accuracy (%)"]
    names = list(summary.tasks[0].methods) if summary.tasks else []
    headers += [method_label(n) for n in names]
    rows = []
    for row in summary.tasks:
        task = str(row.task) if row.epochs == summary.config.epochs_per_task else \
            f"{row.task} ({row.epochs} of {summary.config.epochs_per_task} epochs)"
        cells = [task, str(row.classes), _cell(row.best_test_accuracy, 100.0),
                 _cell(row.final_validation_accuracy, 100.0)]
        for name in names:
            values = row.methods[name]
            cells.append(_cell(values, digits=0 if values.dtype.kind in "iu" else 3))
        rows.append(cells)
    return headers, rows


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain-text lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[k]) for r in [headers, *rows]) for k in range(len(headers))]
    return ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in [headers, *rows]]


def next_commands(folder: ExperimentDir) -> dict[str, str]:
    """The commands that take a finished experiment further: analyse it, plot it, report on the
    results folder that holds it."""
    exp, parent = str(folder.path), str(folder.path.parent)
    return {
        "analyse": f"python -m experiments.analyze --results-dir {shlex.quote(exp)}",
        "plot": f"python -m experiments.plot --results-dir {shlex.quote(parent)} "
                f"--algorithms {shlex.quote(folder.name)} --metric all --table",
        "report": f"python -m experiments.report --results-dir {shlex.quote(parent)}",
    }


def end_of_run_text(folder: ExperimentDir, indices: Sequence[int], wall_seconds: float) -> str:
    """What ``experiments.run`` prints when its runs end: the table of ``indices``, this command's
    wall time and the runs' recorded time, where the results are, and the next commands."""
    summary = summarize(folder, indices)
    n = len(summary.indices)
    recorded = sum(summary.recorded_seconds.values()) / n
    lines = [f"{folder.name}, {index_label(summary.indices)}: {summary.epochs_done} epochs, "
             f"{len(summary.tasks)} tasks"
             + ("" if n == 1 else f" (each cell: mean ± standard error over the {n} runs)")]
    lines += ["  " + line for line in format_table(*task_table(summary))]
    lines.append(f"wall time: {format_duration(wall_seconds)} for this command (compilation included); "
                 f"recorded training and evaluation: {format_duration(recorded)}"
                 + (" (every session of the run)" if n == 1 else " per run (every session; the runs trained together)"))
    lines.append(f"results: {Path(folder.path)}")
    lines.append("next:")
    width = max(map(len, next_commands(folder)))
    lines += [f"  {what + ':':<{width + 1}} {command}" for what, command in next_commands(folder).items()]
    return "\n".join(lines)
