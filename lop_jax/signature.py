"""Does an exported sweep show the loss-of-plasticity signature? (issue 13, item 5)

``check_signature(results_dir)`` reads only the arrays a sweep exports (``lop_jax.sweep``:
``<export>/results/<system>/<metric>/index-<N>.npy``, each system's ``config.json`` and
``run_status``, and ``<export>/sweep_timing.json``) and returns one ``Criterion`` per criterion
below; nothing is run and no data set is read. Every value is the mean over the finished runs
(seeds) of a system, with its standard error, and a criterion needs at least ``MIN_SEEDS`` seeds
(with fewer it fails, saying n).

What the arrays mean (see ``lop_jax.analysis`` and ``lop_jax.plots``):

- ``next_task_dormant_units_analysis`` (a proportion) and ``next_task_stable_rank_analysis`` (a
  count of singular values) have one entry per task-boundary snapshot: entry i is the network at
  epoch i·epochs_per_task, i.e. before task i+1. Entry 0 is the untrained initialisation and the
  last entry (num_tasks − 1) the network before the last task: the last snapshot analysed.
- The "first-task value" of the stable rank is entry 1, the network after the first task: the
  first representation learned from data. Entry 0 measures random weights, whose rank says
  nothing about what training does to the representation, so the drop is measured from entry 1.
  The dormant-units trend is fitted over entries 1..last for the same reason.
- The representation width is 8 · network_width (the pooled features), from ``config.json``.
- ``test_accuracy_per_epoch`` has num_tasks · epochs_per_task entries; the accuracy of a task is
  the best test accuracy over its epochs (what the paper plots), in percent. Differences to the
  retrained network are taken seed by seed (same run index, so the same class order).

The criteria (issue 13):

1. base dormant units at the last snapshot ≥ 20 %;
2. base dormant units rise over tasks: least-squares slope of the seed-mean over entries 1..last > 0;
3. continual backpropagation (CBP) dormant units at the last snapshot ≤ 5 %;
4. base stable rank at the last snapshot ≥ 10 % of the width below its first-task value;
5. CBP stable rank at the last snapshot within 5 % of its first-task value;
6. base minus retrained best accuracy per task falls over tasks (slope < 0);
7. that difference is below zero at the last task;
8. CBP minus retrained at the last task ≥ 0;
9. every exported run took at most 15 min of wall time (``sweep_timing.json``).

``compare_with_paper(results_dir)`` gives, for information, the five systems' last-task dormant
units, stable rank (% of width) and accuracy minus retrained, and whether their order matches
the paper's at 100 classes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lop_jax.config import ConfigError
from lop_jax.errors import InputError
from lop_jax.results import ExperimentDir, ResultsError

BASE = "base_deep_learning_system"
RETRAINED = "retrained_network"
CBP = "continual_backpropagation"
SHRINK_PERTURB = "shrink_and_perturb"
HEAD_RESETTING = "head_resetting"
REQUIRED_SYSTEMS = (BASE, RETRAINED, CBP)
INFO_SYSTEMS = (RETRAINED, CBP, SHRINK_PERTURB, HEAD_RESETTING, BASE)
DORMANT = "next_task_dormant_units_analysis"
STABLE_RANK = "next_task_stable_rank_analysis"
ACCURACY = "test_accuracy_per_epoch"
TIMING_FILE = "sweep_timing.json"

# The thresholds of issue 13's criteria ("Loss of plasticity visible on a laptop").
MIN_SEEDS = 3  # seeds per system a criterion needs
BASE_DORMANT_MIN = 20.0  # % of units, base system, last snapshot
CBP_DORMANT_MAX = 5.0  # % of units, CBP, last snapshot
BASE_RANK_DROP_MIN = 10.0  # % of the representation width, base system, first task → last snapshot
CBP_RANK_CHANGE_MAX = 5.0  # % of CBP's own first-task stable rank
MAX_RUN_MINUTES = 15.0  # wall time of every run

# The paper's order at 100 classes (semantics §10), best first; systems in one tuple are level (≈).
PAPER_ORDER = {
    "accuracy minus retrained (points)": ((RETRAINED, CBP), (SHRINK_PERTURB,), (HEAD_RESETTING,), (BASE,)),
    "dormant units (%)": ((CBP,), (SHRINK_PERTURB,), (HEAD_RESETTING,), (BASE,)),
    "stable rank (% of width)": ((CBP,), (HEAD_RESETTING, SHRINK_PERTURB), (BASE,)),
}
LOWER_IS_BETTER = {"dormant units (%)"}


class SignatureError(InputError, ValueError):
    """The export cannot be judged (no finished run, a system missing); the message is one line."""


@dataclass(frozen=True)
class Criterion:
    """One criterion: ``value ± spread`` (standard error over seeds, None when not defined) compared
    with ``threshold`` by ``op`` ('>=', '>', '<=', '<'); ``n`` is the number of seeds (runs)."""

    name: str
    value: float | None
    spread: float | None
    threshold: float
    op: str
    passed: bool
    n: int
    unit: str = ""
    note: str = ""


@dataclass(frozen=True)
class SystemValues:
    """Last-task values of one system (mean ± standard error over its seeds), for the comparison."""

    system: str
    n: int
    dormant: tuple[float, float | None] | None
    stable_rank: tuple[float, float | None] | None
    accuracy_minus_retrained: tuple[float, float | None] | None


@dataclass(frozen=True)
class OrderCheck:
    """Whether the systems' order on one quantity matches the paper's (None: a system is missing)."""

    quantity: str
    observed: tuple[str, ...]
    paper: str
    matches: bool | None


@dataclass(frozen=True)
class System:
    """The finished runs of one system in an export: arrays per metric, per run index."""

    name: str
    num_tasks: int
    epochs_per_task: int
    width: int
    indices: tuple[int, ...]
    path: Path

    def arrays(self, metric: str, expected: int) -> dict[int, np.ndarray]:
        out = {}
        folder = ExperimentDir(self.path)
        for i in self.indices:
            p = folder.metric_path(metric, i)
            if not folder.has_metric(metric, i):
                raise SignatureError(f"missing {p} of a finished run: rerun the sweep's analysis and export")
            try:
                a = np.asarray(folder.load_metric(metric, i), np.float64).ravel()
            except ResultsError as err:
                raise SignatureError(err.one_line()) from None
            if a.size != expected:
                raise SignatureError(f"{p} has {a.size} values, {expected} expected")
            out[i] = a
        return out

    def dormant_percent(self) -> dict[int, np.ndarray]:
        return {i: 100.0 * a for i, a in self.arrays(DORMANT, self.num_tasks).items()}

    def stable_rank(self) -> dict[int, np.ndarray]:
        return self.arrays(STABLE_RANK, self.num_tasks)

    def best_accuracy(self) -> dict[int, np.ndarray]:
        """Per run, the best test accuracy (%) of each task."""
        raw = self.arrays(ACCURACY, self.num_tasks * self.epochs_per_task)
        return {i: 100.0 * a.reshape(self.num_tasks, self.epochs_per_task).max(axis=1) for i, a in raw.items()}


def load_system(results_dir: str | Path, name: str) -> System | None:
    """The finished runs of ``name`` in an export's results folder; None when it has none."""
    folder = ExperimentDir(Path(results_dir) / name)
    try:
        indices = tuple(folder.finished_indices() or ())
        if not indices:
            return None
        if not folder.has_config():
            raise SignatureError(f"no config.json in {folder.path}: the export is incomplete")
        cfg = folder.read_config()
    except (ResultsError, ConfigError) as err:
        raise SignatureError(f"cannot read {folder.path}: {err.one_line()}") from None
    return System(name, cfg.num_tasks, cfg.epochs_per_task, 8 * cfg.network_width, indices, folder.path)


def load_systems(results_dir: str | Path) -> dict[str, System]:
    """The systems of an export's results folder that have finished runs; refuses an export that
    has none, lacks a system the criteria need, or is too short to judge."""
    results_dir = Path(results_dir)
    names = sorted(p.name for p in results_dir.iterdir() if p.is_dir()) if results_dir.is_dir() else []
    systems = {n: s for n in names if (s := load_system(results_dir, n)) is not None}
    if not systems:
        raise SignatureError(f"no finished runs in {results_dir}: run the sweep (python -m experiments.scaled_sweep)")
    missing = [s for s in REQUIRED_SYSTEMS if s not in systems]
    if missing:
        raise SignatureError(f"{results_dir} has no finished run of {', '.join(missing)}, which the criteria need")
    short = [s.name for s in systems.values() if s.num_tasks < 3]
    if short:
        raise SignatureError(f"{short[0]} has fewer than 3 tasks: the trends over tasks cannot be judged")
    return systems


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample standard deviation / √n; None for a single value)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, None
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return float(v.mean()), se


def slope(y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` against 0, 1, 2, … (per step)."""
    y = np.asarray(y, np.float64)
    x = np.arange(y.size, dtype=np.float64)
    x -= x.mean()
    return float(np.dot(x, y - y.mean()) / np.dot(x, x))


_COMPARE = {">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t,
            "|x| <=": lambda v, t: abs(v) <= t}


def _criterion(name: str, per_seed: Sequence[float], threshold: float, op: str, unit: str,
               value: float | None = None, note: str = "") -> Criterion:
    """A criterion on the mean of per-seed values (``value`` overrides the mean); fails under MIN_SEEDS."""
    mean, se = mean_se(per_seed)
    value = mean if value is None else value
    n = len(per_seed)
    passed = n >= MIN_SEEDS and not math.isnan(value) and _COMPARE[op](value, threshold)
    if n < MIN_SEEDS:
        note = f"n={n} seeds, {MIN_SEEDS} needed" + (f"; {note}" if note else "")
    return Criterion(name, value, se, threshold, op, passed, n, unit, note)


def _paired(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """a − b, run index by run index (the indices both have)."""
    return {i: a[i] - b[i] for i in sorted(set(a) & set(b))}


def _read_timing(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SignatureError(f"{path} is not valid JSON ({err})") from None


def check_signature(results_dir: str | Path, timing: dict | None = None) -> list[Criterion]:
    """The issue's nine criteria on an export's results folder (``<export>/results``), from its
    arrays alone; ``timing`` defaults to ``<export>/sweep_timing.json``. Raises ``SignatureError``
    when the export cannot be judged."""
    results_dir = Path(results_dir)
    systems = load_systems(results_dir)
    if timing is None:
        timing = _read_timing(results_dir.parent / TIMING_FILE)
    base, cbp, retrained = systems[BASE], systems[CBP], systems[RETRAINED]
    out = []

    dormant = base.dormant_percent()
    out.append(_criterion("base dormant units at the last snapshot", [a[-1] for a in dormant.values()],
                          BASE_DORMANT_MIN, ">=", "%"))
    trend = [slope(a[1:]) for a in dormant.values()]
    mean_curve = np.mean(list(dormant.values()), axis=0)
    out.append(_criterion("base dormant units rising over tasks (slope, snapshots 1..last)", trend, 0.0, ">",
                          "points/task", value=slope(mean_curve[1:])))
    out.append(_criterion("CBP dormant units at the last snapshot",
                          [a[-1] for a in cbp.dormant_percent().values()], CBP_DORMANT_MAX, "<=", "%"))

    drop = [100.0 * (a[1] - a[-1]) / base.width for a in base.stable_rank().values()]
    out.append(_criterion("base stable rank drop, first task to last snapshot", drop, BASE_RANK_DROP_MIN, ">=",
                          f"% of width {base.width}"))
    # "within 5 %" either way: the signed change, compared by its size
    change = [100.0 * (a[-1] - a[1]) / a[1] for a in cbp.stable_rank().values()]
    out.append(_criterion("CBP stable rank change, first task to last snapshot", change, CBP_RANK_CHANGE_MAX,
                          "|x| <=", "% of its first-task value"))

    base_minus = _paired(base.best_accuracy(), retrained.best_accuracy())
    per_seed_slope = [slope(d) for d in base_minus.values()]
    mean_diff = np.mean(list(base_minus.values()), axis=0) if base_minus else np.full(base.num_tasks, np.nan)
    out.append(_criterion("base minus retrained best accuracy falling over tasks (slope)", per_seed_slope, 0.0, "<",
                          "points/task", value=slope(mean_diff) if base_minus else math.nan))
    out.append(_criterion("base minus retrained best accuracy at the last task",
                          [d[-1] for d in base_minus.values()], 0.0, "<", "points"))
    cbp_minus = _paired(cbp.best_accuracy(), retrained.best_accuracy())
    out.append(_criterion("CBP minus retrained best accuracy at the last task",
                          [d[-1] for d in cbp_minus.values()], 0.0, ">=", "points"))

    out.append(_wall_time(systems, timing))
    return out


def _wall_time(systems: dict[str, System], timing: dict) -> Criterion:
    """Criterion 9: every finished run of every exported system within MAX_RUN_MINUTES."""
    minutes, missing, over = [], [], []
    for s in systems.values():
        for i in s.indices:
            key = f"{s.name}/index-{i}"
            entry = timing.get(key)
            if not isinstance(entry, dict) or "seconds" not in entry:
                missing.append(key)
                continue
            m = float(entry["seconds"]) / 60.0
            minutes.append(m)
            if m > MAX_RUN_MINUTES:
                over.append(f"{key} {m:.1f} min")
    notes = []
    if missing:
        notes.append(f"no timing entry for {', '.join(missing)}")
    if over:
        notes.append(f"over: {', '.join(over)}")
    n = len(minutes) + len(missing)
    value = max(minutes) if minutes else math.nan
    passed = not missing and not over and bool(minutes)
    return Criterion("every run's wall time (the slowest run)", value, None, MAX_RUN_MINUTES, "<=", passed, n, "min",
                     "; ".join(notes))


def _last_values(s: System, retrained_best: dict[int, np.ndarray]) -> SystemValues:
    dormant = mean_se([a[-1] for a in s.dormant_percent().values()])
    rank = mean_se([100.0 * a[-1] / s.width for a in s.stable_rank().values()])
    diff = _paired(s.best_accuracy(), retrained_best)
    acc = mean_se([d[-1] for d in diff.values()]) if diff else None
    return SystemValues(s.name, len(s.indices), dormant, rank, acc)


def _order_matches(values: dict[str, float], groups: tuple[tuple[str, ...], ...], lower_is_better: bool) -> bool:
    """Whether every system of a group is strictly better than every system of the groups after it."""
    sign = -1.0 if lower_is_better else 1.0
    for g, group in enumerate(groups):
        for later in groups[g + 1:]:
            if any(sign * values[a] <= sign * values[b] for a in group for b in later):
                return False
    return True


def compare_with_paper(results_dir: str | Path) -> tuple[list[SystemValues], list[OrderCheck]]:
    """For information: the last-task values of the five systems (those exported) and whether their
    order on each quantity matches the paper's at 100 classes (semantics §10)."""
    systems = load_systems(results_dir)
    retrained_best = systems[RETRAINED].best_accuracy()
    rows = [_last_values(systems[name], retrained_best) for name in INFO_SYSTEMS if name in systems]
    by_name = {r.system: r for r in rows}
    field_of = {"accuracy minus retrained (points)": "accuracy_minus_retrained", "dormant units (%)": "dormant",
                "stable rank (% of width)": "stable_rank"}
    checks = []
    for quantity, groups in PAPER_ORDER.items():
        lower = quantity in LOWER_IS_BETTER
        needed = [s for g in groups for s in g]
        paper = (" < " if lower else " > ").join(" ≈ ".join(g) for g in groups)
        got = {s: getattr(by_name[s], field_of[quantity]) for s in needed if s in by_name}
        values = {s: v[0] for s, v in got.items() if v is not None}
        observed = tuple(sorted(values, key=lambda s: values[s], reverse=not lower))
        matches = _order_matches(values, groups, lower) if len(values) == len(needed) else None
        checks.append(OrderCheck(quantity, observed, paper, matches))
    return rows, checks


def _number(v: float | None, spread: float | None = None, fmt: str = "{:.2f}") -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return fmt.format(v) + (f" ± {fmt.format(spread)}" if spread is not None else "")


def format_criterion(c: Criterion) -> str:
    """One line: PASS/FAIL, the criterion, its value ± spread, the threshold, n and any note."""
    line = (f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {_number(c.value, c.spread)} {c.unit} "
            f"(needs {c.op} {c.threshold:g}; n={c.n})")
    return line + (f" - {c.note}" if c.note else "")


def _cell(v: tuple[float, float | None] | None) -> str:
    return "n/a" if v is None else _number(*v)


def format_comparison(rows: Sequence[SystemValues], checks: Sequence[OrderCheck]) -> list[str]:
    """Lines of the information block: values per system, then the order checks."""
    lines = ["information (not pass/fail): last task, mean ± s.e. over seeds"]
    for r in rows:
        lines.append(f"  {r.system} (n={r.n}): dormant units {_cell(r.dormant)} %, stable rank "
                     f"{_cell(r.stable_rank)} % of width, accuracy minus retrained {_cell(r.accuracy_minus_retrained)} "
                     "points")
    for c in checks:
        verdict = {True: "matches", False: "differs from", None: "cannot be compared with (systems missing)"}[c.matches]
        lines.append(f"  order of {c.quantity}: {', '.join(c.observed)} - {verdict} the paper's ({c.paper})")
    return lines


def report_lines(results_dir: str | Path) -> tuple[list[str], list[Criterion]]:
    """The criteria, one line each, then the comparison with the paper's order: what
    ``python -m experiments.scaled_sweep --check`` prints and docs/scaled_protocol.md shows."""
    criteria = check_signature(results_dir)
    lines = [format_criterion(c) for c in criteria] + format_comparison(*compare_with_paper(results_dir))
    return lines, criteria
