"""Continual backpropagation (Dohare et al., 2024) as a plasticity method: generate-and-test after
every step (the algorithm itself, bit for bit the reference's, is ``lop_jax.cbp``)."""

from __future__ import annotations

import jax.numpy as jnp

from lop_jax.cbp import NUM_FEATURE_LAYERS, UTILITY_FUNCTIONS, VARIANTS, cbp_step, init_cbp_state
from lop_jax.methods.base import MethodArgs, MethodUpdate, MetricSpec, Params, PlasticityMethod

NAME = "continual_backprop"


def network_width(params: Params) -> int:
    """The ResNet-18's width (its stem's output channels), read from the parameter shapes."""
    return int(params["stem_conv"]["kernel"].shape[-1])


def continual_backprop(*, replacement_rate: float, maturity_threshold: int, utility_function: str = "contribution",
                       decay_rate: float = 0.99, variant: str = "reference",
                       decide_for_all_runs: bool = False) -> PlasticityMethod:
    """CBP with the reference's options (semantics §7): ``replacement_rate`` units per eligible unit
    and step, units older than ``maturity_threshold`` steps eligible, ranked by ``utility_function``
    ('contribution' or 'weight') averaged with ``decay_rate``; ``variant`` 'reference' (quirks
    included) or 'textbook' (the paper's text). Records ``replaced_units`` per feature layer.

    ``decide_for_all_runs`` (off: the recorded results' bits) makes runs mapped together skip the
    replacement work in a step where none of them replaces, instead of running it for every run
    at every step (``lop_jax.cbp.cbp_step``); several runs together then round differently."""
    if not replacement_rate > 0:
        raise ValueError(f"replacement_rate must be > 0, got {replacement_rate!r}")
    if maturity_threshold < 1:
        raise ValueError(f"maturity_threshold must be >= 1, got {maturity_threshold!r}")
    if utility_function not in UTILITY_FUNCTIONS:
        raise ValueError(f"utility_function must be one of {', '.join(UTILITY_FUNCTIONS)}, got {utility_function!r}")
    if not 0 <= decay_rate < 1:
        raise ValueError(f"decay_rate must be in [0, 1), got {decay_rate!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")

    def init(params: Params):
        return init_cbp_state(network_width(params))

    def after_step(args: MethodArgs) -> MethodUpdate:
        if args.features is None:
            raise ValueError("continual backprop needs the step's feature maps")
        params, batch_stats, opt_state, state, replaced = cbp_step(
            args.params, args.batch_stats, args.opt_state, args.state, list(args.features), args.key,
            width=network_width(args.params), replacement_rate=replacement_rate, utility_function=utility_function,
            maturity_threshold=maturity_threshold, decay_rate=decay_rate, variant=variant,
            decide_for_all_runs=decide_for_all_runs)
        return MethodUpdate(params, batch_stats, opt_state, state, {"replaced_units": replaced})

    return PlasticityMethod(NAME, init=init, after_step=after_step, uses_features=True,
                            metrics={"replaced_units": MetricSpec((NUM_FEATURE_LAYERS,), jnp.int32)})
