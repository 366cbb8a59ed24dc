"""UPGD, utility-based perturbed gradient descent (Elsayed and Mahmood, 2024, "Addressing loss of
plasticity and catastrophic forgetting in continual learning").

Each weight's utility is the first-order estimate of the loss increase its removal would cause,
``−g·θ``, averaged with ``beta_utility`` and bias-corrected; scaled by the largest utility of the
network and squashed, ``ū = sigmoid(û / max û)``, it gates the update and a Gaussian perturbation:
``θ ← θ − lr · (update + ξ) · (1 − ū)``, ξ ~ N(0, ``noise_std``²). Useful weights are protected,
useless ones are perturbed and keep learning. Here the gated update is the optimiser's (weight
decay and momentum included): with momentum 0 and weight decay λ this is the paper's UPGD with the
decay inside the gate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lop_jax.methods.base import MethodArgs, MetricSpec, Params, PlasticityMethod, UpdateResult
from lop_jax.methods.shrink_and_perturb import standard_normals

NAME = "upgd"


def upgd(*, noise_std: float = 0.001, beta_utility: float = 0.999) -> PlasticityMethod:
    """Gate every update by the weight's scaled utility. Records ``mean_gate`` (the mean of
    1 − ū over the weights, the epoch's mean)."""
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    if not 0 <= beta_utility < 1:
        raise ValueError(f"beta_utility must be in [0, 1), got {beta_utility!r}")

    def init(params: Params) -> dict:
        return {"utility": jax.tree_util.tree_map(jnp.zeros_like, params), "step": jnp.zeros((), jnp.int32)}

    def update(args: MethodArgs) -> UpdateResult:
        step = args.state["step"] + 1
        utility = jax.tree_util.tree_map(lambda u, g, p: beta_utility * u + (1.0 - beta_utility) * (-g * p),
                                         args.state["utility"], args.grads, args.params)
        correction = 1.0 - jnp.float32(beta_utility) ** step.astype(jnp.float32)
        corrected = jax.tree_util.tree_map(lambda u: u / correction, utility)
        largest = jnp.max(jnp.stack([jnp.max(u) for u in jax.tree_util.tree_leaves(corrected)]))
        scale = jnp.where(largest > 0, largest, 1.0)
        gates = jax.tree_util.tree_map(lambda u: 1.0 - jax.nn.sigmoid(u / scale), corrected)
        leaves, treedef = jax.tree_util.tree_flatten(args.updates)
        noise = jax.tree_util.tree_unflatten(treedef, standard_normals(args.key, leaves))
        updates = jax.tree_util.tree_map(lambda u, n, gate: (u + noise_std * n) * gate, args.updates, noise, gates)
        gate_leaves = jax.tree_util.tree_leaves(gates)
        mean_gate = sum(jnp.sum(g) for g in gate_leaves) / sum(g.size for g in gate_leaves)
        return UpdateResult(updates, {"utility": utility, "step": step}, {"mean_gate": mean_gate})

    return PlasticityMethod(NAME, init=init, update=update,
                            metrics={"mean_gate": MetricSpec((), jnp.float32, reduce="mean")})
