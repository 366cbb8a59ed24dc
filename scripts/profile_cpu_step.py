"""Time the ResNet-18 train-step gradient on the CPU with conv_grad "xla", "slices" and "auto" (lop_jax.conv).

One process, variants interleaved (the machine is shared: compare the ratios, not the absolute
times). For each width: the jitted ``value_and_grad`` of the training loss (train-mode forward with
BatchNorm statistics updated, cross-entropy over 100 logits, batch 90, as in ``lop_jax.train``),
min and median over the repeats, and the ratios to "xla". With ``--breakdown`` the width-64 step
is split into: the forward pass alone, the gradient with the conv kernels held constant
(everything but the conv kernel gradients), and the full gradient. With
``--vmap-runs R`` the step is also timed vmapped over R runs with batched parameters, as the
multi-run training loop does (there "slices"/"auto" also bring lop_jax.conv's batching rule, one
convolution per run, where "xla" gets XLA's grouped convolutions).

    python scripts/profile_cpu_step.py                      # widths 64 and 8, vmap at 8: ~3-5 minutes
    python scripts/profile_cpu_step.py --widths 16 --repeats 5 --vmap-runs 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lop_jax.model import ResNet18, init_model

MODES = ("xla", "slices", "auto")


def make_grad_fn(width: int, mode: str, dtype: jnp.dtype, frozen_kernels: bool = False) -> Callable:
    """``(params, batch_stats, x, labels) → ((loss, batch_stats), grads)``; with ``frozen_kernels``
    the conv kernels are constants (their gradients are not computed)."""
    model = ResNet18(width=width, dtype=dtype, conv_grad=mode)

    def loss_fn(params, batch_stats, x, labels):
        (logits, _), new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                            return_features=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new_vars["batch_stats"]

    if not frozen_kernels:
        return jax.value_and_grad(loss_fn, has_aux=True)

    def grad_rest(params, batch_stats, x, labels):
        flat = flax.traverse_util.flatten_dict(params)
        is_kernel = {k: k[-1] == "kernel" and k[0] != "fc" for k in flat}
        kernels = {k: v for k, v in flat.items() if is_kernel[k]}
        rest = {k: v for k, v in flat.items() if not is_kernel[k]}

        def f(rest_):
            return loss_fn(flax.traverse_util.unflatten_dict({**rest_, **kernels}), batch_stats, x, labels)

        return jax.value_and_grad(f, has_aux=True)(rest)

    return grad_rest


def make_forward_fn(width: int, dtype: jnp.dtype) -> Callable:
    """The train-mode forward pass and loss only."""
    model = ResNet18(width=width, dtype=dtype, conv_grad="xla")

    def fwd(params, batch_stats, x, labels):
        logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                       mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_vars["batch_stats"]

    return fwd


def time_interleaved(fns: dict[str, Callable], args: dict[str, tuple], repeats: int) -> dict[str, list[float]]:
    """Compile (and warm) every function, then time them round-robin; seconds per call."""
    for name, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args[name]))
        print(f"    compiled+first call {name}: {time.perf_counter() - t:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t)
    return times


def report(times: dict[str, list[float]], baseline: str = "xla") -> None:
    """Min and median per variant, and each mode's speed-up over ``baseline``."""
    for name, ts in times.items():
        print(f"  {name:28s} min {1e3 * min(ts):8.1f} ms   median {1e3 * statistics.median(ts):8.1f} ms")
    for other in MODES:
        if other != baseline and other in times and baseline in times:
            print(f"  ratio {baseline}/{other}: min {min(times[baseline]) / min(times[other]):.2f}×, "
                  f"median {statistics.median(times[baseline]) / statistics.median(times[other]):.2f}×")


def batch_inputs(batch: int, runs: int | None) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    lead = (runs,) if runs else ()
    x = jnp.asarray(rng.normal(size=(*lead, batch, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 100, size=(*lead, batch)), jnp.int32)
    return x, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--batch", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="split the width-64 step into forward / all but conv kernel grads / full")
    parser.add_argument("--vmap-runs", type=int, default=2, help="also time the step vmapped over R runs (0: no)")
    parser.add_argument("--vmap-width", type=int, default=8)
    args = parser.parse_args()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, batch {args.batch}, {args.dtype}", flush=True)

    for width in args.widths:
        params, batch_stats = jax.jit(init_model, static_argnums=0)(ResNet18(width=width), jax.random.PRNGKey(0))
        x, labels = batch_inputs(args.batch, None)
        fns = {mode: jax.jit(make_grad_fn(width, mode, dtype)) for mode in MODES}
        if args.breakdown and width == 64:
            fns["forward only"] = jax.jit(make_forward_fn(width, dtype))
            fns["all but conv kernel grads"] = jax.jit(make_grad_fn(width, "xla", dtype, True))
        print(f"width {width}: value_and_grad of the train loss", flush=True)
        times = time_interleaved(fns, {name: (params, batch_stats, x, labels) for name in fns}, args.repeats)
        report(times)
        if args.breakdown and width == 64:
            rest = min(times["all but conv kernel grads"])
            print(f"  forward {1e3 * min(times['forward only']):.0f} ms; forward + all gradients but the conv "
                  f"kernels' {1e3 * rest:.0f} ms; conv kernel gradients ≈ "
                  + ", ".join(f"{1e3 * (min(times[m]) - rest):.0f} ms ({m})" for m in MODES))

    if args.vmap_runs:
        width, runs = args.vmap_width, args.vmap_runs
        init = jax.jit(jax.vmap(lambda k: init_model(ResNet18(width=width), k)))
        params, batch_stats = init(jax.random.split(jax.random.PRNGKey(0), runs))
        x, labels = batch_inputs(args.batch, runs)
        fns = {mode: jax.jit(jax.vmap(make_grad_fn(width, mode, dtype))) for mode in MODES}
        print(f"width {width}, vmapped over {runs} runs (batched params)", flush=True)
        report(time_interleaved(fns, {name: (params, batch_stats, x, labels) for name in fns}, args.repeats))


if __name__ == "__main__":
    main()
