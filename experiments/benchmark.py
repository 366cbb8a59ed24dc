"""Measure training and evaluation throughput for a config and project the full-run time.

    python -m experiments.benchmark --config configs/base_deep_learning_system.json \
        [--set key=value] [--experiment-index 0-4] [--steps 25] [--json OUT] [--synthetic]

Training images per second count whole steps (gather, augmentation, forward, backward, update
and the config's CBP or noise), for all indices together. The projection multiplies them by
the protocol's image counts (training, plus test and validation evaluation every epoch).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lop_jax import cli
from lop_jax.config import Config
from lop_jax.data import CifarData, load_data


def synthetic_data(cfg: Config) -> CifarData:
    """Random images of the config's sizes (speed does not depend on pixel values)."""
    rng = np.random.default_rng(0)
    k = max(cfg.num_classes, 1)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (k, n, 32, 32, 3), dtype=np.uint8)

    return CifarData(train=images(cfg.train_images_per_class), val=images(cfg.val_images_per_class),
                     test=images(cfg.test_images_per_class), names=tuple(map(str, range(k))), source="synthetic")


def protocol_images(cfg: Config) -> tuple[int, int]:
    """(training images, evaluation images) of one full run."""
    train = sum(cfg.steps_per_epoch(t) * cfg.train_batch_size * cfg.epochs_per_task for t in range(cfg.num_tasks))
    evals = sum(cfg.active_classes(t) * (cfg.test_images_per_class + cfg.val_images_per_class) * cfg.epochs_per_task
                for t in range(cfg.num_tasks))
    return train, evals


def benchmark(cfg: Config, indices: list[int], data: CifarData, steps: int, repeats: int = 2) -> dict:
    """Time the compiled train steps and the evaluation; returns the figures as a dict."""
    import jax
    import jax.numpy as jnp

    from lop_jax.run_axis import stack_states
    from lop_jax.train import (
        class_order_for,
        eval_key,
        init_state,
        make_evaluate,
        make_train_epoch,
        resolve_epoch_mode,
        task_data,
    )

    s = len(indices)
    state = stack_states([init_state(cfg, i) for i in indices])
    order = jnp.stack([class_order_for(i, data.num_classes) for i in indices])
    train_x, test_x = jax.device_put(data.train), jax.device_put(data.test)
    # time a task whose epoch has at least ``steps`` steps (the last task otherwise)
    task = next((t for t in range(cfg.num_tasks) if cfg.steps_per_epoch(t) >= steps), cfg.num_tasks - 1)
    n_active = cfg.active_classes(task)
    epoch_steps = cfg.steps_per_epoch(task)
    train_epoch = make_train_epoch(cfg)
    evaluate = make_evaluate(cfg, cfg.test_batch_size, cfg.augment_test)
    keys = eval_key(state, 0)
    train_data = task_data(train_x, order, n_active)
    test_data = train_data._replace(images=test_x)

    def run_train(state, epoch):
        out = train_epoch(state, train_data, jnp.float32(0.1), jnp.int32(epoch), n_active=n_active)
        jax.block_until_ready(out)
        return out[0]

    t0 = time.perf_counter()
    state = run_train(state, 0)
    first_train = time.perf_counter() - t0
    train_times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        state = run_train(state, r + 1)
        train_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(evaluate(state.params, state.batch_stats, test_data, keys, n_active=n_active))
    first_eval = time.perf_counter() - t0
    eval_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(evaluate(state.params, state.batch_stats, test_data, keys, n_active=n_active))
        eval_times.append(time.perf_counter() - t0)
    train_time, eval_time = min(train_times), min(eval_times)
    train_ips = s * epoch_steps * cfg.train_batch_size / train_time
    eval_ips = s * n_active * cfg.test_images_per_class / eval_time
    train_images, eval_images = protocol_images(cfg)
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {dev.device_kind} (x{len(jax.devices())})",
        "host": platform.machine(),
        "indices": indices,
        "epoch_mode": resolve_epoch_mode(cfg.epoch_mode),
        "precision": cfg.precision,
        "network_width": cfg.network_width,
        "train_batch_size": cfg.train_batch_size,
        "timed_task": task + 1,
        "steps_per_timed_epoch": epoch_steps,
        "compile_seconds": max(first_train - train_time, 0.0) + max(first_eval - eval_time, 0.0),
        "train_step_seconds": train_time / epoch_steps,
        "train_images_per_second": train_ips,
        "eval_images_per_second": eval_ips,
        "projected_full_run_seconds": s * (train_images / train_ips + eval_images / eval_ips),
        "full_run_train_images_per_index": train_images,
        "full_run_eval_images_per_index": eval_images,
    }


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit codes as in ``lop_jax.errors``."""
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.splitlines()[0])
    cli.add_config_options(p)
    p.add_argument("--experiment-index", default="0", help="run indices timed together: N, A-B or a comma list")
    p.add_argument("--steps", type=int, default=25, help="time an epoch with at least this many steps")
    cli.add_data_dir(p)
    p.add_argument("--synthetic", action="store_true", help="random images of the config's sizes instead of data")
    p.add_argument("--json", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    cfg = cli.config_from_args(args)
    indices = cli.parse_indices(args.experiment_index)
    data = synthetic_data(cfg) if args.synthetic else load_data(cfg)
    out = benchmark(cfg, indices, data, args.steps)
    out["config"] = args.config
    out["data"] = data.source
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v:,.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    hours = out["projected_full_run_seconds"] / 3600
    print(f"projected full run ({len(indices)} indices together): {hours:.2f} h")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
