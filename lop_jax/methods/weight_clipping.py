"""Weight clipping (Elsayed, Lan, Lyle and Mahmood, 2024, "Weight clipping for deep continual and
reinforcement learning"): after every step each weight is clipped to ``±clip_factor`` times the
scale of its layer's initial distribution, which keeps weights from growing without bound.

The paper's scale is the support of a uniform initialisation; the reference's initialisation is
normal, so here the scale is its standard deviation (conv kernels √(2/fan_in), the Linear kernel
√(1/fan_in)). Biases and BatchNorm parameters start at constants and are not clipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lop_jax.methods.base import MethodArgs, MethodUpdate, MetricSpec, Params, PlasticityMethod
from lop_jax.methods.resets import initial_std

NAME = "weight_clipping"


def clip_weights(params: Params, clip_factor: float) -> tuple[Params, jax.Array]:
    """Kernels clipped to ± clip_factor · their initial std; also the number of weights clipped."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out, clipped = [], jnp.zeros((), jnp.int32)
    for path, x in flat:
        std = initial_std(path, x)
        if std is None:
            out.append(x)
            continue
        bound = clip_factor * std
        out.append(jnp.clip(x, -bound, bound))
        clipped = clipped + jnp.sum(jnp.abs(x) > bound, dtype=jnp.int32)
    return jax.tree_util.tree_unflatten(treedef, out), clipped


def weight_clipping(*, clip_factor: float = 2.0) -> PlasticityMethod:
    """Clip every kernel weight to ±``clip_factor`` · its initial std after every step. Records
    ``clipped_weights`` (weights clipped, summed over the epoch)."""
    if not clip_factor > 0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor!r}")

    def after_step(args: MethodArgs) -> MethodUpdate:
        params, clipped = clip_weights(args.params, clip_factor)
        return MethodUpdate(params, args.batch_stats, args.opt_state, args.state, {"clipped_weights": clipped})

    return PlasticityMethod(NAME, after_step=after_step,
                            metrics={"clipped_weights": MetricSpec((), jnp.int32)})
