"""Shrink and perturb as the paper runs it (Dohare et al., 2024): Gaussian noise added to every
parameter after every step; the shrink is the optimiser's weight decay."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lop_jax.methods.base import MethodArgs, MethodUpdate, Params, PlasticityMethod

NAME = "shrink_and_perturb"


def standard_normals(key: jax.Array, leaves: list[jax.Array]) -> list[jax.Array]:
    """Independent N(0, 1) arrays shaped like ``leaves``, from one draw (one draw per leaf made the
    jitted step many seconds slower to compile)."""
    sizes = [math.prod(x.shape) for x in leaves]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for x, size in zip(leaves, sizes, strict=True):
        out.append(flat[start:start + size].reshape(x.shape).astype(x.dtype))
        start += size
    return out


def perturb(params: Params, key: jax.Array, std: float) -> Params:
    """Every parameter plus independent N(0, std²) noise."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise = standard_normals(key, leaves)
    return jax.tree_util.tree_unflatten(treedef, [x + std * n for x, n in zip(leaves, noise, strict=True)])


def shrink_and_perturb(*, noise_std: float) -> PlasticityMethod:
    """After every optimiser step, N(0, ``noise_std``²) added to every parameter (the reference key
    ``noise_std``; pair it with weight decay for the shrink)."""
    if not noise_std > 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std!r}")

    def after_step(args: MethodArgs) -> MethodUpdate:
        return MethodUpdate(perturb(args.params, args.key, noise_std), args.batch_stats, args.opt_state,
                            args.state, {})

    return PlasticityMethod(NAME, after_step=after_step)
