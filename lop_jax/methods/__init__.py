"""Plasticity methods: optax-style factories returning records of pure functions (``base``).

The reference's keys select the paper's methods, in the reference's order, and a config's
``methods`` list adds any registered method with its options after them:

    continual_backprop   use_cbp            after every step (replacement_rate, maturity_threshold,
                                            utility_function, cbp_decay_rate, cbp_variant)
    shrink_and_perturb   noise_std > 0      after every step: N(0, noise_std²) on every parameter
    head_reset           reset_head         at task boundaries: the Linear head re-initialised
    full_reset           reset_network      at task boundaries: every parameter re-initialised

    "methods": [{"name": "redo", "threshold": 0.1, "every": 1000}]

Registered besides those: ``redo``, ``l2_init``, ``upgd``, ``weight_clipping`` and
``warm_start_shrink_perturb`` (one module each). ``register(name, factory)`` makes a new one
nameable; a factory used directly needs no registration (``chain`` it, or pass it to the run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lop_jax.methods.base import (
    MethodArgs,
    MethodUpdate,
    MetricSpec,
    PlasticityMethod,
    UpdateResult,
    chain,
    check_metrics,
    method_key,
)
from lop_jax.methods.continual_backprop import continual_backprop
from lop_jax.methods.l2_init import l2_init
from lop_jax.methods.redo import redo
from lop_jax.methods.registry import MethodError, build, check_spec, register, registered, unregister
from lop_jax.methods.resets import full_reset, head_reset, reinitialise
from lop_jax.methods.shrink_and_perturb import perturb, shrink_and_perturb
from lop_jax.methods.upgd import upgd
from lop_jax.methods.warm_start_shrink_perturb import warm_start_shrink_perturb
from lop_jax.methods.weight_clipping import weight_clipping

if TYPE_CHECKING:
    from lop_jax.config import Config

__all__ = ["MethodArgs", "MethodUpdate", "MetricSpec", "PlasticityMethod", "UpdateResult", "chain", "check_metrics",
           "method_key", "MethodError", "build", "check_spec", "register", "registered", "unregister",
           "continual_backprop", "shrink_and_perturb", "head_reset", "full_reset", "redo", "l2_init", "upgd",
           "weight_clipping", "warm_start_shrink_perturb", "reinitialise", "perturb", "from_config"]

for _factory in (continual_backprop, shrink_and_perturb, head_reset, full_reset, redo, l2_init, upgd,
                 weight_clipping, warm_start_shrink_perturb):
    register(_factory.__name__, _factory)


def reference_methods(cfg: Config) -> list[PlasticityMethod]:
    """The methods the reference's keys select, in the reference's order."""
    out = []
    if cfg.use_cbp:
        out.append(continual_backprop(replacement_rate=cfg.replacement_rate,
                                      maturity_threshold=cfg.maturity_threshold,
                                      utility_function=cfg.utility_function, decay_rate=cfg.cbp_decay_rate,
                                      variant=cfg.cbp_variant))
    if cfg.noise_std > 0:
        out.append(shrink_and_perturb(noise_std=cfg.noise_std))
    if cfg.reset_head:
        out.append(head_reset())
    if cfg.reset_network:
        out.append(full_reset())
    return out


def from_config(cfg: Config) -> PlasticityMethod:
    """The run's methods as one chain: the reference keys' methods, then ``cfg.methods`` in order."""
    return chain(*reference_methods(cfg), *(build(spec) for spec in cfg.method_specs()), name="methods")
