"""Several runs as one: per-run pytrees stacked along a leading run axis, and that axis on devices.

The train functions (``lop_jax.train``) are written for one run and mapped once over this axis;
a run of one index is a stack of one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def stack_states(states: list[Any]) -> Any:
    """Stack per-run pytrees along a new leading run axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(tree: Any, i: int) -> Any:
    """Run ``i`` of a stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def seed_sharding(num_runs: int) -> jax.sharding.Sharding | None:
    """Shard the run axis over the visible devices (a 1-D mesh) when there are several and they
    divide the number of runs; None otherwise (one device holds every run)."""
    devices = jax.devices()
    if len(devices) < 2 or num_runs % len(devices):
        return None
    mesh = jax.sharding.Mesh(np.array(devices), ("runs",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("runs"))
