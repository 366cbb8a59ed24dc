"""ReDo, recycling dormant neurons (Sokar et al., 2023, "The dormant neuron phenomenon in deep
reinforcement learning").

Every ``every`` steps, each hidden unit's score is its mean absolute activation on the step's batch
(over images and positions) divided by the mean score of its layer; a unit scoring at most
``threshold`` is τ-dormant and is recycled: fresh incoming weights, zero outgoing weights (as CBP
re-initialises a unit, ``lop_jax.cbp.reset_units``). ReDo also resets the optimiser's moments of
those weights; here that is the momentum (``reset_momentum``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lop_jax.cbp import NUM_FEATURE_LAYERS, feature_magnitude, reset_units_and_momentum
from lop_jax.methods.base import MethodArgs, MethodUpdate, MetricSpec, Params, PlasticityMethod
from lop_jax.methods.continual_backprop import network_width

NAME = "redo"


def dormant_scores(features: tuple[jax.Array, ...]) -> list[jax.Array]:
    """Per layer, every unit's mean |activation| divided by its layer's mean of those (0 when the
    whole layer is silent)."""
    out = []
    for f in features:
        mag = feature_magnitude(f)
        mean = jnp.mean(mag)
        out.append(jnp.where(mean > 0, mag / jnp.where(mean > 0, mean, 1.0), 0.0))
    return out


def redo(*, threshold: float = 0.0, every: int = 1000, reset_momentum: bool = True) -> PlasticityMethod:
    """Recycle the units whose score is at most ``threshold`` every ``every`` steps. Records
    ``redo_reset_units`` per feature layer."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every!r}")

    def init(params: Params) -> jax.Array:
        return jnp.zeros((), jnp.int32)  # optimiser steps taken

    def after_step(args: MethodArgs) -> MethodUpdate:
        if args.features is None:
            raise ValueError("ReDo needs the step's feature maps")
        step = args.state + 1
        width = network_width(args.params)

        def recycle(operands):
            params, batch_stats, opt_state = operands
            masks = [s <= threshold for s in dormant_scores(args.features)]
            params, batch_stats, new_opt = reset_units_and_momentum(
                params, batch_stats, opt_state if reset_momentum else None, masks, args.key, width=width)
            counts = jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in masks])
            return params, batch_stats, new_opt if reset_momentum else opt_state, counts

        def keep(operands):
            params, batch_stats, opt_state = operands
            return params, batch_stats, opt_state, jnp.zeros((NUM_FEATURE_LAYERS,), jnp.int32)

        params, batch_stats, opt_state, counts = jax.lax.cond(
            step % every == 0, recycle, keep, (args.params, args.batch_stats, args.opt_state))
        return MethodUpdate(params, batch_stats, opt_state, step, {"redo_reset_units": counts})

    return PlasticityMethod(NAME, init=init, after_step=after_step, uses_features=True,
                            metrics={"redo_reset_units": MetricSpec((NUM_FEATURE_LAYERS,), jnp.int32)})
