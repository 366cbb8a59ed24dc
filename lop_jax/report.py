"""A study report: one self-contained HTML page about a results folder (``python -m experiments.report``).

The folder holds one experiment directory per system (``<results_dir>/<system>/``, as written by
``python -m experiments.run`` or exported by the laptop protocol's sweep). The page shows, for the
systems with at least one finished run: the summary table at the last task (``lop_jax.plots``),
the paper's figures that the arrays allow (PNG, embedded as base64: the page needs no other
file), each system's per-task table (``lop_jax.summary``), its run indices (seeds), its recorded
wall times, its stored config and the keys in which the configs differ, and the package versions
and devices of the machine that wrote the report (the runs do not record theirs). The folder is
only read; the page is written in one atomic write, and nothing is written when a folder has no
finished run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lop_jax import plots
from lop_jax.config import OPERATIONAL_KEYS
from lop_jax.errors import InputError
from lop_jax.results import ExperimentDir, ResultsError, atomic_write_bytes, experiment_dirs
from lop_jax.summary import RUNTIMES, format_duration, index_label, summarize, task_table

PACKAGES = ("lop-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "matplotlib")
REPORT_NAME = "report.html"
FIGURE_DPI = 110
WIDE = ("The paper's main figure", "Test accuracy, epoch by epoch")  # figures drawn across the page


class ReportError(InputError, ValueError):
    """The folder cannot be reported on (missing, or without a finished run); one line."""


@dataclass(frozen=True)
class System:
    """One experiment directory of the study and its finished run indices."""

    folder: ExperimentDir
    indices: list[int]
    unfinished: list[int]

    @property
    def name(self) -> str:
        return self.folder.name


def find_systems(results_dir: str | Path) -> list[System]:
    """The experiment directories under ``results_dir`` with at least one finished run (every run
    counts in a folder without run status), the paper's five systems first; ReportError if none."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ReportError(f"no such results folder: {root}")
    if ExperimentDir(root).has_config():
        raise ReportError(f"{root} is one experiment directory; give the folder that holds it "
                          f"(--results-dir {root.parent})")
    systems = []
    for folder in experiment_dirs(root):
        done = folder.finished_indices()
        started = folder.started_indices() or []
        if done is None:
            done = folder.metric_indices("test_accuracy_per_epoch")
        if done:
            systems.append(System(folder, done, [i for i in started if i not in done]))
    if not systems:
        raise ReportError(f"no finished run in {root}: it holds no experiment directory with a finished run "
                          "(run python -m experiments.run first, or give the folder that holds the runs)")
    order = {name: k for k, name in enumerate(plots.PAPER_COLORS)}
    return sorted(systems, key=lambda s: (order.get(s.name, len(order)), s.name))


# ---- pieces of the page -------------------------------------------------------------------------
def figure_png(fig: Figure) -> str:
    """A figure as a base64 PNG ``data:`` address, so the page holds its images."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def accuracy_by_epoch_figure(systems: Sequence[System]) -> Figure:
    """Test accuracy at every epoch, the mean over each system's finished runs, task boundaries dotted."""
    fig = Figure(figsize=(12.8, 4.0))
    ax = fig.add_subplot()
    colors = plots.algorithm_colors([s.name for s in systems])
    boundaries: set[int] = set()
    for s in systems:
        acc = np.stack([s.folder.load_metric("test_accuracy_per_epoch", i) for i in s.indices]).astype(np.float64)
        epochs = np.arange(1, acc.shape[1] + 1)
        ax.plot(epochs, 100.0 * acc.mean(axis=0), color=colors[s.name], linewidth=1.0,
                label=f"{s.name.replace('_', ' ')} (n={len(s.indices)})")
        per_task = plots.experiment_scale(s.folder.path).epochs_per_task
        boundaries.update(range(per_task, acc.shape[1], per_task))
    for b in sorted(boundaries):
        ax.axvline(b + 0.5, color="black", linewidth=0.5, linestyle=":", alpha=0.6)
    ax.set_xlabel("Epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Test accuracy (%)")
    ax.yaxis.grid(True, alpha=0.5)
    ax.legend(fontsize="small")
    return fig


def draw_figures(results_dir: Path, systems: Sequence[System]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(title, PNG address)], [why a figure was left out]) for the paper's figures and the
    epoch-by-epoch accuracy (the two wide figures, ``WIDE``, first)."""
    names = [s.name for s in systems]
    width = plots.experiment_scale(systems[0].folder.path).representation_width
    figures, skipped = [], []
    try:
        figures.append((WIDE[0], figure_png(plots.summary_figure(results_dir, names))))
    except (plots.PlotError, ResultsError) as err:
        skipped.append(f"main figure: {err}")
    figures.append((WIDE[1], figure_png(accuracy_by_epoch_figure(systems))))
    for metric in plots.PLOT_METRICS:
        algorithms = names
        if metric == "relative_accuracy_per_epoch" and plots.BASELINE not in names:
            skipped.append(f"{metric}: needs {plots.BASELINE} among the systems")
            continue
        if metric in plots.ANALYSIS_METRICS:
            algorithms = [s.name for s in systems if s.folder.metric_indices(metric)]
            if not algorithms:
                skipped.append(f"{metric}: no system is analysed (python -m experiments.analyze)")
                continue
        try:
            fig = plots.metric_figure(results_dir, algorithms, metric)
        except (plots.PlotError, ResultsError) as err:
            skipped.append(f"{metric}: {err}")
            continue
        figures.append((plots.metric_label(metric, width).split(",")[0] + f" ({metric})", figure_png(fig)))
    return figures, skipped


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _mean_se(value: tuple[float, float] | None, n: int) -> str:
    if value is None:
        return "-"
    return f"{value[0]:.2f}" if n == 1 else f"{value[0]:.2f} ± {value[1]:.2f}"


def summary_rows(results_dir: Path, systems: Sequence[System]) -> tuple[list[str], list[list[str]], str]:
    """The last-task summary table of ``lop_jax.plots`` as (headers, rows, caption)."""
    rows = plots.summary_table(results_dir, [s.name for s in systems])
    headers = ["system", "classes", "runs"] + [h for _, h in plots.TABLE_COLUMNS] + ["analysed"]
    out = []
    for row in rows:
        cells = [row["algorithm"], str(row["classes"]), str(row["n"])]
        cells += [_mean_se(row[k], row["n"]) for k, _ in plots.TABLE_COLUMNS]
        out.append(cells + [str(row["n_analysed"])])
    caption = ("At the last task, mean ± standard error over the finished runs: best test accuracy of the task, "
               f"the same minus {plots.BASELINE.replace('_', ' ')} (paired by run index), and on the last "
               "snapshot's next-task data dormant units, stable rank (% of the representation width) and "
               "effective rank; '-' where the arrays are missing (analysis: python -m experiments.analyze).")
    return headers, out, caption


def wall_time_rows(system: System) -> list[list[str]]:
    """Per run index: the recorded training, test and validation evaluation time, the total and the
    mean per epoch (from the runs' runtime arrays)."""
    rows = []
    for i in system.indices:
        parts = [float(system.folder.load_metric(m, i).sum()) if system.folder.has_metric(m, i) else 0.0
                 for m in RUNTIMES]
        epochs = system.folder.load_metric("test_accuracy_per_epoch", i).size
        rows.append([str(i)] + [format_duration(p) for p in parts]
                    + [format_duration(sum(parts)), f"{sum(parts) / max(epochs, 1):.2f} s"])
    return rows


def config_differences(systems: Sequence[System]) -> tuple[list[str], list[list[str]]]:
    """The config keys (operational ones and the name aside) whose values differ between the
    systems, as (headers, rows): one row per key, one column per system."""
    configs = {s.name: s.folder.read_config().to_dict() for s in systems if s.folder.has_config()}
    if len(configs) < 2:
        return [], []
    keys = sorted({k for c in configs.values() for k in c} - set(OPERATIONAL_KEYS) - {"experiment_name"})
    rows = [[k] + [json.dumps(c.get(k)) for c in configs.values()] for k in keys
            if len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
    return ["key", *configs], rows


def environment() -> list[list[str]]:
    """Python, platform, package versions and JAX's devices of the machine writing the report."""
    import jax

    rows = [["python", sys.version.split()[0]], ["platform", platform.platform()]]
    for name in PACKAGES:
        try:
            rows.append([name, metadata.version(name)])
        except metadata.PackageNotFoundError:
            rows.append([name, "not installed"])
    rows.append(["devices", ", ".join(f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices())])
    return rows


STYLE = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 1em 2em 3em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.3em; margin-top: 1.6em;
     border-bottom: 1px solid #ccc; padding-bottom: 0.2em; } h3 { font-size: 1.1em; margin-top: 1.2em; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
.caption { color: #555; font-size: 0.85em; max-width: 60em; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1em; }
figure { margin: 0; } figure.wide { grid-column: 1 / -1; } img { width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #444; text-align: center; }
details { margin: 0.5em 0 1em; } summary { cursor: pointer; color: #1f4e8c; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
nav a { margin-right: 1em; } .note { color: #555; font-size: 0.85em; }
table.configs td, table.environment td { text-align: left; }
"""


def build_report(results_dir: str | Path, title: str | None = None) -> str:
    """The HTML page of the study in ``results_dir`` (see the module docstring); ReportError when the
    folder is missing or has no finished run."""
    root = Path(results_dir)
    systems = find_systems(root)
    title = title or f"lop-jax study report: {root}"
    figures, skipped = draw_figures(root, systems)
    headers, rows, caption = summary_rows(root, systems)
    summaries = {s.name: summarize(s.folder, s.indices) for s in systems}
    study_seconds = sum(m.total_seconds for m in summaries.values())
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"meta\">Results folder <code>{html.escape(str(root))}</code>; "
             f"{len(systems)} systems, {sum(len(s.indices) for s in systems)} finished runs, "
             f"{html.escape(format_duration(study_seconds))} of recorded training and evaluation; written "
             f"{time.strftime('%Y-%m-%d %H:%M')} by lop-jax.</p>",
             "<nav>" + "".join(f'<a href="#{k}">{t}</a>' for k, t in (
                 ("summary", "Summary"), ("figures", "Figures"), ("systems", "Systems"),
                 ("configs", "Configs"), ("environment", "Environment"))) + "</nav>",
             '<h2 id="summary">Summary at the last task</h2>', _table(headers, rows, "summary"),
             f'<p class="caption">{html.escape(caption)}</p>',
             '<h2 id="figures">Figures</h2>',
             '<p class="caption">Per task, as the paper draws them: the mean over the finished runs with a '
             'standard-error band (lop_jax.plots).</p><div class="figures">']
    for name, src in figures:
        wide = ' class="wide"' if name in WIDE else ""
        parts.append(f'<figure{wide}><img alt="{html.escape(name)}" src="{src}">'
                     f"<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("</div>")
    if skipped:
        parts.append("<details><summary>Figures left out</summary><ul>"
                     + "".join(f"<li>{html.escape(s)}</li>" for s in skipped) + "</ul></details>")
    parts.append('<h2 id="systems">Systems</h2>')
    for s in systems:
        summary = summaries[s.name]
        seeds = f"finished runs: {index_label(s.indices)}"
        if s.unfinished:
            seeds += f"; started, not finished (left out): {index_label(s.unfinished)}"
        cells = "mean ± standard error over the runs" if len(s.indices) > 1 else "one run"
        parts += [f'<h3 id="system-{html.escape(s.name)}">{html.escape(s.name)}</h3>',
                  f"<p>{html.escape(seeds)}. Per task ({cells}):</p>", _table(*task_table(summary)),
                  "<p>Recorded wall time (training, test and validation evaluation, summed over the runs' epochs): "
                  f"{html.escape(format_duration(summary.total_seconds))} in all (runs trained together, "
                  "vmapped, record the same times and count once).</p>",
                  _table(["index", "training", "test evaluation", "validation evaluation", "total", "per epoch"],
                         wall_time_rows(s))]
    parts.append('<h2 id="configs">Configs</h2>')
    diff_headers, diff_rows = config_differences(systems)
    if diff_rows:
        parts += ["<p>Keys in which the systems' configs differ (where they are written and how often "
                  "they checkpoint aside):</p>", _table(diff_headers, diff_rows, "configs")]
    for s in systems:
        if s.folder.has_config():
            text = json.dumps(s.folder.read_config().to_dict(), indent=2)
            parts.append(f"<details><summary>{html.escape(s.name)}: config.json</summary>"
                         f"<pre>{html.escape(text)}</pre></details>")
        else:
            parts.append(f"<p>{html.escape(s.name)}: no config.json (a results folder of the reference, "
                         "read at the paper's scale).</p>")
    parts += ['<h2 id="environment">Environment</h2>',
              '<p class="note">Of the machine that wrote this report; the runs do not record theirs.</p>',
              _table(["", "version"], environment(), "environment"), "</body></html>"]
    return "\n".join(parts)


def write_report(results_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """Build the page and write it to ``out`` (default ``<results_dir>/report.html``) atomically;
    nothing is written when the folder cannot be reported on."""
    page = build_report(results_dir, title)
    path = Path(out) if out is not None else Path(results_dir) / REPORT_NAME
    atomic_write_bytes(path, page.encode("utf-8"))
    path.chmod(0o644)  # a page to share (the temporary file it was written as is private)
    return path

