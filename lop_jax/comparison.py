"""The plasticity methods beside the paper's five systems on one protocol (issue 16, item 3).

A comparison reads two sweep exports of the same protocol (``lop_jax.sweep``): the paper's
systems (``docs/scaled_protocol/results``) and the methods (``docs/methods_comparison/results``).
Nothing is run and no data set is read. Each system or method is judged as the laptop protocol's
check judges the systems (``lop_jax.signature``), from its finished runs (seeds), mean ± standard
error over them, at the last analysed snapshot and the last task:

- dormant units (%) and their trend over snapshots 1..last;
- stable rank, as % of the representation width and as the change from its first-task value;
- best test accuracy of the last task, and its difference to the retrained network, seed by seed
  (the same run index has the same class order in both exports), with its trend over tasks.

``keeps plasticity`` applies the three criteria the laptop protocol asks of CBP (dormant units
≤ 5 %, stable rank within 5 % of its first-task value, accuracy at or above the retrained
network's), each on the mean over at least ``MIN_SEEDS`` seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lop_jax import plots
from lop_jax.signature import (
    CBP_DORMANT_MAX,
    CBP_RANK_CHANGE_MAX,
    INFO_SYSTEMS,
    MIN_SEEDS,
    RETRAINED,
    SignatureError,
    System,
    load_system,
    mean_se,
    slope,
)

Stat = tuple[float, float | None]


@dataclass(frozen=True)
class Row:
    """One system's or method's values: mean ± standard error over its ``n`` seeds."""

    name: str
    source: str  # "paper system" or "method"
    n: int
    dormant: Stat
    dormant_slope: Stat
    stable_rank_percent: Stat
    stable_rank_change: Stat
    best_accuracy: Stat
    minus_retrained: Stat | None
    minus_retrained_slope: Stat | None

    @property
    def keeps_plasticity(self) -> bool:
        """The laptop protocol's three CBP criteria on this row's means, with enough seeds."""
        if self.n < MIN_SEEDS or self.minus_retrained is None:
            return False
        return (self.dormant[0] <= CBP_DORMANT_MAX and abs(self.stable_rank_change[0]) <= CBP_RANK_CHANGE_MAX
                and self.minus_retrained[0] >= 0.0)


@dataclass(frozen=True)
class Comparison:
    """The loaded systems and methods, in the order they are shown."""

    systems: dict[str, System]
    sources: dict[str, str]

    @property
    def names(self) -> list[str]:
        return list(self.systems)


def load_comparison(paper_results: str | Path, methods_results: str | Path,
                    methods: Sequence[str] | None = None) -> Comparison:
    """The paper's systems that ``paper_results`` has, then the methods of ``methods_results``
    (``methods``: those named, in that order; default every folder with finished runs). Refuses
    two exports of different protocols and a methods export without any finished run."""
    paper_results, methods_results = Path(paper_results), Path(methods_results)
    systems: dict[str, System] = {}
    sources: dict[str, str] = {}
    for name in INFO_SYSTEMS[::-1]:
        s = load_system(paper_results, name)
        if s is not None:
            systems[name], sources[name] = s, "paper system"
    if RETRAINED not in systems:
        raise SignatureError(f"{paper_results} has no finished run of {RETRAINED}: nothing to measure accuracy against")
    if methods is None:
        methods = sorted(p.name for p in methods_results.iterdir() if p.is_dir()) if methods_results.is_dir() else []
    found = 0
    for name in methods:
        if name in systems:
            raise SignatureError(f"method '{name}' has the name of one of the paper's systems")
        s = load_system(methods_results, name)
        if s is None:
            continue
        scale = (s.num_tasks, s.epochs_per_task, s.width)
        ref = systems[RETRAINED]
        if scale != (ref.num_tasks, ref.epochs_per_task, ref.width):
            raise SignatureError(f"{name} (tasks, epochs per task, width {scale}) was not run at the protocol of "
                                 f"{paper_results} ({(ref.num_tasks, ref.epochs_per_task, ref.width)})")
        systems[name], sources[name] = s, "method"
        found += 1
    if not found:
        raise SignatureError(f"no finished run of a method in {methods_results}: run the methods' sweep first")
    return Comparison(systems, sources)


def _stat(values: Sequence[float]) -> Stat:
    return mean_se(list(values))


def rows(comparison: Comparison) -> list[Row]:
    """One ``Row`` per system and method, in the comparison's order."""
    retrained = comparison.systems[RETRAINED].best_accuracy()
    out = []
    for name, s in comparison.systems.items():
        dormant = s.dormant_percent()
        rank = s.stable_rank()
        best = s.best_accuracy()
        diff = {i: best[i] - retrained[i] for i in sorted(set(best) & set(retrained))}
        has_diff = bool(diff) and name != RETRAINED
        out.append(Row(
            name=name, source=comparison.sources[name], n=len(s.indices),
            dormant=_stat(a[-1] for a in dormant.values()),
            dormant_slope=_stat(slope(a[1:]) for a in dormant.values()),
            stable_rank_percent=_stat(100.0 * a[-1] / s.width for a in rank.values()),
            stable_rank_change=_stat(100.0 * (a[-1] - a[1]) / a[1] for a in rank.values()),
            best_accuracy=_stat(a[-1] for a in best.values()),
            minus_retrained=_stat(d[-1] for d in diff.values()) if has_diff else None,
            minus_retrained_slope=_stat(slope(d) for d in diff.values()) if has_diff else None))
    return out


def _fmt(v: Stat | None, fmt: str = "{:.1f}", signed: bool = False) -> str:
    if v is None or math.isnan(v[0]):
        return "–"
    f = fmt.replace("{:", "{:+") if signed else fmt
    return f.format(v[0]) + (f" ± {fmt.format(v[1])}" if v[1] is not None else "")


def markdown_table(table_rows: Sequence[Row], classes: int) -> str:
    """The comparison as a Markdown table (last snapshot and last task; ``classes`` at the last task)."""
    head = ("| system or method | n | dormant units (%) | stable rank (% of width) | "
            "stable rank change from the first task (%) | "
            f"best accuracy at {classes} classes (%) | minus retrained (points) | minus retrained, slope "
            "(points/task) | keeps plasticity |")
    lines = [head, "| " + " | ".join(["---"] * 9) + " |"]
    for r in table_rows:
        keeps = "–" if r.name == RETRAINED else ("yes" if r.keeps_plasticity else "no")
        label = r.name if r.source == "paper system" else f"**{r.name}**"
        lines.append(f"| {label} | {r.n} | {_fmt(r.dormant)} | {_fmt(r.stable_rank_percent, '{:.0f}')} | "
                     f"{_fmt(r.stable_rank_change, signed=True)} | {_fmt(r.best_accuracy)} | "
                     f"{_fmt(r.minus_retrained, signed=True)} | {_fmt(r.minus_retrained_slope, '{:.2f}', True)} | "
                     f"{keeps} |")
    return "\n".join(lines)


def last_classes(comparison: Comparison) -> int:
    """Classes seen in the last task of the protocol (from the retrained network's config)."""
    folder = comparison.systems[RETRAINED].path
    from lop_jax.results import ExperimentDir

    cfg = ExperimentDir(folder).read_config()
    return cfg.num_tasks * cfg.classes_per_task


def _band(ax, x: np.ndarray, per_seed: dict[int, np.ndarray], color: str, label: str, style: str) -> None:
    values = np.stack(list(per_seed.values()))
    mean = values.mean(axis=0)
    se = values.std(axis=0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
    ax.plot(x, mean, style, color=color, linewidth=1.5, label=f"{label} (n={len(values)})")
    ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.2, linewidth=0)


def figure(comparison: Comparison) -> Figure:
    """Three panels over the classes seen: accuracy minus the retrained network (per task), dormant
    units and stable rank (% of width) of the snapshots after tasks 1..last−1; paper systems solid,
    methods dashed, mean ± standard error over seeds."""
    retrained = comparison.systems[RETRAINED].best_accuracy()
    cpt = last_classes(comparison) // comparison.systems[RETRAINED].num_tasks
    colors = plots.algorithm_colors(comparison.names)
    fig = Figure(figsize=(16.0, 5.2))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
    for name, s in comparison.systems.items():
        style = "-" if comparison.sources[name] == "paper system" else "--"
        label = name.replace("_", " ")
        best = s.best_accuracy()
        if name != RETRAINED:
            diff = {i: best[i] - retrained[i] for i in sorted(set(best) & set(retrained))}
            if diff:
                _band(axes[0], cpt * np.arange(1, s.num_tasks + 1), diff, colors[name], label, style)
            snap_x = cpt * np.arange(1, s.num_tasks)
            _band(axes[1], snap_x, {i: a[1:] for i, a in s.dormant_percent().items()}, colors[name], label, style)
            _band(axes[2], snap_x, {i: 100.0 * a[1:] / s.width for i, a in s.stable_rank().items()}, colors[name],
                  label, style)
    axes[0].axhline(0.0, color="black", linewidth=0.8)
    ylabels = ("Best test accuracy minus retrained network (points)", "Dormant units (%), next task's data",
               f"Stable rank (% of {comparison.systems[RETRAINED].width}), next task's data")
    for ax, yl in zip(axes, ylabels, strict=True):
        ax.set_xticks(cpt * np.arange(1, comparison.systems[RETRAINED].num_tasks + 1))
        ax.set_xlabel(plots.X_LABEL)
        ax.set_ylabel(yl)
        ax.yaxis.grid(True, alpha=0.5)
    axes[0].legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    return fig
