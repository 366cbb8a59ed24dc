"""Resets at task boundaries, as the reference's two baselines: the head, or the whole network
(the retrained network). BatchNorm running statistics and the optimiser's momentum are kept, as
in the reference (semantics §6)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lop_jax.methods.base import MethodArgs, MethodUpdate, Params, PlasticityMethod
from lop_jax.methods.shrink_and_perturb import standard_normals


def initial_std(path: tuple, x: jax.Array) -> float | None:
    """The standard deviation of a parameter's initial law (semantics §3), None for a constant
    initialisation (biases 0, BatchNorm scale 1): conv kernels (HWIO) N(0, 2/fan_in), Linear
    kernels (in, out) N(0, 1/fan_in)."""
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    if name == "kernel" and x.ndim == 4:
        return math.sqrt(2.0 / math.prod(x.shape[:-1]))
    if name == "kernel" and x.ndim == 2:
        return math.sqrt(1.0 / x.shape[0])
    if name in ("bias", "scale"):
        return None
    raise ValueError(f"do not know the initial law of parameter {jax.tree_util.keystr(path)}")


def reinitialise(params: Params, key: jax.Array) -> Params:
    """Fresh parameters with the reference's initial law, same tree and shapes."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    noise = standard_normals(key, [x for _, x in flat])
    out = []
    for (path, x), z in zip(flat, noise, strict=True):
        std = initial_std(path, x)
        if std is not None:
            out.append(z * std)
        else:
            name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
            out.append(jnp.ones_like(x) if name == "scale" else jnp.zeros_like(x))
    return jax.tree_util.tree_unflatten(treedef, out)


def head_reset() -> PlasticityMethod:
    """At every task boundary, the Linear head re-initialised (the reference key ``reset_head``)."""

    def at_task_boundary(args: MethodArgs) -> MethodUpdate:
        params = dict(args.params)
        params["fc"] = reinitialise(args.params["fc"], args.key)
        return MethodUpdate(params, args.batch_stats, args.opt_state, args.state, {})

    return PlasticityMethod("head_reset", at_task_boundary=at_task_boundary)


def full_reset() -> PlasticityMethod:
    """At every task boundary, every parameter re-initialised (the reference key ``reset_network``)."""

    def at_task_boundary(args: MethodArgs) -> MethodUpdate:
        return MethodUpdate(reinitialise(args.params, args.key), args.batch_stats, args.opt_state, args.state, {})

    return PlasticityMethod("full_reset", at_task_boundary=at_task_boundary)
