"""L2 Init, regenerative regularisation (Kumar et al., 2023, "Maintaining plasticity in continual
learning via regenerative regularization"): the loss plus ``strength · ‖θ − θ₀‖²`` over every
parameter, θ₀ the run's initial parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lop_jax.methods.base import MethodArgs, MethodUpdate, MetricSpec, Params, PlasticityMethod

NAME = "l2_init"


def squared_distance(params: Params, anchor: Params) -> jax.Array:
    """‖params − anchor‖² summed over every leaf."""
    terms = jax.tree_util.tree_map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
    return sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), jnp.float32))


def l2_init(*, strength: float) -> PlasticityMethod:
    """Pull every parameter towards its initial value with weight ``strength`` (λ of the paper).
    Records ``distance_from_init`` (‖θ − θ₀‖ after the step, the epoch's mean)."""
    if not strength > 0:
        raise ValueError(f"strength must be > 0, got {strength!r}")

    def init(params: Params) -> Params:
        return jax.tree_util.tree_map(jnp.copy, params)

    def loss(args: MethodArgs) -> jax.Array:
        return strength * squared_distance(args.params, args.state)

    def after_step(args: MethodArgs) -> MethodUpdate:
        distance = jnp.sqrt(squared_distance(args.params, args.state))
        return MethodUpdate(args.params, args.batch_stats, args.opt_state, args.state,
                            {"distance_from_init": distance})

    return PlasticityMethod(NAME, init=init, loss=loss, after_step=after_step,
                            metrics={"distance_from_init": MetricSpec((), jnp.float32, reduce="mean")})
