"""lop-jax's train step against the PyTorch twin's, alternating in one process.

    python -m benchmarks.step [--config configs/base_deep_learning_system.json] [--data-dir D]
        [--rounds 8] [--steps-per-round 3] [--cpus 2] [--synthetic] [--json OUT]

Both sides take the same step of the config (by default the paper's: width 64, batch 90) on the
first task's training images: gather the batch, augment, forward, masked loss, backward, SGD with
momentum and weight decay. lop-jax's is the jitted step of stacked runs exactly as its loop of
steps dispatches it (``lop_jax.train.make_step_of_runs`` fed by ``epoch_plan``, one run); the
twin's is ``benchmarks.torch_twin.train_step``. Each is compiled or warmed up untimed, then timed
in rounds of ``--steps-per-round`` steps (lop-jax's synchronised at the end of the round), the side
that goes first swapped every round; the figure is the ratio of the medians of the per-step times.
The process is pinned to ``--cpus`` CPUs and PyTorch uses as many threads, so that XLA, which sizes
its thread pool from the CPUs it may use, and PyTorch run on the same cores.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks import timing

DEFAULT_CONFIG = "configs/base_deep_learning_system.json"


def first_task_step(cfg: Any, data: Any) -> tuple[Any, ...]:
    """lop-jax's step of stacked runs as its loop dispatches it, for run index 0 in the first task:
    ``(step, state, images, epoch, lr, batches, numbers)``, the last two one epoch's plan."""
    import jax
    import numpy as np

    from lop_jax.run_axis import stack_states
    from lop_jax.train import class_order_for, epoch_plan, init_state, make_step_of_runs, task_data

    n_active = cfg.active_classes(0)
    state = stack_states([init_state(cfg, 0)])
    images = task_data(jax.device_put(data.train), stack_states([class_order_for(0, data.num_classes)]), n_active)
    epoch, lr = jax.device_put(np.int32(0)), jax.device_put(np.float32(cfg.stepsize))
    batches, numbers = epoch_plan(state.key, epoch, n_active * data.train.shape[1], cfg.train_batch_size)
    return make_step_of_runs(cfg), state, images, epoch, lr, batches, numbers


def build_runners(cfg: Any, data: Any, steps_per_round: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two sides' rounds of steps (each a callable doing ``steps_per_round`` steps and waiting
    for them), warmed up, and what describes them."""
    import jax
    import numpy as np
    import torch

    from benchmarks import torch_twin
    from lop_jax.train import class_order_for

    step, state, images, epoch, lr, batches, numbers = first_task_step(cfg, data)
    n_active, order = cfg.active_classes(0), class_order_for(0, data.num_classes)
    jax_side = {"state": state, "next": 0}

    def lop_jax_round() -> None:
        st = jax_side["state"]
        for _ in range(steps_per_round):
            i = jax_side["next"] % len(batches)
            st, loss, _, _ = step(st, images, batches[i], epoch, numbers[i], lr)
            jax_side["next"] += 1
        jax.block_until_ready((st, loss))
        jax_side["state"] = st

    gen = torch.Generator().manual_seed(0)
    model = torch_twin.ResNet18(cfg.network_width)
    torch_twin.init_weights(model, gen)
    opt = torch_twin.make_optimizer(model, cfg)
    used = np.array(order)[:n_active]
    x = torch_twin.normalize(data.train[used].reshape(-1, 32, 32, 3))
    labels = torch.from_numpy(np.repeat(used, data.train.shape[1]).astype(np.int64))
    mask = torch.zeros(torch_twin.NUM_OUTPUTS, dtype=torch.bool)
    mask[torch.from_numpy(used)] = True
    steps = x.shape[0] // cfg.train_batch_size
    perm = torch.randperm(x.shape[0], generator=gen)[:steps * cfg.train_batch_size].reshape(steps, -1)
    torch_side = {"next": 0}

    def torch_round() -> None:
        for _ in range(steps_per_round):
            idx = perm[torch_side["next"] % steps]
            torch_twin.train_step(model, opt, x[idx], labels[idx], mask, gen)
            torch_side["next"] += 1

    for _ in range(2):  # lop-jax: the first call compiles; PyTorch: its first calls allocate
        lop_jax_round()
        torch_round()
    described = {"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                 "jax_devices": [str(d) for d in jax.devices()]}
    return {"lop_jax": lop_jax_round, "torch": torch_round}, described


def measure(cfg: Any, data: Any, rounds: int, steps_per_round: int) -> dict[str, Any]:
    """Warm both sides up, time them alternating, and return the figures (per-step seconds)."""
    runners, described = build_runners(cfg, data, steps_per_round)
    times = timing.alternate(runners, rounds)
    per_step = {name: [{"wall": c["wall"] / steps_per_round} for c in calls] for name, calls in times.items()}
    out = timing.summary(per_step, "lop_jax", "torch")
    med = out["medians"]
    return {"benchmark": "train step", "network_width": cfg.network_width, "train_batch_size": cfg.train_batch_size,
            "rounds": rounds, "steps_per_round": steps_per_round,
            "order": timing.alternation(list(runners), rounds),
            "step_seconds": {name: m["wall"] for name, m in med.items()},
            "images_per_second": {name: cfg.train_batch_size / m["wall"] for name, m in med.items()},
            "ratio_lop_jax_over_torch": out["ratios"]["wall_lop_jax_over_torch"],
            "calls": out["calls"], **described}


def main(argv: list[str] | None = None) -> int:
    """Parse, pin, load the data, measure, print and write the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--data-dir", default=None, help="the folder holding cifar-100-python (the config's data_path)")
    p.add_argument("--synthetic", action="store_true", help="random images of the config's sizes instead of data")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2, help="pin to this many CPUs; PyTorch uses as many threads")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    cpus = timing.pin_cpus(args.cpus)
    import torch

    torch.set_num_threads(args.cpus)
    from lop_jax.config import load_config, parse_override
    from lop_jax.cpu_kernels import prepare_process
    from lop_jax.data import load_data

    overrides = dict(parse_override(s) for s in args.set)
    if args.data_dir is not None:
        overrides["data_path"] = args.data_dir
    cfg = load_config(args.config, overrides)
    prepare_process(cfg)  # cpu_kernels 'eigen_fused': XLA_FLAGS before JAX starts (recorded in "device")
    if args.synthetic:
        from experiments.benchmark import synthetic_data

        data = synthetic_data(cfg)
    else:
        data = load_data(cfg)
    out = {"device": timing.device_description(), "pinned_cpus": cpus, "config": args.config,
           "overrides": args.set, "data": data.source, **measure(cfg, data, args.rounds, args.steps_per_round)}
    steps = out["step_seconds"]
    print(f"train step, width {out['network_width']}, batch {out['train_batch_size']}, on {out['device']['cpu']} "
          f"({len(cpus)} CPUs): lop-jax {steps['lop_jax']:.3f} s, PyTorch {steps['torch']:.3f} s per step "
          f"(medians of {args.rounds} alternating rounds of {args.steps_per_round}); "
          f"lop-jax / PyTorch = {out['ratio_lop_jax_over_torch']:.3f}")
    timing.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
