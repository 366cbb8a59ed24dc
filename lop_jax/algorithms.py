"""The plasticity algorithms of semantics §6 behind one seam that the train loop calls.

The train loop knows four functions: ``init_algo_state``, ``after_step`` (inside the jitted step,
after every optimiser step), ``needs_features`` and ``at_task_boundary`` (after the early-stopping
restore, before the next task). Each algorithm is a ``PlasticityMethod``: a name, a predicate
saying whether a config enables it, and optional hooks. The built-in methods are selected by the
reference's config keys, in the reference's order:

    continual_backprop   use_cbp            after every step (before the noise, as the reference)
    shrink_and_perturb   noise_std > 0      after every step: N(0, noise_std²) added to every parameter
    head_reset           reset_head         at task boundaries: the Linear layer re-initialised
    full_reset           reset_network      at task boundaries: every weight re-initialised; BatchNorm
                                            running statistics kept (reference quirk)

No hook receives the optimiser state at a task boundary, so the momentum buffer is always kept.

A new method (e.g. ReDo, or L2 towards the initial weights) is added with
``register_method(PlasticityMethod(...))`` without touching the train loop, and switched on by
naming it in the config key ``extra_methods`` (its settings go in ``method_options[name]``, read
with ``cfg.options_for(name)``); an ``enabled`` predicate may switch it on from other keys instead.
``reset_units`` re-initialises chosen units of the 17 feature layers the way CBP does.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from lop_jax.cbp import NUM_FEATURE_LAYERS, cbp_step, init_cbp_state, reset_units
from lop_jax.config import Config, ConfigError

__all__ = ["PlasticityMethod", "register_method", "unregister_method", "registered_methods", "active_methods",
           "check_methods", "init_algo_state", "needs_features", "after_step", "at_task_boundary", "perturb",
           "reinitialise", "reset_units"]

Params = dict[str, Any]
StepResult = tuple[Params, Params, Any, Any, jax.Array | None]
AfterStepHook = Callable[[Config, Params, Params, Any, Any, Any, jax.Array], StepResult]
BoundaryHook = Callable[[Config, Params, Params, jax.Array], tuple[Params, Params]]


@dataclass(frozen=True)
class PlasticityMethod:
    """One plasticity algorithm: when it is on, and what it does (every hook is optional).

    - ``enabled(cfg)``: whether this config runs the method besides being named in
      ``cfg.extra_methods`` (default: only when named there).
    - ``init_state(cfg, params)``: its per-run state (a pytree), or None when it keeps none.
    - ``after_step(cfg, params, batch_stats, opt_state, state, features, key)`` →
      ``(params, batch_stats, opt_state, state, replaced)``: runs inside jit after every optimiser
      step; ``replaced`` is an int32 [17] count of units reset per feature layer, or None.
    - ``at_task_boundary(cfg, params, batch_stats, key)`` → ``(params, batch_stats)``.
    - ``uses_features(cfg)``: whether ``after_step`` reads the 17 feature maps of the step.
    """

    name: str
    enabled: Callable[[Config], bool] = lambda cfg: False
    init_state: Callable[[Config, Params], Any] | None = None
    after_step: AfterStepHook | None = None
    at_task_boundary: BoundaryHook | None = None
    uses_features: Callable[[Config], bool] | None = None


_REGISTRY: dict[str, PlasticityMethod] = {}


def register_method(method: PlasticityMethod, *, replace: bool = False) -> PlasticityMethod:
    """Add a method to the registry (methods run in registration order). Returns it."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a plasticity method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (e.g. one added by a test)."""
    del _REGISTRY[name]


def registered_methods() -> tuple[str, ...]:
    """Names of all registered methods, in the order they run."""
    return tuple(_REGISTRY)


def check_methods(cfg: Config) -> None:
    """Every method named by ``extra_methods`` or ``method_options`` must be registered."""
    known = ", ".join(_REGISTRY) or "none"
    for key, names in (("extra_methods", cfg.extra_methods), ("method_options", tuple(cfg.method_options))):
        for name in names:
            if name not in _REGISTRY:
                raise ConfigError(f"config key '{key}': no plasticity method named {name!r} is registered "
                                  f"(registered: {known}); register it with lop_jax.algorithms.register_method "
                                  "before the run")


def active_methods(cfg: Config) -> list[PlasticityMethod]:
    """The registered methods this config enables, in the order they run."""
    check_methods(cfg)
    return [m for m in _REGISTRY.values() if m.enabled(cfg) or m.name in cfg.extra_methods]


def _method_key(key: jax.Array, name: str) -> jax.Array:
    """A key per method, fixed by its name: adding a method elsewhere does not change the others' draws."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


# ---- the seam the train loop calls --------------------------------------------------------------


def init_algo_state(cfg: Config, params: Params) -> Any:
    """Per-run state of the active methods: ``{name: state}``; {} when no method keeps state."""
    out = {}
    for method in active_methods(cfg):
        if method.init_state is not None:
            state = method.init_state(cfg, params)
            if state is not None:
                out[method.name] = state
    return out


def needs_features(cfg: Config) -> bool:
    """True when some active method's ``after_step`` reads the step's feature maps."""
    return any(m.uses_features is not None and m.uses_features(cfg) for m in active_methods(cfg))


def after_step(cfg: Config, params: Params, batch_stats: Params, opt_state: Any, algo_state: Any,
               features: Any, key: jax.Array) -> tuple[Params, Params, Any, Any, jax.Array]:
    """Run every active method's per-step hook (jittable); identity when there is none.

    Returns (params, batch_stats, opt_state, algo_state, replaced) with ``replaced`` the int32 [17]
    units reset per feature layer this step, summed over the methods that report it.
    """
    replaced = jnp.zeros((NUM_FEATURE_LAYERS,), jnp.int32)
    new_state = dict(algo_state)
    for method in active_methods(cfg):
        if method.after_step is None:
            continue
        params, batch_stats, opt_state, state, count = method.after_step(
            cfg, params, batch_stats, opt_state, algo_state.get(method.name), features, _method_key(key, method.name))
        if method.name in new_state:
            new_state[method.name] = state
        if count is not None:
            replaced = replaced + count
    return params, batch_stats, opt_state, new_state, replaced


def at_task_boundary(cfg: Config, params: Params, batch_stats: Params, key: jax.Array) -> tuple[Params, Params]:
    """Run every active method's task-boundary hook (after the early-stopping restore, before the
    next task). The optimiser state is not an argument: the momentum buffer is always kept."""
    for method in active_methods(cfg):
        if method.at_task_boundary is not None:
            params, batch_stats = method.at_task_boundary(cfg, params, batch_stats, _method_key(key, method.name))
    return params, batch_stats


# ---- built-in methods ---------------------------------------------------------------------------


def _cbp_after_step(cfg: Config, params: Params, batch_stats: Params, opt_state: Any, state: Any, features: Any,
                    key: jax.Array) -> StepResult:
    if features is None:
        raise ValueError("continual backprop needs the step's feature maps (model.apply(..., return_features=True))")
    return cbp_step(params, batch_stats, opt_state, state, list(features), key, width=cfg.network_width,
                    replacement_rate=cfg.replacement_rate, utility_function=cfg.utility_function,
                    maturity_threshold=cfg.maturity_threshold, decay_rate=cfg.cbp_decay_rate,
                    variant=cfg.cbp_variant)


def _flat_normals(key: jax.Array, leaves: list[jax.Array]) -> list[jax.Array]:
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
    """Every parameter plus independent N(0, std²) noise (shrink and perturb; the shrink is the weight decay)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise = _flat_normals(key, leaves)
    return jax.tree_util.tree_unflatten(treedef, [x + std * n for x, n in zip(leaves, noise, strict=True)])


def _noise_after_step(cfg: Config, params: Params, batch_stats: Params, opt_state: Any, state: Any, features: Any,
                      key: jax.Array) -> StepResult:
    return perturb(params, key, cfg.noise_std), batch_stats, opt_state, state, None


def reinitialise(params: Params, key: jax.Array) -> Params:
    """Fresh parameters with the reference's initial law (semantics §3), same tree and shapes.

    Conv kernels (HWIO) ~ N(0, 2/fan_in); Linear kernels (in, out) ~ N(0, 1/fan_in); biases 0;
    BatchNorm scale 1 (its shift is a bias: 0).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    noise = _flat_normals(key, [x for _, x in flat])
    out = []
    for (path, x), z in zip(flat, noise, strict=True):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if name == "kernel" and x.ndim == 4:
            out.append(z * math.sqrt(2.0 / math.prod(x.shape[:-1])))
        elif name == "kernel" and x.ndim == 2:
            out.append(z * math.sqrt(1.0 / x.shape[0]))
        elif name == "bias":
            out.append(jnp.zeros_like(x))
        elif name == "scale":
            out.append(jnp.ones_like(x))
        else:
            raise ValueError(f"do not know how to re-initialise parameter {jax.tree_util.keystr(path)}")
    return jax.tree_util.tree_unflatten(treedef, out)


def _head_reset(cfg: Config, params: Params, batch_stats: Params, key: jax.Array) -> tuple[Params, Params]:
    new = dict(params)
    new["fc"] = reinitialise(params["fc"], key)
    return new, batch_stats


def _full_reset(cfg: Config, params: Params, batch_stats: Params, key: jax.Array) -> tuple[Params, Params]:
    return reinitialise(params, key), batch_stats


register_method(PlasticityMethod(
    name="continual_backprop", enabled=lambda cfg: cfg.use_cbp,
    init_state=lambda cfg, params: init_cbp_state(cfg.network_width),
    after_step=_cbp_after_step, uses_features=lambda cfg: True))
register_method(PlasticityMethod(
    name="shrink_and_perturb", enabled=lambda cfg: cfg.noise_std > 0, after_step=_noise_after_step))
register_method(PlasticityMethod(name="head_reset", enabled=lambda cfg: cfg.reset_head, at_task_boundary=_head_reset))
register_method(PlasticityMethod(
    name="full_reset", enabled=lambda cfg: cfg.reset_network, at_task_boundary=_full_reset))
