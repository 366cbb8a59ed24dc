"""A sweep: every system of a config folder × several seeds, then the analysis, the small result
arrays, the figures and the summary table (issue 8's scaled protocol, but any config folder works).

The sweep is resumable at every level: a run already in the exported copy is skipped, an
interrupted one resumes from its last checkpoint (``run_experiments`` does that), an analysed run
is not analysed again, and the wall time of each run is accumulated across invocations in
``<export_dir>/sweep_timing.json``. Seeds form the outer loop, so an interrupted sweep has every
system at the first seeds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lop_jax.config import Config, ConfigError, load_config
from lop_jax.results import ExperimentDir, save_json

# the paper's five systems, in the order of its legend
SYSTEMS = ("base_deep_learning_system", "retrained_network", "head_resetting", "shrink_and_perturb",
           "continual_backpropagation")
TIMING_FILE = "sweep_timing.json"


def load_system_configs(config_dir: str | Path, systems: Sequence[str], overrides: dict[str, Any]) -> list[Config]:
    """The config of each system (``<config_dir>/<system>.json``), with the overrides applied."""
    config_dir = Path(config_dir)
    configs = []
    for name in systems:
        path = config_dir / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"--systems: no config {path}")
        configs.append(load_config(path, overrides))
    return configs


def _read_timing(results_dir: Path) -> dict[str, Any]:
    path = results_dir / TIMING_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); move it aside to start the timings afresh") from None


def _finished(exp_dir: Path, index: int) -> bool:
    return ExperimentDir(exp_dir).is_finished(index)


def _exported(export_dir: Path, system: str, index: int) -> bool:
    """Whether a finished and analysed run of ``system`` is in the exported copy."""
    from lop_jax.analysis import ANALYSIS_METRICS

    dest = ExperimentDir(export_dir / "results" / system)
    return dest.is_finished(index) and all(dest.has_metric(m, index) for m in ANALYSIS_METRICS)


def check_export_config(cfg: Config, export_dir: Path) -> None:
    """Refuse to add to (or skip runs because of) an exported copy made with another config."""
    exported = ExperimentDir(export_dir / "results" / cfg.experiment_name)
    diff = exported.config_diff(cfg, "move the exported copy aside")
    if diff:
        raise ConfigError(f"the exported runs in {exported.path} were made with another config (keys differ: "
                          f"{', '.join(diff)}); move them aside or use another --export-dir")


def run_sweep(configs: Sequence[Config], seeds: Sequence[int], results_dir: str | Path, export_dir: str | Path,
              data: Any = None, seeds_together: bool = False, log: Callable[[str], None] = print,
              verbose: bool = False, progress: bool = True, analysis_data: Any = None) -> dict[str, Any]:
    """Run, analyse and export every (system, seed) not yet in the exported copy; returns the timings.

    A run found finished in ``results_dir`` is only analysed and exported. Each run is exported as
    soon as it is analysed, so the exported copy (small enough to commit) is the sweep's lasting
    state: a sweep continued on another machine skips what it holds. ``seeds_together`` vmaps the
    seeds of a system in one process (each run is then charged its share of the wall time).

    The runs train on ``data`` (a run's ``CifarData``) or, if None, on the split the config asks
    for; the analysis always draws from the source's full split (``analysis_data``, a
    ``FullSplit``, or if None loaded once per data source), as the reference's analysis does."""
    from lop_jax.data import load_full_split, split_for_run
    from lop_jax.experiment import run_experiments

    results_dir, export_dir = Path(results_dir), Path(export_dir)
    configs = [dataclasses.replace(c, results_dir=str(results_dir)) for c in configs]
    timing = _read_timing(export_dir)
    full_cache: dict[tuple, Any] = {}
    data_cache: dict[tuple, Any] = {}
    groups = [list(seeds)] if seeds_together else [[s] for s in seeds]
    for group in groups:
        for cfg in configs:
            name, exp_dir = cfg.experiment_name, results_dir / cfg.experiment_name
            check_export_config(cfg, export_dir)
            todo = [i for i in group if not _exported(export_dir, name, i)]
            if not todo:
                continue
            source = (cfg.data_source, cfg.data_path)
            if analysis_data is None and source not in full_cache:
                full_cache[source] = load_full_split(cfg)
            full = analysis_data if analysis_data is not None else full_cache[source]
            key = source + (cfg.train_images_per_class, cfg.val_images_per_class, cfg.test_images_per_class)
            if data is None and key not in data_cache:
                data_cache[key] = split_for_run(full, cfg)
            run_data = data if data is not None else data_cache[key]
            to_run = [i for i in todo if not _finished(exp_dir, i)]
            if to_run:
                log(f"sweep: {name}, index {', '.join(map(str, to_run))}")
                t0 = time.perf_counter()
                try:
                    run_experiments(cfg, to_run, data=run_data, verbose=verbose, progress=progress, log=log)
                finally:
                    share = (time.perf_counter() - t0) / len(to_run)
                    for i in to_run:
                        entry = timing.setdefault(f"{name}/index-{i}", {"seconds": 0.0, "invocations": 0})
                        entry["seconds"] = round(entry["seconds"] + share, 2)
                        entry["invocations"] += 1
                        entry["finished"] = _finished(exp_dir, i)
                        entry["seeds_together"] = len(to_run)
                    export_dir.mkdir(parents=True, exist_ok=True)
                    save_json(export_dir / TIMING_FILE, timing)
            analyze_runs(exp_dir, todo, full, log=log, progress=progress)
            export_results(results_dir, [name], export_dir, todo)
    return timing


def analyze_runs(exp_dir: Path, indices: Sequence[int], data: Any = None, log: Callable[[str], None] = print,
                 progress: bool = True) -> list[int]:
    """Analyse (semantics §9) the runs among ``indices`` that have no analysis yet; returns those done.

    ``data`` is the source's full split (``lop_jax.data.FullSplit``), or None to load it."""
    from lop_jax.analysis import ANALYSIS_METRICS, analyze_experiment

    folder = ExperimentDir(exp_dir)
    todo = [i for i in indices if not all(folder.has_metric(m, i) for m in ANALYSIS_METRICS)]
    if todo:
        log(f"analysis: {exp_dir.name}, index {', '.join(map(str, todo))}")
        analyze_experiment(exp_dir, data=data, indices=todo, progress=progress, log=log)
    return todo


# where the files of a run were on the machine that made it: an export records the defaults instead
MACHINE_KEYS = ("data_path", "results_dir")


def exported_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config as an export records it: the machine's locations (``MACHINE_KEYS``,
    operational keys that no comparison reads) set to their defaults, so that a committed export
    names no path of the machine it was made on."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    return {k: defaults[k] if k in MACHINE_KEYS and k in defaults else v for k, v in stored.items()}


def export_results(results_dir: str | Path, systems: Sequence[str], export_dir: str | Path,
                   indices: Sequence[int]) -> list[Path]:
    """Copy the small files of the given finished runs (results arrays, analysis, config, status) to
    ``<export_dir>/results/<system>/``, so that the figures can be redrawn from a repository. Network
    weights and checkpoints are left out (large, and rebuilt by rerunning); the config is written
    as ``exported_config`` gives it."""
    results_dir, out_root = Path(results_dir), Path(export_dir) / "results"
    written = []
    for system in systems:
        src = ExperimentDir(results_dir / system)
        files = sorted(f for i in indices if src.is_finished(i) for f in src.run_files(i))
        if not files:
            continue
        dest = out_root / system
        dest.mkdir(parents=True, exist_ok=True)
        save_json(dest / src.config_path.name, exported_config(json.loads(src.config_path.read_text())))
        written.append(dest / src.config_path.name)
        for f in files:
            target = dest / f.relative_to(src.path)
            target.parent.mkdir(exist_ok=True)
            shutil.copy2(f, target)
            written.append(target)
    return written


def draw_sweep(results_dir: str | Path, systems: Sequence[str], figures_dir: str | Path,
               log: Callable[[str], None] = print) -> list[Path]:
    """Every figure (PNG only) and the summary table (text and CSV) of the systems with finished runs."""
    from lop_jax import plots

    results_dir, figures_dir = Path(results_dir), Path(figures_dir)
    present = [s for s in systems if plots.finished_indices(results_dir / s)]
    if not present:
        raise plots.PlotError(f"no finished run under {results_dir}")
    written = [p for p in plots.plot_all(results_dir, present, figures_dir, log=log) if p.suffix == ".png"]
    for p in figures_dir.glob("*.svg"):
        p.unlink()
    rows = plots.summary_table(results_dir, present)
    (figures_dir / "summary_table.txt").write_text(plots.format_table(rows) + "\n")
    written += [figures_dir / "summary_table.txt", plots.write_table_csv(rows, figures_dir / "summary_table.csv")]
    return written


def per_task_summary(results_dir: str | Path, systems: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Mean over seeds, per task, of the quantities the scaled protocol is judged on (for the report)."""
    from lop_jax import plots

    metrics = ("test_accuracy_per_epoch", "next_task_dormant_units_analysis", "next_task_stable_rank_analysis")
    out: dict[str, dict[str, list[float]]] = {}
    for system in systems:
        row = {}
        for m in metrics:
            try:
                curve = plots.metric_curves(results_dir, [system], m)[system]
            except (plots.PlotError, KeyError):
                continue
            row[m] = [round(float(v), 4) for v in np.asarray(curve.mean)]
        if row:
            out[system] = row
    return out
