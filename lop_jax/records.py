"""What one run records while it trains (semantics §8), in memory, in the reference's arrays.

``RunResults`` holds every array at its full length from the start (zeros until written), like the
reference, and is the only code that fills them: one ``record_epoch`` per epoch, one
``record_train_steps`` per epoch for the running train summaries (float32 sums carried across
epochs, an entry every ``running_avg_window`` steps). Every metric the run's plasticity methods
declare gets an array too: ``<name>_per_epoch`` ([epochs, *shape], the epoch's sum or mean) and
``<name>_per_task`` ([tasks - 1, *shape], one row per task boundary). ``save`` writes them to the
run's files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lop_jax import methods as plasticity
from lop_jax.config import Config
from lop_jax.results import ExperimentDir

EPOCH_METRICS = ("test_loss_per_epoch", "test_accuracy_per_epoch", "test_evaluation_runtime",
                 "validation_loss_per_epoch", "validation_accuracy_per_epoch", "validation_evaluation_runtime",
                 "epoch_runtime")
STEP_METRICS = ("train_loss_per_checkpoint", "train_accuracy_per_checkpoint")
REPLACED = "replaced_units_per_epoch"  # CBP's metric: units replaced per epoch and feature layer


def step_metric_array(name: str) -> str:
    return f"{name}_per_epoch"


def task_metric_array(name: str) -> str:
    return f"{name}_per_task"


def _zeros(rows: int, spec: plasticity.MetricSpec) -> np.ndarray:
    return np.zeros((rows, *spec.shape), np.int64 if spec.is_integer else np.float32)


class RunResults:
    """The result arrays of one run (``arrays``, by metric name) and the train-summary counters."""

    def __init__(self, cfg: Config, index: int, class_order: np.ndarray):
        self.index = index
        self.window = cfg.running_avg_window
        self.arrays: dict[str, np.ndarray] = {m: np.zeros(cfg.num_epochs, np.float32) for m in EPOCH_METRICS}
        self.arrays.update({m: np.zeros(cfg.train_summaries, np.float32) for m in STEP_METRICS})
        method = plasticity.from_config(cfg)
        self.step_metrics = tuple(method.metrics)
        self.task_metrics = tuple(method.task_metrics)
        self.arrays.update({step_metric_array(n): _zeros(cfg.num_epochs, s) for n, s in method.metrics.items()})
        self.arrays.update({task_metric_array(n): _zeros(cfg.num_tasks - 1, s)
                            for n, s in method.task_metrics.items()})
        self.arrays["class_order"] = np.asarray(class_order, np.int64)
        self.running = np.zeros(2, np.float32)  # the current window's sums of loss and accuracy
        self.train_summary_pos = 0  # entries of the train summaries written so far

    def record_train_steps(self, losses: np.ndarray, accs: np.ndarray,
                           on_summary: Callable[[int, float], None] | None = None) -> None:
        """Add an epoch's per-step losses and accuracies; every ``running_avg_window``-th step of the
        epoch writes the window's means (``on_summary(step, mean accuracy)`` hears of each)."""
        window = self.window
        for step, (loss, acc) in enumerate(zip(losses, accs, strict=True)):
            self.running += np.array([loss, acc], np.float32)
            if (step + 1) % window == 0:
                pos = self.train_summary_pos
                self.arrays["train_loss_per_checkpoint"][pos] = self.running[0] / np.float32(window)
                self.arrays["train_accuracy_per_checkpoint"][pos] = self.running[1] / np.float32(window)
                self.train_summary_pos += 1
                if on_summary is not None:
                    on_summary(step + 1, float(self.running[1] / window))
                self.running[:] = 0

    def record_epoch(self, epoch: int, *, test: tuple[Any, Any], validation: tuple[Any, Any],
                     seconds: tuple[float, float, float], metrics: dict[str, np.ndarray]) -> None:
        """One epoch's (loss, accuracy) on the test and validation images, its wall times (training,
        test evaluation, validation evaluation) and the plasticity methods' per-step metrics reduced
        over the epoch."""
        a = self.arrays
        a["epoch_runtime"][epoch], a["test_evaluation_runtime"][epoch], a["validation_evaluation_runtime"][epoch] = \
            seconds
        a["test_loss_per_epoch"][epoch], a["test_accuracy_per_epoch"][epoch] = test
        a["validation_loss_per_epoch"][epoch], a["validation_accuracy_per_epoch"][epoch] = validation
        for name in self.step_metrics:
            a[step_metric_array(name)][epoch] = metrics[name]

    def record_task_boundary(self, task: int, metrics: dict[str, np.ndarray]) -> None:
        """The plasticity methods' metrics at the boundary after task ``task`` (0-based)."""
        for name in self.task_metrics:
            self.arrays[task_metric_array(name)][task] = metrics[name]

    def restore(self, arrays: dict[str, np.ndarray], running: np.ndarray, train_summary_pos: int) -> None:
        """Continue from a checkpoint's copy of the arrays and counters."""
        self.arrays.update(arrays)
        self.running[:] = running
        self.train_summary_pos = train_summary_pos

    def save(self, folder: ExperimentDir) -> None:
        for name, arr in self.arrays.items():
            folder.save_metric(name, self.index, arr)
