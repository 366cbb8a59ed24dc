"""Named method factories, so that a config can name a method and its arguments.

A config's ``methods`` key lists methods as ``{"name": "redo", "threshold": 0.1, ...}``. ``build``
looks the name up, checks every option against the factory's signature (unknown, missing and
mistyped arguments are one-line errors naming them) and calls the factory, which validates the
values. A new method becomes nameable with ``register("name", factory)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, get_type_hints

from lop_jax.errors import InputError
from lop_jax.methods.base import PlasticityMethod

__all__ = ["MethodError", "register", "unregister", "registered", "factory", "build", "check_spec"]

Factory = Callable[..., PlasticityMethod]
_FACTORIES: dict[str, Factory] = {}
_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


class MethodError(InputError, ValueError):
    """A plasticity method named or configured wrongly; one line naming the method and the option."""


def register(name: str, fn: Factory, *, replace: bool = False) -> Factory:
    """Make ``fn`` (a factory whose keyword arguments are its hyperparameters) nameable in configs."""
    if not callable(fn):
        raise TypeError(f"the factory of {name!r} must be callable")
    if name in _FACTORIES and not replace and _FACTORIES[name] is not fn:
        raise ValueError(f"a plasticity method named {name!r} is already registered")
    _FACTORIES[name] = fn
    return fn


def unregister(name: str) -> None:
    """Forget a registered factory (e.g. one a test added)."""
    del _FACTORIES[name]


def registered() -> tuple[str, ...]:
    """The names a config may use, in registration order."""
    return tuple(_FACTORIES)


def factory(name: str) -> Factory:
    if name not in _FACTORIES:
        raise MethodError(f"no plasticity method named {name!r} (known: {', '.join(_FACTORIES) or 'none'}); "
                          "register it with lop_jax.methods.register before the config loads")
    return _FACTORIES[name]


def _check_value(method: str, option: str, value: Any, annotation: Any) -> Any:
    if annotation in _SCALARS:
        ok = isinstance(value, annotation) and not (annotation is not bool and isinstance(value, bool))
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise MethodError(f"plasticity method {method!r}: option '{option}' must be {_SCALARS[annotation]}, "
                              f"got {value!r}")
    return value


def check_spec(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``{"name": ..., **options}`` → (name, options with numbers as the factory types them)."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise MethodError(f"a plasticity method is an object with a 'name' and its options, got {spec!r}")
    name = spec["name"]
    fn = factory(name)
    options = {k: v for k, v in spec.items() if k != "name"}
    params = inspect.signature(fn).parameters
    hints = get_type_hints(fn)
    for option in options:
        if option not in params or params[option].kind not in (inspect.Parameter.KEYWORD_ONLY,
                                                               inspect.Parameter.POSITIONAL_OR_KEYWORD):
            known = ", ".join(p for p in params) or "none"
            raise MethodError(f"plasticity method {name!r} has no option '{option}' (options: {known})")
    for option, p in params.items():
        if p.default is inspect.Parameter.empty and option not in options:
            raise MethodError(f"plasticity method {name!r}: option '{option}' is required")
    checked = {k: _check_value(name, k, v, hints.get(k)) for k, v in options.items()}
    return name, checked


def build(spec: Mapping[str, Any]) -> PlasticityMethod:
    """The method a config's ``{"name": ..., **options}`` describes (its values validated by the factory)."""
    name, options = check_spec(spec)
    try:
        method = factory(name)(**options)
    except MethodError:
        raise
    except ValueError as err:
        raise MethodError(f"plasticity method {name!r}: {err}") from None
    if not isinstance(method, PlasticityMethod):
        raise MethodError(f"the factory of plasticity method {name!r} returned {type(method).__name__}, "
                          "not a PlasticityMethod")
    return method
