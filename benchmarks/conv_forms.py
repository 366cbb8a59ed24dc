"""Every convolution of the ResNet-18 in each form the ``eigen`` CPU kernels could compute it in.

    python -m benchmarks.conv_forms [--config configs/base_deep_learning_system.json] [--batch N]
        [--rounds 5] [--min-round-seconds 0.05] [--cpus 2] [--json OUT]

What ``lop_jax.conv.eigen_choices`` rests on. For each distinct convolution of the config's
network, on random data of the train batch's size and compiled with the eigen kernels' XLA
options, each pass is timed in every form that computes it:

* forward: ``xla`` (XLA's convolution), ``patches`` (``conv_patches``), ``pairs`` (``conv_pairs``,
  where it applies);
* kernel gradient: XLA's transpose of each of those forms, and ``slices`` (the tap sum);
* input gradient (not for the stem, whose input is the data): XLA's transpose of each form, and
  ``taps`` (``input_grad_taps``).

The candidates of a pass alternate in rounds of as many calls as the fastest needs for
``--min-round-seconds``, the one that goes first rotated every round; the figures are medians.
Each pass records the form the eigen mode picks and the fastest one; the totals weigh each shape by
its count in the network and compare what the eigen mode picks with the eigen kernels' earlier
choice (XLA's convolution and kernel gradient everywhere, the tap-sum input gradient for every
strided convolution) and with the fastest candidate of every pass.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from benchmarks import layers, timing

PASSES = ("forward", "kernel_grad", "input_grad")
# the eigen kernels' choice before the patches and pairs forms (for the totals' comparison)
EARLIER = {"forward": "xla", "kernel_grad": "xla"}


def candidates(layer: dict[str, Any], data: tuple[Any, Any, Any],
               options: dict[str, str] | None) -> dict[str, dict[str, Callable[[], Any]]]:
    """Per pass, each candidate form's jitted call on ``data`` (compiled here), by name."""
    import jax
    from jax import lax

    from lop_jax.conv import DIMENSION_NUMBERS, conv_pairs, conv_patches, input_grad_taps, kernel_grad_slices

    s, pad, k = (layer["stride"],) * 2, layers.padding(layer), layer["kernel"]
    x, w, dy = (jax.numpy.asarray(a) for a in data)
    forms: dict[str, Callable[[Any, Any], Any]] = {
        "xla": lambda x_, w_: lax.conv_general_dilated(x_, w_, s, pad, dimension_numbers=DIMENSION_NUMBERS),
        "patches": lambda x_, w_: conv_patches(x_, w_, s, pad),
    }
    if s == (1, 1) and k == 3 and layer["size"] % 2 == 0:
        forms["pairs"] = lambda x_, w_: conv_pairs(x_, w_, pad)
    fns: dict[str, dict[str, Callable[..., Any]]] = {"forward": {}, "kernel_grad": {}, "input_grad": {}}
    for name, f in forms.items():
        fns["forward"][name] = lambda x_, w_, dy_, f=f: f(x_, w_)
        fns["kernel_grad"][name] = lambda x_, w_, dy_, f=f: jax.linear_transpose(lambda v: f(x_, v), w_)(dy_)[0]
        fns["input_grad"][name] = lambda x_, w_, dy_, f=f: jax.linear_transpose(lambda v: f(v, w_), x_)(dy_)[0]
    fns["kernel_grad"]["slices"] = lambda x_, w_, dy_: kernel_grad_slices(x_, dy_, (k, k), s, pad)
    fns["input_grad"]["taps"] = lambda x_, w_, dy_: input_grad_taps(w_, dy_, x_.shape, s, pad)
    if not layers.needs_input_grad(layer):
        del fns["input_grad"]
    out: dict[str, dict[str, Callable[[], Any]]] = {}
    for pass_name, by_form in fns.items():
        out[pass_name] = {}
        for name, fn in by_form.items():  # the data are arguments, not constants XLA could fold
            compiled = jax.jit(fn, compiler_options=options).lower(x, w, dy).compile()
            jax.block_until_ready(compiled(x, w, dy))
            out[pass_name][name] = lambda c=compiled: jax.block_until_ready(c(x, w, dy))
    return out


def earlier_choice(layer: dict[str, Any]) -> dict[str, str]:
    """The eigen kernels' choice for the layer before the patches and pairs forms."""
    return {**EARLIER, "input_grad": "taps" if layer["stride"] != 1 else "xla"}


def summarise_layer(times: dict[str, dict[str, list[dict[str, float]]]], picked: dict[str, str]) -> dict[str, Any]:
    """Per pass: every candidate's median seconds, the picked and the fastest form."""
    out = {}
    for pass_name, by_form in times.items():
        med = {name: m["wall"] for name, m in timing.medians(by_form).items()}
        out[pass_name] = {"seconds": med, "picked": picked[pass_name], "fastest": min(med, key=med.get),
                          "calls": by_form}
    return out


def totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per pass, the network's seconds (each shape × its count) with the eigen mode's picks, with
    the earlier choice and with the fastest candidate everywhere."""
    out: dict[str, dict[str, float]] = {}
    for pass_name in PASSES:
        got = {"picked": 0.0, "earlier": 0.0, "fastest": 0.0}
        for row in rows:
            if pass_name not in row["passes"]:
                continue
            p, n = row["passes"][pass_name], len(row["layers"])
            got["picked"] += n * p["seconds"][p["picked"]]
            got["earlier"] += n * p["seconds"][row["earlier"][pass_name]]
            got["fastest"] += n * p["seconds"][p["fastest"]]
        out[pass_name] = got
    out["all"] = {key: sum(out[p][key] for p in PASSES) for key in ("picked", "earlier", "fastest")}
    return out


def measure(width: int, batch: int, rounds: int, min_round_seconds: float, options: dict[str, str] | None,
            seed: int = 0) -> dict[str, Any]:
    """Every distinct convolution of the network at ``width``, every pass in every form."""
    from lop_jax.conv import eigen_choices

    rows = []
    for layer in layers.conv_layers(width):
        data = layers.inputs(layer, batch, seed)
        picked = eigen_choices(data[0].shape, data[1].shape, (layer["stride"],) * 2, layers.padding(layer))
        runs = candidates(layer, data, options)
        times = {}
        for pass_name, by_form in runs.items():
            times[pass_name], _ = layers.time_rounds(by_form, rounds, min_round_seconds)
        rows.append({**layer, "earlier": earlier_choice(layer), "passes": summarise_layer(times, picked)})
        said = "; ".join(f"{p} " + ", ".join(f"{n} {1e3 * t:.2f}{'*' if n == v['picked'] else ''}"
                                              for n, t in v["seconds"].items())
                         for p, v in rows[-1]["passes"].items())
        print(f"  {layer['size']:>2}x{layer['size']:<2} {layer['ci']:>3}->{layer['co']:<3} k{layer['kernel']} "
              f"s{layer['stride']} x{len(layer['layers'])}: {said} ms (* picked)", flush=True)
    return {"layers": rows, "totals": totals(rows)}


def main(argv: list[str] | None = None) -> int:
    """Parse, pin, measure, print and write the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv_forms", description=__doc__.splitlines()[0])
    layers.layer_arguments(p)
    p.add_argument("--cpus", type=int, default=2, help="pin to this many CPUs")
    args = layers.parse_layer_arguments(p, argv)
    from lop_jax.config import load_config

    cfg = load_config(args.config, {"cpu_kernels": "eigen_fused"})
    batch = args.batch or cfg.train_batch_size
    cpus = timing.pin_cpus(args.cpus)
    from lop_jax.cpu_kernels import compiler_options, prepare_process

    prepare_process(cfg)  # the eigen_fused process flag, before JAX starts
    import jax

    options = compiler_options(cfg)
    print(f"convolutions of the width-{cfg.network_width} ResNet-18 at batch {batch}, every form, on "
          f"{timing.cpu_model()} ({len(cpus)} CPUs):", flush=True)
    got = measure(cfg.network_width, batch, args.rounds, args.min_round_seconds, options)
    out = {"benchmark": "convolution forms of the eigen kernels", "device": timing.device_description(),
           "pinned_cpus": cpus, "config": args.config, "network_width": cfg.network_width, "batch": batch,
           "rounds": args.rounds, "min_round_seconds": args.min_round_seconds, "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "compiler_options": options, **got}
    t = out["totals"]["all"]
    print(f"all convolutions, every pass: {t['picked']:.4f} s as the eigen mode picks, {t['earlier']:.4f} s "
          f"with its earlier choice, {t['fastest']:.4f} s with the fastest of each pass")
    timing.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
