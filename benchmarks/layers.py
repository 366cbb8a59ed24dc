"""Every convolution of the ResNet-18, lop-jax's against PyTorch's, alternating in one process.

    python -m benchmarks.layers [--config configs/base_deep_learning_system.json] [--batch N]
        [--set cpu_kernels=eigen_fused] [--rounds 5] [--min-round-seconds 0.05] [--cpus 2] [--json OUT]

Where the train step's time difference comes from: each distinct convolution of the config's
network (its input size, channels, kernel and stride; how many of it the network has) is run on
random data of the train batch's size, forward alone and forward with its backward pass, on both
sides. lop-jax's is the convolution its model calls (``lop_jax.conv.conv_fn("auto")``, so the
kernel gradient is the tap sum or XLA's own by the same per-layer rule, recorded; under the
config's ``cpu_kernels`` ``eigen`` or ``eigen_fused``, ``conv_fn("eigen")`` compiled with that
config's XLA options, as its model's are), jitted; the
twin's is ``torch.nn.functional.conv2d`` on NCHW tensors, as the twin's network runs it. The
backward pass computes what the train step needs: the kernel gradient, and the input gradient
except for the stem (its input is the data). Biases are left out (on both sides an addition and a
sum beside the convolution). Each side's wall time and CPU time (every thread of the process) are
measured over a round of calls (enough for ``--min-round-seconds``, the same count on both sides)
and divided by the count; CPU over wall says how many of the pinned cores the side kept busy. The
rounds alternate the sides, the one that goes first swapped every round; the figures are the
medians, and a total weighs each shape by its count in the network.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import timing

DEFAULT_CONFIG = "configs/base_deep_learning_system.json"
SIDES = ("lop_jax", "torch")
PASSES = ("forward", "forward_backward")


def conv_layers(width: int, image_size: int = 32) -> list[dict[str, Any]]:
    """The convolutions of ``lop_jax.model.ResNet18(width)`` (ReLU), in network order, grouped by
    shape: ``size`` (input height = width), ``ci``, ``co``, ``kernel``, ``stride``, and ``layers``
    (the parameter paths of the convolutions of that shape)."""
    convs = [("stem_conv", image_size, 3, width, 3, 1)]
    size, cin = image_size, width
    for b in range(8):
        stage = b // 2
        cout, stride = width * 2 ** stage, (2 if stage > 0 and b % 2 == 0 else 1)
        convs.append((f"block{b}.conv1", size, cin, cout, 3, stride))
        out = size // stride
        convs.append((f"block{b}.conv2", out, cout, cout, 3, 1))
        if stride != 1 or cin != cout:
            convs.append((f"block{b}.shortcut_conv", size, cin, cout, 1, stride))
        size, cin = out, cout
    groups: dict[tuple[int, ...], dict[str, Any]] = {}
    for name, *shape in convs:
        key = tuple(shape)
        if key not in groups:
            groups[key] = dict(zip(("size", "ci", "co", "kernel", "stride"), key, strict=True), layers=[])
        groups[key]["layers"].append(name)
    return list(groups.values())


def forward_flops(layer: dict[str, Any], batch: int) -> int:
    """Multiply-adds × 2 of one forward pass of the convolution at ``batch`` images."""
    out = layer["size"] // layer["stride"]
    return 2 * batch * out * out * layer["kernel"] ** 2 * layer["ci"] * layer["co"]


def inputs(layer: dict[str, Any], batch: int, seed: int) -> tuple[Any, Any, Any]:
    """Random (input [B, H, W, Ci], kernel [k, k, Ci, Co], output cotangent [B, Ho, Wo, Co]) of the
    layer, float32, NHWC/HWIO; both sides get the same numbers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k, out = layer["kernel"], layer["size"] // layer["stride"]
    x = rng.standard_normal((batch, layer["size"], layer["size"], layer["ci"]), np.float32)
    w = rng.standard_normal((k, k, layer["ci"], layer["co"]), np.float32) * np.float32(0.05)
    dy = rng.standard_normal((batch, out, out, layer["co"]), np.float32)
    return x, w, dy


def padding(layer: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The layer's explicit padding in the model: 1 on every side for 3×3 kernels (PyTorch's), none for 1×1."""
    return ((1, 1), (1, 1)) if layer["kernel"] == 3 else ((0, 0), (0, 0))


def needs_input_grad(layer: dict[str, Any]) -> bool:
    """Whether the train step needs the layer's input gradient (not the stem's: its input is the data)."""
    return layer["layers"] != ["stem_conv"]


def lop_jax_side(layer: dict[str, Any], data: tuple[Any, Any, Any], eigen: bool = False,
                 options: dict[str, str] | None = None) -> tuple[dict[str, Callable[[], Any]], str]:
    """lop-jax's forward and forward+backward of the layer on ``data`` (jitted with the XLA
    ``options``, compiled here), returning the output and ``(output, gradients)``, and the kernel
    gradient its ``auto`` rule picks (with ``eigen``: the ``eigen`` mode, XLA's own)."""
    import jax
    import jax.numpy as jnp

    from lop_jax.conv import DIMENSION_NUMBERS, conv_fn, slices_pay_off
    k, s = layer["kernel"], layer["stride"]
    pad = padding(layer)
    conv = conv_fn("eigen" if eigen else "auto")
    x, w, dy = (jnp.asarray(a) for a in data)

    def forward(x_: Any, w_: Any) -> Any:
        return conv(x_, w_, (s, s), pad, dimension_numbers=DIMENSION_NUMBERS)

    wrt = (0, 1) if needs_input_grad(layer) else (1,)

    def forward_backward(x_: Any, w_: Any, dy_: Any) -> Any:
        y, pullback = jax.vjp(forward, x_, w_)
        grads = pullback(dy_)
        return y, tuple(grads[i] for i in wrt)

    fwd = jax.jit(forward, compiler_options=options)
    both = jax.jit(forward_backward, compiler_options=options)
    jax.block_until_ready((fwd(x, w), both(x, w, dy)))
    grad = "xla" if eigen or not slices_pay_off((k, k, layer["ci"], layer["co"]), (s, s)) else "slices"
    return {"forward": lambda: jax.block_until_ready(fwd(x, w)),
            "forward_backward": lambda: jax.block_until_ready(both(x, w, dy))}, grad


def torch_side(layer: dict[str, Any], data: tuple[Any, Any, Any]) -> dict[str, Callable[[], Any]]:
    """The twin's forward and forward+backward of the layer on ``data`` (``F.conv2d``, NCHW,
    warmed up), returning what :func:`lop_jax_side`'s do, in NCHW/OIHW."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    s, pad = layer["stride"], (1 if layer["kernel"] == 3 else 0)
    x_nhwc, w_hwio, dy_nhwc = data
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    w = torch.from_numpy(np.ascontiguousarray(w_hwio.transpose(3, 2, 0, 1))).requires_grad_(True)
    dy = torch.from_numpy(np.ascontiguousarray(dy_nhwc.transpose(0, 3, 1, 2)))
    x_grad = x.clone().requires_grad_(needs_input_grad(layer))

    def forward() -> Any:
        with torch.no_grad():
            return F.conv2d(x, w, stride=s, padding=pad)

    def forward_backward() -> Any:
        w.grad, x_grad.grad = None, None
        y = F.conv2d(x_grad, w, stride=s, padding=pad)
        y.backward(dy)
        return y, ((x_grad.grad, w.grad) if needs_input_grad(layer) else (w.grad,))

    for _ in range(2):
        forward()
        forward_backward()
    return {"forward": forward, "forward_backward": forward_backward}


def _timed(fn: Callable[[], Any], calls: int) -> Callable[[], float]:
    """``fn`` called ``calls`` times as one runner that returns the CPU seconds (all threads) taken."""
    def run() -> float:
        c0 = time.process_time()
        for _ in range(calls):
            fn()
        return time.process_time() - c0
    return run


def calls_per_round(seconds_per_call: float, min_round_seconds: float) -> int:
    """How many calls make a round of at least ``min_round_seconds`` (at least one), so that
    sub-millisecond convolutions are timed over many calls rather than one."""
    if seconds_per_call <= 0:
        raise ValueError(f"a call took {seconds_per_call} s")
    return max(1, math.ceil(min_round_seconds / seconds_per_call))


def _per_call(times: dict[str, list[dict[str, float]]], calls: int) -> dict[str, list[dict[str, float]]]:
    return {side: [{k: v / calls for k, v in c.items()} for c in cs] for side, cs in times.items()}


def summarise(layer_times: dict[str, dict[str, list[dict[str, float]]]], layer: dict[str, Any],
              batch: int) -> dict[str, Any]:
    """One shape's figures from its calls (``{pass: {side: [{"wall", "cpu"}, ...]}}``): medians,
    CPU over wall, the ratio of medians and the achieved GFLOP/s of the forward pass."""
    out: dict[str, Any] = {}
    flops = forward_flops(layer, batch)
    for pass_name, times in layer_times.items():
        med = timing.medians(times)
        out[pass_name] = {
            "seconds": {side: med[side]["wall"] for side in SIDES},
            "cpu_over_wall": {side: med[side]["cpu"] / med[side]["wall"] for side in SIDES},
            "ratio_lop_jax_over_torch": med["lop_jax"]["wall"] / med["torch"]["wall"],
            "calls": times,
        }
        if pass_name == "forward":
            out[pass_name]["gflops_per_second"] = {side: flops / med[side]["wall"] / 1e9 for side in SIDES}
    return out


def time_rounds(runs: dict[str, Callable[[], Any]], rounds: int,
                min_round_seconds: float) -> tuple[dict[str, list[dict[str, float]]], int]:
    """Time the named calls alternating: ``rounds`` rounds of as many calls as
    :func:`calls_per_round` gives for the fastest (the same count for all); per name, every round's
    wall and CPU seconds per call, and that count."""
    once = timing.alternate(runs, 2)
    calls = calls_per_round(min(c["wall"] for cs in once.values() for c in cs), min_round_seconds)
    got = timing.alternate({name: _timed(fn, calls) for name, fn in runs.items()}, rounds,
                           measure=lambda _name, cpu: {"cpu": cpu})
    return _per_call(got, calls), calls


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pass and side, the seconds of all the network's convolutions (each shape's median × its
    count), and their ratio."""
    out = {}
    for pass_name in PASSES:
        secs = {side: sum(len(r["layers"]) * r[pass_name]["seconds"][side] for r in rows) for side in SIDES}
        out[pass_name] = {"seconds": secs, "ratio_lop_jax_over_torch": secs["lop_jax"] / secs["torch"]}
    return out


def measure(width: int, batch: int, rounds: int, min_round_seconds: float = 0.05, seed: int = 0,
            eigen: bool = False, options: dict[str, str] | None = None) -> dict[str, Any]:
    """Every distinct convolution of the network at ``width``, both sides, alternating rounds of
    as many calls as :func:`calls_per_round` gives for the faster side (the same on both);
    ``eigen`` and ``options`` as :func:`lop_jax_side` takes them."""
    rows = []
    for layer in conv_layers(width):
        data = inputs(layer, batch, seed)
        jax_runs, grad = lop_jax_side(layer, data, eigen, options)
        torch_runs = torch_side(layer, data)
        layer_times, calls = {}, {}
        for pass_name in PASSES:
            layer_times[pass_name], calls[pass_name] = time_rounds(
                {"lop_jax": jax_runs[pass_name], "torch": torch_runs[pass_name]}, rounds, min_round_seconds)
        rows.append({**layer, "kernel_grad": grad, "forward_flops": forward_flops(layer, batch),
                     "calls_per_round": calls, **summarise(layer_times, layer, batch)})
        f, b = rows[-1]["forward"], rows[-1]["forward_backward"]
        print(f"  {layer['size']:>2}x{layer['size']:<2} {layer['ci']:>3}->{layer['co']:<3} k{layer['kernel']} "
              f"s{layer['stride']} x{len(layer['layers'])}: forward {1e3 * f['seconds']['lop_jax']:7.1f} / "
              f"{1e3 * f['seconds']['torch']:7.1f} ms, with backward {1e3 * b['seconds']['lop_jax']:7.1f} / "
              f"{1e3 * b['seconds']['torch']:7.1f} ms (lop-jax / PyTorch)", flush=True)
    return {"layers": rows, "totals": totals(rows)}


def layer_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a benchmark that times the network's convolutions one by one."""
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--batch", type=int, default=None, help="images per call (default: the config's train batch)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-round-seconds", type=float, default=0.05,
                   help="repeat a convolution within a round until the round takes this long (default 0.05)")
    p.add_argument("--json", help="write the figures to this file")


def parse_layer_arguments(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse :func:`layer_arguments` (and the caller's own), refusing rounds below 1 and negative
    round seconds."""
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.min_round_seconds < 0:
        p.error(f"--min-round-seconds must not be negative, got {args.min_round_seconds}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse, pin, measure, print and write the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.layers", description=__doc__.splitlines()[0])
    layer_arguments(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (e.g. cpu_kernels=eigen_fused)")
    p.add_argument("--cpus", type=int, default=2, help="pin to this many CPUs; PyTorch uses as many threads")
    args = parse_layer_arguments(p, argv)
    from lop_jax.config import load_config, parse_override
    from lop_jax.cpu_kernels import prepare_process

    cfg = load_config(args.config, dict(parse_override(o) for o in args.set))
    if cfg.activation != "relu":
        p.error(f"--config: only ReLU networks are benchmarked here, {args.config} has {cfg.activation!r}")
    batch = args.batch or cfg.train_batch_size
    cpus = timing.pin_cpus(args.cpus)
    prepare_process(cfg)  # cpu_kernels 'eigen_fused': XLA_FLAGS before JAX starts (recorded below)
    import jax
    import torch

    from lop_jax.cpu_kernels import compiler_options, uses_eigen

    torch.set_num_threads(args.cpus)
    print(f"convolutions of the width-{cfg.network_width} ResNet-18 at batch {batch} on "
          f"{timing.cpu_model()} ({len(cpus)} CPUs):", flush=True)
    got = measure(cfg.network_width, batch, args.rounds, args.min_round_seconds,
                  eigen=uses_eigen(cfg), options=compiler_options(cfg))
    out = {"benchmark": "convolutions, layer by layer", "device": timing.device_description(), "pinned_cpus": cpus,
           "config": args.config, "network_width": cfg.network_width, "batch": batch, "rounds": args.rounds,
           "min_round_seconds": args.min_round_seconds, "overrides": args.set, "cpu_kernels": cfg.cpu_kernels,
           "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), **got}
    for pass_name, t in out["totals"].items():
        print(f"all convolutions, {pass_name.replace('_', ' + ')}: lop-jax {t['seconds']['lop_jax']:.3f} s, "
              f"PyTorch {t['seconds']['torch']:.3f} s; lop-jax / PyTorch = {t['ratio_lop_jax_over_torch']:.2f}")
    timing.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
