"""Measure training and evaluation throughput for a config and project the full-run time.

    python -m experiments.benchmark --config configs/base_deep_learning_system.json \
        [--set key=value] [--experiment-index 0-4] [--steps 25] [--json OUT] [--synthetic]
        [--cbp-overhead [--rounds 15]] [--cost-analysis [--seeds 1,5]]

Training images per second count whole steps (gather, augmentation, forward, backward, update
and the config's CBP or noise), for all indices together. The projection multiplies them by
the protocol's image counts (training, plus test and validation evaluation every epoch). The
XLA compilations of every phase are counted and named (a new task may compile the scan-mode
epoch once, and in loop mode only small programs whose shapes follow the task's size).

``--cbp-overhead`` instead times the mapped CBP step against the mapped base step (the same
config without CBP) and against CBP deciding its replacement once for all runs, alternating in
one process, and prints the ratios of their medians.
``--cost-analysis`` instead prints XLA's cost and memory analysis of the compiled step and
evaluation batches (as an accelerator compiles them: XLA's own convolutions) and a roofline
projection of the full protocol on an A100 and an H100 (a projection, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lop_jax import cli
from lop_jax.config import Config, ConfigError
from lop_jax.cpu_kernels import prepare_process
from lop_jax.data import CifarData, load_data

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# Published peak figures (NVIDIA data sheets, dense, no structured sparsity), per second.
# On these GPUs a float32 convolution or matmul at JAX's default precision runs as TF32 on the
# tensor cores; "fp32" is the CUDA cores' rate (what precision="highest" would get).
HARDWARE: dict[str, dict[str, float]] = {
    "A100 SXM4 80 GB": {"fp32_flops": 19.5e12, "tf32_flops": 156e12, "bf16_flops": 312e12,
                        "memory_bytes": 2.039e12},
    "H100 SXM5 80 GB": {"fp32_flops": 66.9e12, "tf32_flops": 494.7e12, "bf16_flops": 989.4e12,
                        "memory_bytes": 3.35e12},
}


class CompileLog:
    """Every XLA compilation while active, as (program name, seconds), from JAX's monitoring
    events (a persistent-cache hit counts too: it is a compilation the in-memory cache missed)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []

    def _record(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            self.events.append((str(kwargs.get("fun_name", "?")), float(duration)))

    def __enter__(self) -> CompileLog:
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)

    def mark(self) -> int:
        """A position in the log, for ``since``."""
        return len(self.events)

    def since(self, mark: int) -> dict[str, Any]:
        """The compilations after ``mark``: how many, their seconds, and each program's count."""
        events = self.events[mark:]
        return {"count": len(events), "seconds": round(sum(s for _, s in events), 3),
                "programs": dict(sorted(Counter(name for name, _ in events).items()))}


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


def protocol_programs(cfg: Config) -> dict[str, int]:
    """How many times one full run executes each compiled program: train steps, test batches and
    validation batches (every epoch evaluates the active classes' test and validation images)."""
    def batches(per_class: int, batch: int) -> int:
        return sum(math.ceil(cfg.active_classes(t) * per_class / batch) * cfg.epochs_per_task
                   for t in range(cfg.num_tasks))

    return {"train_steps": sum(cfg.steps_per_epoch(t) * cfg.epochs_per_task for t in range(cfg.num_tasks)),
            "test_batches": batches(cfg.test_images_per_class, cfg.test_batch_size),
            "val_batches": batches(cfg.val_images_per_class, cfg.val_batch_size)}


def device_name() -> str:
    """The backend, device kind and device count, e.g. 'gpu: NVIDIA H100 80GB HBM3 (x1)'."""
    dev = jax.devices()[0]
    return f"{dev.platform}: {dev.device_kind} (x{len(jax.devices())})"


def benchmark(cfg: Config, indices: list[int], data: CifarData, steps: int, repeats: int = 2,
              new_task: bool = True) -> dict:
    """Time the compiled train epochs and the evaluation, count the compilations of every phase;
    returns the figures as a dict. ``new_task`` also runs the task boundary and one epoch and
    evaluation of the next task, counting what a new task compiles."""
    from lop_jax.run_axis import stack_states
    from lop_jax.train import (
        class_order_for,
        end_task,
        eval_key,
        init_state,
        make_evaluate,
        make_train_epoch,
        resolve_epoch_mode,
        task_boundary_reset,
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
    lr = jax.device_put(np.float32(0.1))

    def run_train(state, epoch, n_active):
        out = train_epoch(state, task_data(train_x, order, n_active), lr, jax.device_put(np.int32(epoch)),
                          n_active=n_active)
        jax.block_until_ready(out)
        return out[0]

    def run_eval(state, n_active):
        test_data = task_data(test_x, order, n_active)
        jax.block_until_ready(evaluate(state.params, state.batch_stats, test_data, eval_key(state, 0),
                                       n_active=n_active))

    compiles: dict[str, Any] = {}
    with CompileLog() as log:
        mark = log.mark()
        t0 = time.perf_counter()
        state = run_train(state, 0, n_active)
        first_train = time.perf_counter() - t0
        compiles["first_epoch"] = log.since(mark)
        mark = log.mark()
        train_times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            state = run_train(state, r + 1, n_active)
            train_times.append(time.perf_counter() - t0)
        compiles["same_task_epochs"] = log.since(mark)
        mark = log.mark()
        t0 = time.perf_counter()
        run_eval(state, n_active)
        first_eval = time.perf_counter() - t0
        compiles["first_evaluation"] = log.since(mark)
        eval_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_eval(state, n_active)
            eval_times.append(time.perf_counter() - t0)
        if new_task and task + 1 < cfg.num_tasks:
            mark = log.mark()
            state = task_boundary_reset(cfg, end_task(state, restore=cfg.early_stopping), task)[0]
            jax.block_until_ready(state)
            compiles["first_task_boundary"] = log.since(mark)
            mark = log.mark()
            t0 = time.perf_counter()
            state = run_train(state, repeats + 1, cfg.active_classes(task + 1))
            run_eval(state, cfg.active_classes(task + 1))
            state = task_boundary_reset(cfg, end_task(state, restore=cfg.early_stopping), task + 1)[0]
            jax.block_until_ready(state)
            compiles["new_task"] = log.since(mark)
            compiles["new_task"]["wall_seconds"] = round(time.perf_counter() - t0, 3)
    train_time, eval_time = min(train_times), min(eval_times)
    train_ips = s * epoch_steps * cfg.train_batch_size / train_time
    eval_ips = s * n_active * cfg.test_images_per_class / eval_time
    train_images, eval_images = protocol_images(cfg)
    return {
        "device": device_name(),
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
        "compilations": compiles,
    }


def _mature_cbp(state: Any, threshold: int) -> Any:
    """The stacked state with every CBP unit's age at the maturity threshold, so that every unit
    is eligible from the next step on (the state of a run past its first ``threshold`` steps)."""
    from lop_jax.methods.continual_backprop import NAME

    cbp = state.algo_state[NAME]
    aged = cbp._replace(age=tuple(jnp.full_like(a, threshold) for a in cbp.age))
    return state.replace(algo_state={**state.algo_state, NAME: aged})


def cbp_overhead(cfg: Config, indices: list[int], data: CifarData, rounds: int = 15,
                 steps_per_round: int = 3) -> dict:
    """The mapped CBP step (the config's: its replacement branch a select over the runs, computed
    at every step) against the mapped base step (the same config without CBP) and against CBP
    with ``decide_for_all_runs`` (one cond for all runs): all compiled, then timed in rounds of
    ``steps_per_round`` steps, the order rotating every round, in one process (so that machine
    load hits them alike); the ratios of the median step times. CBP starts with every unit
    mature, as through most of a run (its accumulator then runs every step; replacements stay
    rare at the paper's rate)."""
    from lop_jax.methods.continual_backprop import NAME
    from lop_jax.run_axis import stack_states
    from lop_jax.train import class_order_for, epoch_plan, init_state, make_step_of_runs, task_data

    if not cfg.use_cbp:
        raise ConfigError("--cbp-overhead: the config must use CBP (config key 'use_cbp' true)")
    if rounds < 2 or steps_per_round < 1:
        raise ConfigError(f"--cbp-overhead: expected --rounds >= 2 and steps per round >= 1, got {rounds}, "
                          f"{steps_per_round}")
    options = (("replacement_rate", cfg.replacement_rate), ("maturity_threshold", cfg.maturity_threshold),
               ("utility_function", cfg.utility_function), ("decay_rate", cfg.cbp_decay_rate),
               ("variant", cfg.cbp_variant), ("decide_for_all_runs", True))
    base = dataclasses.replace(cfg, use_cbp=False)
    variants = {"base": base, "cbp": cfg,
                "cbp_decided_once": dataclasses.replace(base, methods=((NAME, options), *cfg.methods))}
    order = jnp.stack([class_order_for(i, data.num_classes) for i in indices])
    n_active = cfg.active_classes(0)
    data_t = task_data(jax.device_put(data.train), order, n_active)
    lr, epoch = jax.device_put(np.float32(0.1)), jax.device_put(np.int32(0))
    steps, states = {}, {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    replaced = dict.fromkeys(variants, 0)
    for name, c in variants.items():
        steps[name] = make_step_of_runs(c)
        st = stack_states([init_state(c, i) for i in indices])
        states[name] = _mature_cbp(st, cfg.maturity_threshold) if name != "base" else st
    batches, numbers = epoch_plan(states["base"].key, epoch, n_active * cfg.train_images_per_class,
                                  cfg.train_batch_size)
    for name in variants:  # compile each
        states[name] = jax.block_until_ready(steps[name](states[name], data_t, batches[0], epoch, numbers[0], lr)[0])
    names = list(variants)
    k = 1
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for j in range(steps_per_round):
                i = (k + j) % len(batches)
                states[name], _, _, metrics = steps[name](states[name], data_t, batches[i], epoch, numbers[i], lr)
            jax.block_until_ready(states[name])
            times[name].append((time.perf_counter() - t0) / steps_per_round)
            if "replaced_units" in metrics:
                replaced[name] += int(np.sum(jax.device_get(metrics["replaced_units"])))
        k += steps_per_round
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"device": device_name(), "indices": indices, "network_width": cfg.network_width,
            "train_batch_size": cfg.train_batch_size, "replacement_rate": cfg.replacement_rate,
            "rounds": rounds, "steps_per_round": steps_per_round,
            "base_step_seconds": med["base"], "cbp_step_seconds": med["cbp"],
            "cbp_decided_once_step_seconds": med["cbp_decided_once"], "cbp_over_base": med["cbp"] / med["base"],
            "cbp_decided_once_over_base": med["cbp_decided_once"] / med["base"],
            "units_replaced_in_last_steps_of_rounds": replaced["cbp"]}


def _analysis(compiled: Any) -> dict[str, float]:
    """FLOPs, bytes accessed and memory sizes of one compiled program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    sizes = {name: int(getattr(mem, f"{name}_size_in_bytes", 0)) for name in
             ("argument", "output", "alias", "temp", "generated_code")}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0)),
            **{f"{name}_bytes": v for name, v in sizes.items()},
            "peak_bytes": sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]}


def roofline_projection(programs: dict[str, dict[str, float]], runs: dict[str, int], hw: dict[str, float],
                        peak: str) -> dict[str, float]:
    """Hours of a full run on one GPU if every program ran at its roofline: per execution
    max(FLOPs / peak, bytes accessed / bandwidth), times ``runs`` executions of each. ``peak`` is
    the tensor-core rate the precision gets; the FP32 CUDA-core rate and the memory bound alone
    are given too."""
    def hours(rate: float | None) -> float:
        return sum(n * max(programs[p]["flops"] / rate if rate else 0.0,
                           programs[p]["bytes_accessed"] / hw["memory_bytes"]) for p, n in runs.items()) / 3600

    return {"tensor_core_hours": hours(hw[peak]), "fp32_cuda_core_hours": hours(hw["fp32_flops"]),
            "memory_bound_hours": hours(None)}


def cost_analysis(cfg: Config, seeds: list[int]) -> dict:
    """XLA's cost and memory analysis of the config's train step and test and validation batches
    for each number of vmapped seeds, compiled from abstract shapes with XLA's own convolutions
    (the accelerators' program), and a roofline projection of the full protocol from them.

    The analysis is of one step (the scan-mode epoch compiles too slowly on a CPU to analyse);
    the projection multiplies by the protocol's steps and batches (``protocol_programs``). A
    program's roofline time is max(FLOPs / peak FLOP/s, bytes accessed / memory bandwidth): a
    lower bound that ignores launch latency, the host and the checkpoints. On the CPU the
    figures come from the CPU compiler, whose fusion (hence bytes accessed) differs from a GPU's."""
    from lop_jax.run_axis import stack_states
    from lop_jax.train import TaskData, init_state, make_eval_batch_of_runs, make_step_of_runs

    sds = jax.ShapeDtypeStruct
    k = cfg.num_classes
    counts = protocol_programs(cfg)
    peak = "bf16_flops" if cfg.precision == "bfloat16" else "tf32_flops"
    out: dict[str, Any] = {"device": device_name(), "network_width": cfg.network_width,
                           "train_batch_size": cfg.train_batch_size, "precision": cfg.precision,
                           "protocol_programs_per_run": counts, "hardware": HARDWARE,
                           "note": "roofline projection from XLA's cost analysis, not a measurement", "seeds": {}}
    for s in seeds:
        state = jax.eval_shape(lambda s=s: stack_states([init_state(cfg, i) for i in range(s)]))

        def data(per_class: int, s: int = s) -> TaskData:
            return TaskData(sds((k, per_class, 32, 32, 3), jnp.uint8), sds((s, k), jnp.int32), sds((s, 100), jnp.bool_))

        i32, f32 = sds((), jnp.int32), sds((), jnp.float32)
        programs = {}
        t0 = time.perf_counter()
        programs["train_step"] = _analysis(make_step_of_runs(cfg, conv_grad="xla").lower(
            state, data(cfg.train_images_per_class), sds((s, cfg.train_batch_size), jnp.int32), i32, i32,
            f32).compile())
        for name, batch, per_class, augment in (("test_batch", cfg.test_batch_size, cfg.test_images_per_class,
                                                 cfg.augment_test),
                                                ("val_batch", cfg.val_batch_size, cfg.val_images_per_class, False)):
            programs[name] = _analysis(make_eval_batch_of_runs(cfg, augment, conv_grad="xla").lower(
                state.params, state.batch_stats, data(per_class), sds((batch,), jnp.int32),
                sds((batch,), jnp.float32), sds((s, 2), jnp.uint32), i32).compile())
        runs = {"train_step": counts["train_steps"], "test_batch": counts["test_batches"],
                "val_batch": counts["val_batches"]}
        projection = {gpu: roofline_projection(programs, runs, hw, peak) for gpu, hw in HARDWARE.items()}
        out["seeds"][str(s)] = {"compile_seconds": time.perf_counter() - t0, "programs": programs,
                                "full_run_flops": sum(n * programs[p]["flops"] for p, n in runs.items()),
                                "projection": projection}
    return out


def _print(out: dict) -> None:
    width = max(len(k) for k in out)
    for k, v in out.items():
        if isinstance(v, dict):
            print(f"{k:<{width}}  {json.dumps(v)}")
        else:
            print(f"{k:<{width}}  {v:,.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def _print_cost(out: dict) -> None:
    print(f"XLA cost analysis on {out['device']} (width {out['network_width']}, batch {out['train_batch_size']}, "
          f"{out['precision']}); programs per run: {out['protocol_programs_per_run']}")
    for s, fig in out["seeds"].items():
        for name, p in fig["programs"].items():
            print(f"  {s} seed(s) {name:<10}  {p['flops'] / 1e9:10.2f} GFLOP  {p['bytes_accessed'] / 1e9:8.3f} GB "
                  f"accessed  peak {p['peak_bytes'] / 2**30:6.2f} GiB (temp {p['temp_bytes'] / 2**30:.2f} GiB)")
        print(f"  {s} seed(s): {fig['full_run_flops'] / 1e15:.1f} PFLOP per full run together")
        for gpu, proj in fig["projection"].items():
            print(f"    PROJECTION {gpu}: {proj['tensor_core_hours']:.2f} h at the tensor-core peak, "
                  f"{proj['fp32_cuda_core_hours']:.2f} h at the FP32 CUDA-core peak "
                  f"(memory bound alone {proj['memory_bound_hours']:.2f} h)")
    print("  (a roofline projection from published peaks, not a measurement: " + ", ".join(
        f"{gpu} {hw['fp32_flops'] / 1e12:g}/{hw['tf32_flops'] / 1e12:g}/{hw['bf16_flops'] / 1e12:g} TFLOP/s "
        f"FP32/TF32/BF16, {hw['memory_bytes'] / 1e12:g} TB/s" for gpu, hw in out["hardware"].items()) + ")")


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
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cbp-overhead", action="store_true",
                      help="time the mapped CBP step against the base step (alternating), print their ratio")
    mode.add_argument("--cost-analysis", action="store_true",
                      help="XLA's cost and memory analysis of the step and a roofline projection (no training)")
    p.add_argument("--rounds", type=int, default=15, help="--cbp-overhead: alternating rounds")
    p.add_argument("--seeds", default="1,5", help="--cost-analysis: numbers of vmapped seeds, a comma list")
    args = p.parse_args(argv)
    cfg = cli.config_from_args(args)
    prepare_process(cfg)  # cpu_kernels 'eigen_fused': XLA_FLAGS before JAX starts
    indices = cli.parse_indices(args.experiment_index)
    if args.cost_analysis:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds: expected a comma list of numbers of seeds, got {args.seeds!r}") from None
        if not seeds or min(seeds) < 1:
            raise ConfigError(f"--seeds: expected numbers of seeds >= 1, got {args.seeds!r}")
        out = cost_analysis(cfg, seeds)
        _print_cost(out)
    else:
        data = synthetic_data(cfg) if args.synthetic else load_data(cfg)
        if args.cbp_overhead:
            out = cbp_overhead(cfg, indices, data, args.rounds)
            _print(out)
            print(f"CBP step / base step (medians, {len(indices)} vmapped indices): {out['cbp_over_base']:.3f}; "
                  f"with decide_for_all_runs: {out['cbp_decided_once_over_base']:.3f}")
        else:
            out = benchmark(cfg, indices, data, args.steps)
            _print(out)
            hours = out["projected_full_run_seconds"] / 3600
            print(f"projected full run ({len(indices)} indices together): {hours:.2f} h")
        out["data"] = data.source
    out["config"] = args.config
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
