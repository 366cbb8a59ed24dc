"""One run of the incremental CIFAR-100 experiment: config → initial state → epochs → results.

``run_experiment`` is what ``python -m experiments.run`` calls. Per epoch it runs the compiled
training epoch, evaluates on the active classes' test and validation images, keeps the
best-validation copy, and at each task boundary restores it (early stopping), saves the
network snapshot and applies the algorithm's task-boundary hook (semantics §1, §5, §8).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lop_jax import algorithms
from lop_jax import results as res
from lop_jax.checkpoint import Checkpointer
from lop_jax.config import OPERATIONAL_KEYS, Config, ConfigError
from lop_jax.data import CifarData, load_data
from lop_jax.errors import CommandFailed, Interrupted
from lop_jax.model import count_params, feature_layers
from lop_jax.run_axis import seed_sharding, stack_states, unstack_state
from lop_jax.train import (
    NUM_FEATURE_LAYERS,
    class_order_for,
    end_task,
    eval_key,
    init_state,
    make_evaluate,
    make_model,
    make_train_epoch,
    task_boundary_reset,
    task_data,
    update_best,
)


@dataclass(frozen=True)
class Plan:
    """What a run will do, for ``--dry-run`` and the progress display."""

    tasks: int
    epochs: int
    steps: int
    training_images: int
    trainable_parameters: int
    feature_units: int

    def lines(self) -> list[str]:
        return [f"tasks: {self.tasks}", f"epochs: {self.epochs}", f"training steps: {self.steps:,}",
                f"training images in all: {self.training_images:,}",
                f"trainable parameters: {self.trainable_parameters:,}",
                f"hidden feature units (CBP / dormant analysis): {self.feature_units:,}"]


def make_plan(cfg: Config) -> Plan:
    steps = sum(cfg.steps_per_epoch(t) * cfg.epochs_per_task for t in range(cfg.num_tasks))
    shapes = jax.eval_shape(lambda: make_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                          train=False))
    return Plan(tasks=cfg.num_tasks, epochs=cfg.num_epochs, steps=steps,
                training_images=steps * cfg.train_batch_size,
                trainable_parameters=count_params(shapes["params"]),
                feature_units=sum(f.channels for f in feature_layers(cfg.network_width)))


class Progress:
    """Reports a run: a tqdm bar over epochs, or per-epoch lines with ``verbose``."""

    def __init__(self, cfg: Config, label: str, verbose: bool, enabled: bool = True,
                 log: Callable[[str], None] = print):
        self.verbose, self.enabled, self.log = verbose, enabled, log
        self.bar = None
        if enabled and not verbose:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.num_epochs, desc=label, unit="epoch")

    def start(self, epoch: int) -> None:
        if self.bar is not None:
            self.bar.n = epoch
            self.bar.refresh()

    def train_summary(self, step: int, acc: float) -> None:
        if self.enabled and self.verbose:
            self.log(f"\t\tstep {step}: running train accuracy {acc:.4f}")

    def epoch(self, epoch: int, task: int, test_acc: float, val_acc: float, seconds: float) -> None:
        if not self.enabled:
            return
        if self.verbose:
            self.log(f"\tepoch {epoch + 1} (task {task + 1}): test accuracy {test_acc:.4f}, "
                     f"validation accuracy {val_acc:.4f}, epoch run time {seconds:.2f} s")
        else:
            self.bar.set_postfix(task=task + 1, test_acc=f"{test_acc:.3f}", val_acc=f"{val_acc:.3f}")
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunError(CommandFailed, RuntimeError):
    """The run had to stop (non-finite loss); the message says where and what was kept."""


class RunInterrupted(Interrupted, RuntimeError):
    """SIGINT/SIGTERM: the run stopped cleanly after an epoch and can be resumed."""


class _StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks to stop after the current epoch, a second one
    abandons the epoch (the last checkpoint stays)."""

    def __init__(self, report: Progress):
        self.requested = False
        self.report = report
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.report.message(f"{signal.Signals(signum).name}: stopping after this epoch "
                            "(again to abandon the epoch; the last checkpoint stays)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _record_train_summaries(results: res.RunResults, running: np.ndarray, losses: np.ndarray, accs: np.ndarray,
                            window: int, report: Progress) -> None:
    """Running means every ``window`` steps, float32 like the reference's, carried across epochs."""
    for step, (loss, acc) in enumerate(zip(losses, accs, strict=True)):
        running += np.array([loss, acc], np.float32)
        if (step + 1) % window == 0:
            pos = results.train_summary_pos
            results.arrays["train_loss_per_checkpoint"][pos] = running[0] / np.float32(window)
            results.arrays["train_accuracy_per_checkpoint"][pos] = running[1] / np.float32(window)
            results.train_summary_pos += 1
            report.train_summary(step + 1, float(running[1] / window))
            running[:] = 0


def run_experiment(cfg: Config, index: int, data: CifarData | None = None, verbose: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print, restart: bool = False,
                   stop_after_epoch: int | None = None) -> res.RunResults:
    """Run experiment ``index`` of ``cfg``, resuming from its newest checkpoint, and write its results.

    ``restart`` first moves the run's old files aside. ``stop_after_epoch`` stops (as after a
    SIGINT) once that many epochs are done: used to test resuming."""
    return run_experiments(cfg, [index], data, verbose, progress, log, restart, stop_after_epoch)[0]


def run_experiments(cfg: Config, indices: list[int], data: CifarData | None = None, verbose: bool = False,
                    progress: bool = True, log: Callable[[str], None] = print, restart: bool = False,
                    stop_after_epoch: int | None = None) -> list[res.RunResults]:
    """Run several indices of ``cfg`` in one process: their states are stacked along a run axis
    and every step, evaluation and hook is ``jax.vmap``-ed over it (sharded over devices when
    several are visible). Each index keeps its own results, snapshots and checkpoints."""
    if len(set(indices)) != len(indices) or not indices or min(indices) < 0:
        raise ConfigError(f"--experiment-index: expected distinct indices >= 0, got {indices}")
    algorithms.check_methods(cfg)
    folder = res.ExperimentDir.of(cfg)
    if restart:
        for index in indices:
            moved = folder.move_run_aside(index)
            if moved is not None:
                log(f"--restart: the previous files of index {index} were moved to {moved}")
    folder.write_config(cfg)
    data = data if data is not None else load_data(cfg)
    if cfg.num_classes > data.num_classes:
        raise ConfigError(f"config key 'num_tasks': the run needs {cfg.num_classes} classes, "
                          f"the data has {data.num_classes}")
    images = tuple(jax.device_put(a) for a in (data.train, data.val, data.test))
    extra = {"replaced_units_per_epoch": (cfg.num_epochs, NUM_FEATURE_LAYERS)} if cfg.use_cbp else None
    orders = [class_order_for(i, data.num_classes) for i in indices]
    states = [init_state(cfg, i) for i in indices]
    results = [res.RunResults(cfg, i, np.asarray(o), extra) for i, o in zip(indices, orders, strict=True)]
    running = np.zeros((len(indices), 2), np.float32)
    ckpts = [Checkpointer(folder, i, cfg, ignore_keys=OPERATIONAL_KEYS) for i in indices]
    label = f"index {indices[0]}" if len(indices) == 1 else f"indices {','.join(map(str, indices))}"
    report = Progress(cfg, label, verbose, progress, log)
    try:
        starts = []
        for k, (index, ckpt) in enumerate(zip(indices, ckpts, strict=True)):
            restored = ckpt.latest(states[k], results[k].arrays, running[k], report.message)
            if restored is None:
                starts.append(0)
                continue
            states[k], running[k] = restored.state, restored.running
            results[k].arrays.update(restored.arrays)
            results[k].train_summary_pos = restored.train_summary_pos
            starts.append(restored.epochs_done)
            report.message(f"index {index}: resuming after epoch {restored.epochs_done} from {ckpt.path}")
        if len(set(starts)) > 1:
            raise ConfigError(f"indices {indices} stopped at different epochs {starts}; run them separately "
                              "(or --restart) to run them together")
        start = starts[0]
        if start == 0:
            for index, st in zip(indices, states, strict=True):
                folder.save_snapshot(index, 0, st.params, st.batch_stats)
                folder.save_status(index, 0, False)
        if start >= cfg.num_epochs:
            report.message(f"{label} already finished ({start} epochs); use --restart to run again")
            for index, r in zip(indices, results, strict=True):
                r.save(folder)
                folder.save_status(index, start, True)
            return results
        report.start(start)
        state, class_order = stack_states(states), jnp.stack(orders)
        sharding = seed_sharding(len(indices))
        if sharding is not None:
            state, class_order = jax.device_put((state, class_order), sharding)
        _run_epochs(cfg, indices, folder, state, results, running, start, ckpts, report, class_order,
                    images, stop_after_epoch)
    finally:
        for ckpt in ckpts:
            ckpt.close()
        report.close()
    return results


def _run_epochs(cfg: Config, indices: list[int], folder: res.ExperimentDir, state: Any,
                results: list[res.RunResults], running: np.ndarray, start: int, ckpts: list[Checkpointer],
                report: Progress,
                class_order: jax.Array, images: tuple[jax.Array, jax.Array, jax.Array],
                stop_after_epoch: int | None) -> None:
    train_x, val_x, test_x = images
    train_epoch = make_train_epoch(cfg)
    eval_test = make_evaluate(cfg, cfg.test_batch_size, cfg.augment_test)
    eval_val = make_evaluate(cfg, cfg.val_batch_size, False)
    last_saved = start
    with _StopRequest(report) as stop:
        for epoch in range(start, cfg.num_epochs):
            task = epoch // cfg.epochs_per_task
            n_active = cfg.active_classes(task)
            lr = jnp.float32(cfg.stepsize_at(epoch))
            data = task_data(train_x, class_order, n_active)
            t0 = time.perf_counter()
            state, losses, accs, replaced = train_epoch(state, data, lr, jnp.int32(epoch), n_active=n_active)
            losses, accs, replaced = jax.device_get((losses, accs, replaced))
            epoch_time = time.perf_counter() - t0
            for k, index in enumerate(indices):
                bad = np.flatnonzero(~np.isfinite(losses[k]))
                if bad.size:
                    for ckpt in ckpts:
                        ckpt.wait()
                    raise RunError(f"non-finite training loss at epoch {epoch + 1}, step {bad[0] + 1} "
                                   f"(index {index}); stopped without saving it, the last good checkpoint "
                                   f"(after epoch {last_saved}) is kept in {ckpts[k].path}")
            for k in range(len(indices)):
                _record_train_summaries(results[k], running[k], losses[k], accs[k],
                                        cfg.running_avg_window, report)

            t0 = time.perf_counter()
            test_loss, test_acc = jax.device_get(eval_test(state.params, state.batch_stats,
                                                           data._replace(images=test_x), eval_key(state, epoch),
                                                           n_active=n_active))
            t1 = time.perf_counter()
            val_loss, val_acc = eval_val(state.params, state.batch_stats, data._replace(images=val_x),
                                         eval_key(state, epoch), n_active=n_active)
            state = update_best(state, val_acc)
            val_loss, val_acc = jax.device_get((val_loss, val_acc))
            t2 = time.perf_counter()

            for k, r in enumerate(results):
                a = r.arrays
                a["epoch_runtime"][epoch] = epoch_time
                a["test_loss_per_epoch"][epoch], a["test_accuracy_per_epoch"][epoch] = test_loss[k], test_acc[k]
                a["validation_loss_per_epoch"][epoch] = val_loss[k]
                a["validation_accuracy_per_epoch"][epoch] = val_acc[k]
                a["test_evaluation_runtime"][epoch], a["validation_evaluation_runtime"][epoch] = t1 - t0, t2 - t1
                if cfg.use_cbp:
                    a["replaced_units_per_epoch"][epoch] = replaced[k]
            report.epoch(epoch, task, float(np.mean(test_acc)), float(np.mean(val_acc)), epoch_time)

            done = epoch + 1
            task_end = done % cfg.epochs_per_task == 0
            if task_end:
                state = end_task(state, restore=cfg.early_stopping)
                for k, index in enumerate(indices):
                    run = unstack_state(state, k)
                    folder.save_snapshot(index, done, run.params, run.batch_stats)
                if task + 1 < cfg.num_tasks:
                    state = task_boundary_reset(cfg, state, task)
                    report.message(f"task {task + 1} done: {cfg.active_classes(task + 1)} classes from now on")
            stopping = stop.requested or (stop_after_epoch is not None and done >= stop_after_epoch)
            every = cfg.checkpoint_every_epochs
            if task_end or stopping or done == cfg.num_epochs or (every and done % every == 0):
                for k, ckpt in enumerate(ckpts):
                    ckpt.save(done, state, results[k].arrays, running[k], results[k].train_summary_pos, run=k)
                last_saved = done
            if task_end or stopping or done == cfg.num_epochs:
                for index, r in zip(indices, results, strict=True):
                    r.save(folder)
                    folder.save_status(index, done, done == cfg.num_epochs)
            if stopping and done < cfg.num_epochs:
                for ckpt in ckpts:
                    ckpt.wait()
                raise RunInterrupted(f"index {', '.join(map(str, indices))} stopped after epoch {done}; "
                                     "run the same command to resume")
