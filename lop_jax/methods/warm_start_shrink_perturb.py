"""Shrink and perturb as Ash and Adams (2020, "On warm-starting neural network training") define
it: at every task boundary each parameter becomes ``shrink · θ + perturb · θ'``, θ' a freshly
initialised network (the reference's initial law). The paper's per-step variant
(``shrink_and_perturb``) spreads the same two forces over every step."""

from __future__ import annotations

import jax

from lop_jax.methods.base import MethodArgs, MethodUpdate, PlasticityMethod
from lop_jax.methods.resets import reinitialise

NAME = "warm_start_shrink_perturb"


def warm_start_shrink_perturb(*, shrink: float, perturb: float) -> PlasticityMethod:
    """At task boundaries θ ← ``shrink``·θ + ``perturb``·(a fresh initialisation)."""
    if not 0 < shrink <= 1:
        raise ValueError(f"shrink must be in (0, 1], got {shrink!r}")
    if perturb < 0:
        raise ValueError(f"perturb must be >= 0, got {perturb!r}")

    def at_task_boundary(args: MethodArgs) -> MethodUpdate:
        fresh = reinitialise(args.params, args.key)
        params = jax.tree_util.tree_map(lambda p, f: shrink * p + perturb * f, args.params, fresh)
        return MethodUpdate(params, args.batch_stats, args.opt_state, args.state, {})

    return PlasticityMethod(NAME, at_task_boundary=at_task_boundary)
