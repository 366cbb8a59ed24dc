"""One run of the incremental CIFAR-100 experiment: config → initial state → epochs → results.

``run_experiment`` is what ``python -m experiments.run`` calls. Per epoch it runs the compiled
training epoch, evaluates on the active classes' test and validation images, keeps the
best-validation copy, and at each task boundary restores it (early stopping), saves the
network snapshot and applies the algorithm's task-boundary hook (SPEC §1, §5, §8).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lop_jax import results as res
from lop_jax.config import Config, ConfigError, config_diff, make_config
from lop_jax.data import CifarData, load_data
from lop_jax.model import count_params, feature_layers
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
    update_best,
)

# Keys that may differ between runs sharing one experiment directory.
LOCATION_KEYS = ("data_path", "results_dir", "num_workers")


def experiment_dir(cfg: Config) -> Path:
    """``<results_dir>/<experiment_name>`` (results_dir defaults to ./results)."""
    return Path(cfg.results_dir or "results") / cfg.experiment_name


def write_config(cfg: Config, exp_dir: Path) -> None:
    """Store the resolved config; refuse to mix runs of a different config in one directory."""
    path = exp_dir / "config.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{path} is not valid JSON; move it away or choose another experiment_name") from None
        diff = config_diff(old, cfg.to_dict(), ignore=LOCATION_KEYS)
        if diff:
            raise ConfigError(f"{exp_dir} holds runs of a different config (keys differ: {', '.join(diff)}); "
                              "use another experiment_name or results_dir")
        return
    try:
        exp_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"results directory {exp_dir} is not writable: {err}") from None
    res.save_json(path, cfg.to_dict())


def read_config(exp_dir: Path) -> Config:
    """The resolved config stored with an experiment's results."""
    return make_config(json.loads((Path(exp_dir) / "config.json").read_text()))


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

    def __init__(self, cfg: Config, index: int, verbose: bool, enabled: bool = True,
                 log: Callable[[str], None] = print):
        self.verbose, self.enabled, self.log = verbose, enabled, log
        self.bar = None
        if enabled and not verbose:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.num_epochs, desc=f"index {index}", unit="epoch")

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


def run_experiment(cfg: Config, index: int, data: CifarData | None = None, verbose: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print) -> res.RunResults:
    """Run (or finish) experiment ``index`` of ``cfg`` and write its results."""
    exp_dir = experiment_dir(cfg)
    write_config(cfg, exp_dir)
    data = data if data is not None else load_data(cfg)
    if cfg.num_classes > data.num_classes:
        raise ConfigError(f"config key 'num_tasks': the run needs {cfg.num_classes} classes, "
                          f"the data has {data.num_classes}")
    train_x, val_x, test_x = (jax.device_put(a) for a in (data.train, data.val, data.test))
    class_order = class_order_for(index, data.num_classes)
    state = init_state(cfg, index)
    extra = {"replaced_units_per_epoch": (cfg.num_epochs, NUM_FEATURE_LAYERS)} if cfg.use_cbp else None
    results = res.RunResults(cfg, index, np.asarray(class_order), extra)
    train_epoch = make_train_epoch(cfg)
    eval_test = make_evaluate(cfg, cfg.test_batch_size, cfg.augment_test)
    eval_val = make_evaluate(cfg, cfg.val_batch_size, False)

    res.save_snapshot(exp_dir, index, 0, state.params, state.batch_stats)
    res.save_status(exp_dir, index, 0, False)
    report = Progress(cfg, index, verbose, progress, log)
    running = np.zeros(2, np.float32)
    window = cfg.running_avg_window
    try:
        for epoch in range(cfg.num_epochs):
            task = epoch // cfg.epochs_per_task
            n_active = cfg.active_classes(task)
            lr = jnp.float32(cfg.stepsize_at(epoch))
            t0 = time.perf_counter()
            state, losses, accs, replaced = train_epoch(state, train_x, class_order, lr, jnp.int32(epoch),
                                                        n_active=n_active)
            losses, accs, replaced = jax.device_get((losses, accs, replaced))
            epoch_time = time.perf_counter() - t0

            for step, (loss, acc) in enumerate(zip(losses, accs, strict=True)):
                running += np.array([loss, acc], np.float32)
                if (step + 1) % window == 0:
                    pos = results.train_summary_pos
                    results.arrays["train_loss_per_checkpoint"][pos] = running[0] / np.float32(window)
                    results.arrays["train_accuracy_per_checkpoint"][pos] = running[1] / np.float32(window)
                    results.train_summary_pos += 1
                    report.train_summary(step + 1, float(running[1] / window))
                    running[:] = 0

            t0 = time.perf_counter()
            test_loss, test_acc = jax.device_get(eval_test(state.params, state.batch_stats, test_x, class_order,
                                                           eval_key(state, epoch), n_active=n_active))
            t1 = time.perf_counter()
            val_loss, val_acc = eval_val(state.params, state.batch_stats, val_x, class_order,
                                         eval_key(state, epoch), n_active=n_active)
            state = update_best(state, val_acc)
            val_loss, val_acc = jax.device_get((val_loss, val_acc))
            t2 = time.perf_counter()

            a = results.arrays
            a["epoch_runtime"][epoch] = epoch_time
            a["test_loss_per_epoch"][epoch], a["test_accuracy_per_epoch"][epoch] = test_loss, test_acc
            a["validation_loss_per_epoch"][epoch], a["validation_accuracy_per_epoch"][epoch] = val_loss, val_acc
            a["test_evaluation_runtime"][epoch], a["validation_evaluation_runtime"][epoch] = t1 - t0, t2 - t1
            if cfg.use_cbp:
                a["replaced_units_per_epoch"][epoch] = replaced
            report.epoch(epoch, task, float(test_acc), float(val_acc), epoch_time)

            if (epoch + 1) % cfg.epochs_per_task == 0:
                state = end_task(state, restore=cfg.early_stopping)
                res.save_snapshot(exp_dir, index, epoch + 1, state.params, state.batch_stats)
                if task + 1 < cfg.num_tasks:
                    state = task_boundary_reset(cfg, state, task)
                    report.message(f"task {task + 1} done: {cfg.active_classes(task + 1)} classes from now on")
                results.save(exp_dir)
                res.save_status(exp_dir, index, epoch + 1, epoch + 1 == cfg.num_epochs)
    finally:
        report.close()
    return results
