"""The run loop of the incremental CIFAR-100 experiment: config → initial states → epochs → results.

``run_experiments`` is what ``python -m experiments.run`` calls. It trains the given indices of a
config together, their states stacked along a run axis (``lop_jax.run_axis``), each resuming from
its newest checkpoint, and writes their results. Every epoch goes through five stages, one
function each (semantics §1, §5, §8):

    train → evaluate → record → end of task (after a task's last epoch) → checkpoint

- train: the compiled epoch; a non-finite loss stops the run (``RunError``);
- evaluate: the active classes' test and validation images; the best-validation copy is kept;
- record: each run's arrays (``lop_jax.records``), the live trackers if asked for
  (``lop_jax.tracking``) and the progress display;
- end of task: the copy is restored (early stopping), the snapshots saved, the algorithm's
  task-boundary hook applied;
- checkpoint: checkpoints and result files at their cadence; a requested stop ends the run
  here (``RunInterrupted``).

The other jobs live elsewhere: the results folder in ``lop_jax.results``, checkpoints and resume in
``lop_jax.checkpoint``, the progress display in ``lop_jax.progress``, stop signals in
``lop_jax.stopping``, the dry-run plan in ``lop_jax.plan``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from lop_jax import methods as plasticity
from lop_jax.checkpoint import Checkpointer, resume
from lop_jax.config import OPERATIONAL_KEYS, Config, ConfigError
from lop_jax.cpu_kernels import prepare_process
from lop_jax.data import CifarData, load_data
from lop_jax.errors import CommandFailed, Interrupted
from lop_jax.plan import Plan, make_plan
from lop_jax.progress import Progress
from lop_jax.records import RunResults
from lop_jax.results import ExperimentDir
from lop_jax.run_axis import seed_sharding, unstack_state
from lop_jax.stopping import StopRequest
from lop_jax.tracking import Tracking, check_available
from lop_jax.train import (
    TaskData,
    class_order_for,
    end_task,
    eval_key,
    init_state,
    make_evaluate,
    make_train_epoch,
    task_boundary_reset,
    task_data,
    update_best,
)

# ``make_plan`` and ``Plan`` were defined here before lop_jax.plan; kept importable from here
__all__ = ["Plan", "RunError", "RunInterrupted", "make_plan", "run_experiment", "run_experiments"]


class RunError(CommandFailed, RuntimeError):
    """The run had to stop (non-finite loss); the message says where and what was kept."""


class RunInterrupted(Interrupted, RuntimeError):
    """SIGINT/SIGTERM: the run stopped cleanly after an epoch and can be resumed."""


def run_experiment(cfg: Config, index: int, data: CifarData | None = None, verbose: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print, restart: bool = False,
                   stop_after_epoch: int | None = None) -> RunResults:
    """Run experiment ``index`` of ``cfg``, resuming from its newest checkpoint, and write its results.

    ``restart`` first moves the run's old files aside. ``stop_after_epoch`` stops (as after a
    SIGINT) once that many epochs are done: used to test resuming."""
    return run_experiments(cfg, [index], data, verbose, progress, log, restart, stop_after_epoch)[0]


def run_experiments(cfg: Config, indices: list[int], data: CifarData | None = None, verbose: bool = False,
                    progress: bool = True, log: Callable[[str], None] = print, restart: bool = False,
                    stop_after_epoch: int | None = None, track: Sequence[str] = ()) -> list[RunResults]:
    """Run several indices of ``cfg`` in one process: their states are stacked along a run axis
    and every step, evaluation and hook is mapped over it (sharded over devices when several are
    visible). Each index keeps its own results, snapshots and checkpoints. ``track`` names live
    trackers (``lop_jax.tracking``: "tensorboard", "wandb"), one tracked run per index."""
    check_available(track)
    set_flags = prepare_process(cfg)
    if set_flags:
        log(set_flags)
    folder = _prepare(cfg, indices, restart, log)
    data = data if data is not None else load_data(cfg)
    if cfg.num_classes > data.num_classes:
        raise ConfigError(f"config key 'num_tasks': the run needs {cfg.num_classes} classes, "
                          f"the data has {data.num_classes}")
    orders = [class_order_for(i, data.num_classes) for i in indices]
    states = [init_state(cfg, i) for i in indices]
    runs = _Runs.start(cfg, indices, folder, orders)
    report = Progress(cfg, runs.label, verbose, progress, log)
    tracking = Tracking()
    try:
        states, start = resume(runs.checkpointers, states, runs.records, report.message)
        if start == 0:
            runs.save_initial(states)
        if start >= cfg.num_epochs:
            report.message(f"{runs.label} already finished ({start} epochs); use --restart to run again")
            runs.save_results(start)
            return runs.records
        report.start(start)
        tracking = Tracking.open(track, cfg, folder, runs.records)
        loop = _Loop.start(cfg, runs, report, tracking, data, orders, stop_after_epoch, start)
        _run_epochs(loop, _stack(states), start)
    finally:
        runs.close()
        report.close()
        tracking.close()
    return runs.records


def _prepare(cfg: Config, indices: list[int], restart: bool, log: Callable[[str], None]) -> ExperimentDir:
    """Check the request, move the old files aside (``restart``) and guard the results folder."""
    if len(set(indices)) != len(indices) or not indices or min(indices) < 0:
        raise ConfigError(f"--experiment-index: expected distinct indices >= 0, got {indices}")
    try:  # every named method builds (one registered after the config loaded may be gone), before anything is written
        plasticity.from_config(cfg)
    except plasticity.MethodError as err:
        raise ConfigError(f"config key 'methods': {err}") from None
    folder = ExperimentDir.of(cfg)
    if restart:
        for index in indices:
            moved = folder.move_run_aside(index)
            if moved is not None:
                log(f"--restart: the previous files of index {index} were moved to {moved}")
    folder.write_config(cfg)
    return folder


def _stack(per_run: list[Any]) -> Any:
    """Per-run pytrees on the run axis, sharded over the devices when several are visible.

    Stacked on the host and put on the device in one transfer: ``jnp.stack`` per leaf compiled a
    small program per distinct leaf shape (about 20 for a ResNet-18) in every process; the values
    are the same bits."""
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *jax.device_get(per_run))
    return jax.device_put(stacked, seed_sharding(len(per_run)))


class _Images(NamedTuple):
    """The run's split on the device, [K, n, 32, 32, 3] each."""

    train: jax.Array
    val: jax.Array
    test: jax.Array


@dataclass
class _Runs:
    """The runs trained together: their indices, the folder they share, and per index (in the
    order of ``indices``, which is the order of the run axis) its record and checkpointer."""

    cfg: Config
    indices: list[int]
    folder: ExperimentDir
    records: list[RunResults]
    checkpointers: list[Checkpointer]

    @classmethod
    def start(cls, cfg: Config, indices: list[int], folder: ExperimentDir, orders: list[jax.Array]) -> _Runs:
        records = [RunResults(cfg, i, np.asarray(o)) for i, o in zip(indices, orders, strict=True)]
        return cls(cfg, list(indices), folder, records,
                   [Checkpointer(folder, i, cfg, ignore_keys=OPERATIONAL_KEYS) for i in indices])

    @property
    def label(self) -> str:
        return f"index {self.indices[0]}" if len(self.indices) == 1 else \
            f"indices {','.join(map(str, self.indices))}"

    def save_initial(self, states: list[Any]) -> None:
        """Before the first epoch: the untrained networks' snapshots and an unfinished status."""
        for index, st in zip(self.indices, states, strict=True):
            self.folder.save_snapshot(index, 0, st.params, st.batch_stats)
            self.folder.save_status(index, 0, False)

    def save_snapshots(self, epochs_done: int, state: Any) -> None:
        """Every run's network after ``epochs_done`` epochs; the stacked networks come to the host
        once and are split there (indexing each leaf on the device compiled a program per leaf shape)."""
        params, batch_stats = jax.device_get((state.params, state.batch_stats))
        for k, index in enumerate(self.indices):
            run = unstack_state((params, batch_stats), k)
            self.folder.save_snapshot(index, epochs_done, *run)

    def save_results(self, epochs_done: int) -> None:
        for record in self.records:
            record.save(self.folder)
            self.folder.save_status(record.index, epochs_done, epochs_done >= self.cfg.num_epochs)

    def checkpoint(self, epochs_done: int, state: Any) -> None:
        """Start writing every run's checkpoint from the stacked state (returns before the writes end)."""
        for k, (ckpt, r) in enumerate(zip(self.checkpointers, self.records, strict=True)):
            ckpt.save(epochs_done, state, r.arrays, r.running, r.train_summary_pos, run=k)

    def wait(self) -> None:
        for ckpt in self.checkpointers:
            ckpt.wait()

    def close(self) -> None:
        for ckpt in self.checkpointers:
            ckpt.close()


@dataclass
class _Loop:
    """What the epoch stages share."""

    cfg: Config
    runs: _Runs
    report: Progress
    tracking: Tracking
    images: _Images
    class_order: jax.Array  # [S, K]
    train_epoch: Callable
    eval_test: Callable
    eval_val: Callable
    stop_after_epoch: int | None
    last_saved: int  # epochs done at the newest checkpoint

    @classmethod
    def start(cls, cfg: Config, runs: _Runs, report: Progress, tracking: Tracking, data: CifarData,
              orders: list[jax.Array], stop_after_epoch: int | None, epochs_done: int) -> _Loop:
        """The loop's images on the device, its class orders on the run axis and its compiled functions."""
        images = _Images(*(jax.device_put(a) for a in (data.train, data.val, data.test)))
        return cls(cfg, runs, report, tracking, images, _stack(orders), make_train_epoch(cfg),
                   make_evaluate(cfg, cfg.test_batch_size, cfg.augment_test),
                   make_evaluate(cfg, cfg.val_batch_size, False), stop_after_epoch, last_saved=epochs_done)


class _Trained(NamedTuple):
    losses: np.ndarray  # [S, steps]
    accs: np.ndarray  # [S, steps]
    metrics: dict[str, np.ndarray]  # the plasticity methods' per-step metrics over the epoch, [S, ...]
    seconds: float


class _Evaluated(NamedTuple):
    test: tuple[np.ndarray, np.ndarray]  # (loss [S], accuracy [S])
    validation: tuple[np.ndarray, np.ndarray]
    seconds: tuple[float, float]  # test, validation


def _run_epochs(loop: _Loop, state: Any, start: int) -> None:
    cfg = loop.cfg
    with StopRequest(loop.report.message) as stop:
        for epoch in range(start, cfg.num_epochs):
            data = task_data(loop.images.train, loop.class_order, cfg.active_classes(epoch // cfg.epochs_per_task))
            state, trained = _train(loop, state, epoch, data)
            state, evaluated = _evaluate(loop, state, epoch, data)
            _record(loop, epoch, trained, evaluated)
            task_end = (epoch + 1) % cfg.epochs_per_task == 0
            if task_end:
                state = _end_of_task(loop, state, epoch)
            _checkpoint(loop, state, epoch + 1, task_end, stop.requested)


def _train(loop: _Loop, state: Any, epoch: int, data: TaskData) -> tuple[Any, _Trained]:
    """Train stage: one epoch of every run; a non-finite loss ends the run before anything is kept."""
    cfg = loop.cfg
    # explicit transfers of the two per-epoch scalars (a jnp scalar built here is an implicit one)
    lr, epoch_on_device = jax.device_put((np.float32(cfg.stepsize_at(epoch)), np.int32(epoch)))
    t0 = time.perf_counter()
    state, losses, accs, metrics = loop.train_epoch(state, data, lr, epoch_on_device,
                                                     n_active=cfg.active_classes(epoch // cfg.epochs_per_task))
    losses, accs, metrics = jax.device_get((losses, accs, metrics))
    trained = _Trained(losses, accs, metrics, time.perf_counter() - t0)
    for k, index in enumerate(loop.runs.indices):
        bad = np.flatnonzero(~np.isfinite(losses[k]))
        if bad.size:
            loop.runs.wait()
            raise RunError(f"non-finite training loss at epoch {epoch + 1}, step {bad[0] + 1} "
                           f"(index {index}); stopped without saving it, the last good checkpoint "
                           f"(after epoch {loop.last_saved}) is kept in {loop.runs.checkpointers[k].path}")
    return state, trained


def _evaluate(loop: _Loop, state: Any, epoch: int, data: TaskData) -> tuple[Any, _Evaluated]:
    """Evaluate stage: test and validation loss and accuracy; a better validation accuracy keeps a
    copy of the network (semantics §5)."""
    n_active = loop.cfg.active_classes(epoch // loop.cfg.epochs_per_task)
    t0 = time.perf_counter()
    test = jax.device_get(loop.eval_test(state.params, state.batch_stats, data._replace(images=loop.images.test),
                                         eval_key(state, epoch), n_active=n_active))
    t1 = time.perf_counter()
    val_loss, val_acc = loop.eval_val(state.params, state.batch_stats, data._replace(images=loop.images.val),
                                      eval_key(state, epoch), n_active=n_active)
    state = update_best(state, val_acc)
    validation = jax.device_get((val_loss, val_acc))
    t2 = time.perf_counter()
    return state, _Evaluated(test, validation, (t1 - t0, t2 - t1))


def _record(loop: _Loop, epoch: int, trained: _Trained, evaluated: _Evaluated) -> None:
    """Record stage: every run's train summaries and epoch arrays, the live trackers, then the progress display."""
    (test_loss, test_acc), (val_loss, val_acc) = evaluated.test, evaluated.validation
    for k, record in enumerate(loop.runs.records):
        record.record_train_steps(trained.losses[k], trained.accs[k], loop.report.train_summary)
    for k, record in enumerate(loop.runs.records):
        record.record_epoch(epoch, test=(test_loss[k], test_acc[k]), validation=(val_loss[k], val_acc[k]),
                            seconds=(trained.seconds, *evaluated.seconds),
                            metrics={name: m[k] for name, m in trained.metrics.items()})
    loop.tracking.epoch(epoch, loop.runs.records)
    loop.report.epoch(epoch, epoch // loop.cfg.epochs_per_task, float(np.mean(test_acc)), float(np.mean(val_acc)),
                      trained.seconds)


def _end_of_task(loop: _Loop, state: Any, epoch: int) -> Any:
    """End-of-task stage, after the task's last epoch: restore the best-validation copy (early
    stopping), save the snapshots, then apply the task-boundary hook before the next task."""
    cfg, task = loop.cfg, epoch // loop.cfg.epochs_per_task
    state = end_task(state, restore=cfg.early_stopping)
    loop.runs.save_snapshots(epoch + 1, state)
    if task + 1 < cfg.num_tasks:
        state, metrics = task_boundary_reset(cfg, state, task)
        metrics = jax.device_get(metrics)
        for k, record in enumerate(loop.runs.records):
            record.record_task_boundary(task, {name: m[k] for name, m in metrics.items()})
        loop.tracking.task_boundary(task, loop.runs.records)
        loop.report.message(f"task {task + 1} done: {cfg.active_classes(task + 1)} classes from now on")
    return state


def _checkpoint(loop: _Loop, state: Any, done: int, task_end: bool, stop_requested: bool) -> None:
    """Checkpoint stage: a checkpoint every ``checkpoint_every_epochs`` epochs and at every task end,
    stop and the run's end; the result files at the last three; then a requested stop ends the run."""
    cfg = loop.cfg
    stopping = stop_requested or (loop.stop_after_epoch is not None and done >= loop.stop_after_epoch)
    final = done == cfg.num_epochs
    every = cfg.checkpoint_every_epochs
    if task_end or stopping or final or (every and done % every == 0):
        loop.runs.checkpoint(done, state)
        loop.last_saved = done
    if task_end or stopping or final:
        loop.runs.save_results(done)
    if stopping and not final:
        loop.runs.wait()
        raise RunInterrupted(f"index {', '.join(map(str, loop.runs.indices))} stopped after epoch {done}; "
                             "run the same command to resume")
