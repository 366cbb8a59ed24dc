"""Live tracking of runs in TensorBoard or Weights & Biases: optional, off by default.

    python -m experiments.run --config C --experiment-index 0-4 --log tensorboard   (or wandb, or both)
    python -m experiments.analyze --results-dir R/<experiment_name> --log tensorboard

Each run index is one tracked run, named ``<experiment_name>/index-<N>`` in the group
``<experiment_name>``, so the seeds of a system sit together. The run loop calls ``Tracking`` at
its record and end-of-task stages; the values come from the run's own result arrays
(``lop_jax.records``), so what is tracked is what is saved. Logged, with the x axis of each:

    per epoch (``epoch``: epochs done)         test/accuracy, test/loss, validation/accuracy,
                                               validation/loss, time/epoch, time/test_evaluation,
                                               time/validation_evaluation, and each plasticity
                                               method's per-step metric as method/<name> (e.g.
                                               method/replaced_units; a vector metric as its
                                               sum, method/<name>/sum, and one tag per element)
    per train summary (``train/summary``)      train/accuracy, train/loss: the running means of
                                               every ``running_avg_window`` steps, entry by entry
                                               of the train_*_per_checkpoint arrays
    per task boundary (``tasks_done``)         each method's task-boundary metric as task/<name>
    after the analysis (``tasks_done``)        analysis/<metric> for every snapshot (the tasks
                                               done when it was taken), and
                                               analysis/final_accuracy_on_task at task t: the final
                                               network's mean accuracy on task t's classes
                                               (accuracy_per_class_in_order)

Backends. ``tensorboard``: event files written with the tensorboard package's own writer and
summary protos (no TensorFlow), one folder per index (``ExperimentDir.tensorboard_path``); view
them with ``tensorboard --logdir <results_dir>``. ``wandb``: in offline mode unless ``WANDB_MODE``
says otherwise (no network, no login; ``wandb sync`` uploads later), its folders under the
experiment directory, the project from ``WANDB_PROJECT`` (default ``lop-jax``), and a run id made
from the run's name (and the number of ``--restart``s), so a resumed run and its later analysis
continue the same W&B run.

Neither package is imported unless asked for; a missing one is a one-line ``TrackingError``
naming the extra to install (``pip install 'lop-jax[track]'``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lop_jax.config import Config
from lop_jax.errors import InputError

if TYPE_CHECKING:  # the command-line parsing (parse_kinds, check_available) loads no JAX
    from lop_jax.records import RunResults
    from lop_jax.results import ExperimentDir

KINDS = ("tensorboard", "wandb")
EXTRA = "track"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
# the x axes: epochs done, train-summary entries, tasks done
EPOCH, SUMMARY, TASKS = "epoch", "train/summary", "tasks_done"
EPOCH_TAGS = {"test/accuracy": "test_accuracy_per_epoch", "test/loss": "test_loss_per_epoch",
              "validation/accuracy": "validation_accuracy_per_epoch", "validation/loss": "validation_loss_per_epoch",
              "time/epoch": "epoch_runtime", "time/test_evaluation": "test_evaluation_runtime",
              "time/validation_evaluation": "validation_evaluation_runtime"}
SUMMARY_TAGS = {"train/accuracy": "train_accuracy_per_checkpoint", "train/loss": "train_loss_per_checkpoint"}
CLASS_ACCURACY = "accuracy_per_class_in_order"


class TrackingError(InputError, ValueError):
    """``--log`` names an unknown tracker, or one whose package is not installed."""


def parse_kinds(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """The trackers of ``--log``: ``"tensorboard"``, ``"wandb"``, a comma list of them, or a list of
    such strings (a repeated option); None or empty means none."""
    parts = [text] if isinstance(text, str) else list(text or ())
    kinds: list[str] = []
    for name in (n.strip() for part in parts for n in part.split(",")):
        if not name:
            continue
        if name not in KINDS:
            raise TrackingError(f"--log: unknown tracker {name!r}; expected {' or '.join(KINDS)} "
                                "(or both, comma-separated)")
        if name not in kinds:
            kinds.append(name)
    return tuple(kinds)


def check_available(kinds: Iterable[str]) -> None:
    """Refuse, before any work, a tracker whose package is missing (without importing it)."""
    for kind in kinds:
        if importlib.util.find_spec(_PACKAGES[kind]) is None:
            raise TrackingError(f"--log {kind} needs the {_PACKAGES[kind]} package, which is not installed: "
                                f"pip install 'lop-jax[{EXTRA}]'")


class Backend(Protocol):
    """One tracked run in one tool."""

    def log(self, axis: str, step: int, values: Mapping[str, float]) -> None:
        """Write ``values`` at ``step`` of the x axis ``axis`` (``EPOCH``, ``SUMMARY`` or ``TASKS``)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardRun:
    """A run's event files, written with tensorboard's own ``EventFileWriter`` (no TensorFlow)."""

    def __init__(self, folder: ExperimentDir, index: int):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        self.path = folder.tensorboard_path(index)
        self._writer = EventFileWriter(str(self.path))

    def log(self, axis: str, step: int, values: Mapping[str, float]) -> None:
        value = self._summary.Value
        summary = self._summary(value=[value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self._writer.add_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbRun:
    """A W&B run, offline unless ``WANDB_MODE`` says otherwise; each x axis declared with
    ``define_metric`` so the epochs, summaries and tasks need no shared step counter."""

    def __init__(self, folder: ExperimentDir, cfg: Config, index: int, job_type: str):
        import wandb

        from lop_jax.results import ExperimentDir

        name = ExperimentDir.run_name(cfg.experiment_name, index)
        restarts = folder.times_moved_aside(index)  # a run started over with --restart is a new W&B run
        run_id = wandb_run_id(name + (f"-restart-{restarts}" if restarts else ""))
        folder.wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lop-jax", name=name,
                              group=cfg.experiment_name, job_type=job_type, id=run_id,
                              resume="allow", dir=str(folder.wandb_dir.parent), config=cfg.to_dict(),
                              mode=os.environ.get("WANDB_MODE") or "offline", reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))
        for axis, prefixes in ((EPOCH, ("test/*", "validation/*", "time/*", "method/*")),
                               (SUMMARY, ("train/*",)), (TASKS, ("task/*", "analysis/*"))):
            self.run.define_metric(axis, hidden=True)
            for prefix in prefixes:
                self.run.define_metric(prefix, step_metric=axis)

    def log(self, axis: str, step: int, values: Mapping[str, float]) -> None:
        self.run.log({axis: int(step), **{tag: float(v) for tag, v in values.items()}})

    def flush(self) -> None:
        """W&B writes on its own; nothing to do."""

    def close(self) -> None:
        self.run.finish()


def wandb_run_id(name: str) -> str:
    """A W&B run id from a run name: characters W&B refuses in ids become ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def open_run(kind: str, folder: ExperimentDir, cfg: Config, index: int, job_type: str = "train") -> Backend:
    """One tracked run of ``kind`` for run ``index`` of the experiment in ``folder``."""
    check_available([kind])
    if kind == "tensorboard":
        return TensorBoardRun(folder, index)
    return WandbRun(folder, cfg, index, job_type)


def _expand(tag: str, value: Any) -> dict[str, float]:
    """A scalar as itself; an array as its sum (``<tag>/sum``) and one tag per element (``<tag>/<i>``,
    ``<tag>/<i>_<j>``, …, zero-padded so the tags sort in order)."""
    value = np.asarray(value)
    if value.ndim == 0:
        return {tag: float(value)}
    width = len(str(max(value.shape) - 1))
    out = {f"{tag}/sum": float(value.sum())}
    for at in np.ndindex(value.shape):
        out[f"{tag}/{'_'.join(str(i).zfill(width) for i in at)}"] = float(value[at])
    return out


def epoch_values(record: RunResults, epoch: int) -> dict[str, float]:
    """What a run's arrays hold for ``epoch`` (0-based): evaluations, times, the methods' metrics."""
    from lop_jax.records import step_metric_array

    values = {tag: float(record.arrays[name][epoch]) for tag, name in EPOCH_TAGS.items()}
    for name in record.step_metrics:
        values.update(_expand(f"method/{name}", record.arrays[step_metric_array(name)][epoch]))
    return values


def analysis_values(cfg: Config, results: Mapping[str, np.ndarray]) -> list[dict[str, float]]:
    """The analysis arrays of one run as one row of values per x step of the ``tasks_done`` axis.

    Row i holds each snapshot metric of the network after i tasks (i = 0 … num_tasks - 1, as the
    arrays are indexed; the previous-tasks ones from i = 1), and, at i = 1 … num_tasks,
    ``analysis/final_accuracy_on_task``: the final network's mean accuracy on the classes of task i
    (from ``accuracy_per_class_in_order``)."""
    rows: list[dict[str, float]] = [{} for _ in range(cfg.num_tasks + 1)]
    for name, array in results.items():
        array = np.asarray(array, np.float64)
        if name == CLASS_ACCURACY:
            per_task = array[:cfg.num_classes].reshape(cfg.num_tasks, cfg.classes_per_task).mean(axis=1)
            for task, v in enumerate(per_task, start=1):
                rows[task]["analysis/final_accuracy_on_task"] = float(v)
        else:  # the previous-tasks metrics have no value before the first task ends
            first = 1 if name.startswith("previous_tasks_") else 0
            for tasks_done in range(first, cfg.num_tasks):
                rows[tasks_done][f"analysis/{name}"] = float(array[tasks_done])
    return rows


class Tracking:
    """The tracked runs of the indices trained together, fed from their records by the run loop;
    with no tracker asked for, every call does nothing."""

    def __init__(self, runs: Sequence[Sequence[Backend]] = (), summaries_done: Sequence[int] = ()):
        self.runs = [list(r) for r in runs]
        self.summaries_done = list(summaries_done)

    @classmethod
    def open(cls, kinds: Sequence[str], cfg: Config, folder: ExperimentDir, records: Sequence[RunResults]) -> Tracking:
        """One tracked run per record and tracker, opened after the records were resumed: the
        train summaries a resumed run already has are not logged again."""
        tracking = cls([], [r.train_summary_pos for r in records])
        try:
            for record in records:
                tracking.runs.append([])
                for kind in kinds:
                    tracking.runs[-1].append(open_run(kind, folder, cfg, record.index))
        except BaseException:
            tracking.close()
            raise
        return tracking

    def epoch(self, epoch: int, records: Sequence[RunResults]) -> None:
        """After the record stage of ``epoch`` (0-based): its values and the new train summaries."""
        for k, (backends, record) in enumerate(zip(self.runs, records, strict=False)):
            values = epoch_values(record, epoch)
            summaries = range(self.summaries_done[k], record.train_summary_pos)
            for backend in backends:
                for pos in summaries:
                    backend.log(SUMMARY, pos + 1, {tag: record.arrays[name][pos] for tag, name in SUMMARY_TAGS.items()})
                backend.log(EPOCH, epoch + 1, values)
                backend.flush()
            self.summaries_done[k] = record.train_summary_pos

    def task_boundary(self, task: int, records: Sequence[RunResults]) -> None:
        """After the task-boundary hook that follows task ``task`` (0-based): the methods' task metrics."""
        from lop_jax.records import task_metric_array

        for backends, record in zip(self.runs, records, strict=False):
            values: dict[str, float] = {}
            for name in record.task_metrics:
                values.update(_expand(f"task/{name}", record.arrays[task_metric_array(name)][task]))
            if values:
                for backend in backends:
                    backend.log(TASKS, task + 1, values)

    def close(self) -> None:
        for backends in self.runs:
            for backend in backends:
                backend.close()
        self.runs = []


def log_analysis(kinds: Sequence[str], folder: ExperimentDir, cfg: Config,
                 results: Mapping[int, Mapping[str, np.ndarray]]) -> None:
    """Log the analysis of each run index (``lop_jax.analysis.analyze_experiment``'s results) to the
    same tracked run as its training (job type ``analysis`` in W&B)."""
    for index, arrays in results.items():
        rows = analysis_values(cfg, arrays)
        for kind in kinds:
            backend = open_run(kind, folder, cfg, index, job_type="analysis")
            try:
                for tasks_done, values in enumerate(rows):
                    if values:
                        backend.log(TASKS, tasks_done, values)
            finally:
                backend.close()
