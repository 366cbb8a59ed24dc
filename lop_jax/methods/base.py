"""The shape of a plasticity method, in the style of optax: a record of pure functions, and ``chain``.

A method is built by a factory whose arguments are its hyperparameters (validated there), and is a
``PlasticityMethod``: a name, the per-run state it starts from, and up to four optional hooks, all
receiving one ``MethodArgs`` record:

    init(params) -> state                       per-run state (a pytree), or None
    loss(args) -> scalar                        added to the training loss (``args.params`` is what
                                                is differentiated; the state is read-only)
    update(args) -> UpdateResult                rewrites the optimiser's update before it is applied
                                                (``args.grads``, ``args.updates`` are set)
    after_step(args) -> MethodUpdate            after every optimiser step, inside the jitted step
    at_task_boundary(args) -> MethodUpdate      after the early-stopping restore, before the next task

Every hook but ``loss`` returns the method's own metrics besides the new values, as a dict. The
per-step ones (from ``update`` and ``after_step`` together) are declared in ``metrics`` (name →
``MetricSpec``) and recorded per epoch as ``<name>_per_epoch`` (e.g. CBP's
``replaced_units_per_epoch``); the task-boundary ones are declared in ``task_metrics`` and recorded
as ``<name>_per_task``. The run loop records them for every method alike.

``chain(*methods)`` composes methods in an explicit order: each hook runs the members' hooks in
turn, each member keeps its state under its name and draws from a key of its own, fixed by its
name, so that adding a method does not change the others' random draws.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = dict[str, Any]

__all__ = ["MethodArgs", "MethodUpdate", "UpdateResult", "MetricSpec", "PlasticityMethod", "chain", "method_key",
           "check_metrics"]


class MethodArgs(NamedTuple):
    """What every hook receives. ``features`` (the 17 feature maps of the step's forward pass) only
    when the method asks for them, ``grads`` and ``updates`` only in ``update``."""

    params: Params
    batch_stats: Params
    opt_state: Any
    state: Any
    key: jax.Array
    features: tuple[jax.Array, ...] | None = None
    grads: Params | None = None
    updates: Params | None = None


class MethodUpdate(NamedTuple):
    """What ``after_step`` and ``at_task_boundary`` return."""

    params: Params
    batch_stats: Params
    opt_state: Any
    state: Any
    metrics: dict[str, jax.Array]


class UpdateResult(NamedTuple):
    """What ``update`` returns: the update to apply (the step subtracts ``lr · updates``)."""

    updates: Params
    state: Any
    metrics: dict[str, jax.Array]


@dataclass(frozen=True)
class MetricSpec:
    """One per-step metric: its shape and dtype, and how an epoch reduces its steps (sum or mean).

    Integer metrics are recorded as int64 arrays, float ones as float32."""

    shape: tuple[int, ...] = ()
    dtype: Any = jnp.float32
    reduce: str = "sum"

    def __post_init__(self) -> None:
        if self.reduce not in ("sum", "mean"):
            raise ValueError(f"MetricSpec.reduce must be 'sum' or 'mean', got {self.reduce!r}")

    @property
    def is_integer(self) -> bool:
        return jnp.issubdtype(self.dtype, jnp.integer)

    def zeros(self) -> jax.Array:
        return jnp.zeros(self.shape, self.dtype)


def _no_state(params: Params) -> None:
    return None


@dataclass(frozen=True)
class PlasticityMethod:
    """One plasticity method (or a chain of them); every hook is optional."""

    name: str
    init: Callable[[Params], Any] = _no_state
    after_step: Callable[[MethodArgs], MethodUpdate] | None = None
    at_task_boundary: Callable[[MethodArgs], MethodUpdate] | None = None
    loss: Callable[[MethodArgs], jax.Array] | None = None
    update: Callable[[MethodArgs], UpdateResult] | None = None
    uses_features: bool = False
    metrics: Mapping[str, MetricSpec] = field(default_factory=dict)
    task_metrics: Mapping[str, MetricSpec] = field(default_factory=dict)
    members: tuple[PlasticityMethod, ...] | None = None  # a chain's methods, in order; None for one method

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "task_metrics", MappingProxyType(dict(self.task_metrics)))

    @property
    def methods(self) -> tuple[PlasticityMethod, ...]:
        """The single methods this one runs, in order (itself, or a chain's members flattened)."""
        if self.members is None:
            return (self,)
        return tuple(m for member in self.members for m in member.methods)


def method_key(key: jax.Array, name: str) -> jax.Array:
    """A method's own key, fixed by its name."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def check_metrics(returned: Mapping[str, Any], declared: Mapping[str, MetricSpec], method: str, when: str) -> None:
    """The metrics a method returned must be the ones it declared (checked when the step is traced)."""
    if set(returned) != set(declared):
        raise ValueError(f"plasticity method {method!r} returned {when} metrics {sorted(returned)}, "
                         f"declared {sorted(declared)}")


def chain(*methods: PlasticityMethod, name: str = "chain") -> PlasticityMethod:
    """Run ``methods`` in this order as one method. Names and metric names must be unique."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"a chain names a plasticity method twice: {names}")
    specs: dict[str, MetricSpec] = {}
    task_specs: dict[str, MetricSpec] = {}
    for m in methods:
        for metric, spec in [*m.metrics.items(), *m.task_metrics.items()]:
            if metric in specs or metric in task_specs:
                raise ValueError(f"two plasticity methods of a chain record a metric named {metric!r}")
            (specs if metric in m.metrics else task_specs)[metric] = spec

    def init(params: Params) -> dict[str, Any]:
        out = {}
        for m in methods:
            state = m.init(params)
            if state is not None:
                out[m.name] = state
        return out

    def sub(args: MethodArgs, m: PlasticityMethod) -> MethodArgs:
        return args._replace(state=args.state.get(m.name), key=method_key(args.key, m.name),
                             features=args.features if m.uses_features else None)

    def run(hook: str) -> Callable[[MethodArgs], MethodUpdate]:
        def apply(args: MethodArgs) -> MethodUpdate:
            state, metrics = dict(args.state), {}
            for m in methods:
                fn = getattr(m, hook)
                if fn is None:
                    continue
                out = fn(sub(args, m))
                args = args._replace(params=out.params, batch_stats=out.batch_stats, opt_state=out.opt_state)
                if m.name in state:
                    state[m.name] = out.state
                metrics.update(out.metrics)
            return MethodUpdate(args.params, args.batch_stats, args.opt_state, state, metrics)
        return apply

    def loss(args: MethodArgs) -> jax.Array:
        terms = [m.loss(sub(args, m)) for m in methods if m.loss is not None]
        return sum(terms[1:], terms[0])

    def update(args: MethodArgs) -> UpdateResult:
        state, metrics, updates = dict(args.state), {}, args.updates
        for m in methods:
            if m.update is None:
                continue
            out = m.update(sub(args._replace(updates=updates), m))
            updates = out.updates
            if m.name in state:
                state[m.name] = out.state
            metrics.update(out.metrics)
        return UpdateResult(updates, state, metrics)

    def has(hook: str) -> bool:
        return any(getattr(m, hook) is not None for m in methods)

    return PlasticityMethod(
        name=name, init=init,
        after_step=run("after_step") if has("after_step") else None,
        at_task_boundary=run("at_task_boundary") if has("at_task_boundary") else None,
        loss=loss if has("loss") else None, update=update if has("update") else None,
        uses_features=any(m.uses_features for m in methods), metrics=specs, task_metrics=task_specs,
        members=tuple(methods))

