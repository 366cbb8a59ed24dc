"""Continual backpropagation (generate-and-test) for the ResNet-18, as the reference runs it (semantics §7).

Everything here is a pure function over pytrees with static shapes, so ``cbp_step`` can run after
every optimiser step inside a jitted ``lax.scan``. Per feature layer the state holds a utility, an
age and a mean feature magnitude per channel, plus the reference's fractional-replacement
accumulator.

The accumulator. The reference keeps it as a Python float (IEEE double) and adds
``rate·channels`` once per eligible step. Float32 drifts from it (at 5.12e-3 it replaces 1,023
times in 200,000 steps instead of 1,024), and we must not switch x64 on globally, so the double is
emulated exactly with integers: the accumulator is stored as the integer ``acc·2**94`` in four
28-bit limbs (int32), the sum ``acc + r`` is formed exactly and then rounded to 53 significant bits
with round-half-to-even (what a double addition does), the integer part is the number of units to
replace and the fraction stays. This is exact for every increment r with 2**-42 <= r < 2**16:
every double reached is then a multiple of 2**-94 (no addition result lies below r, whose last bit
is worth at least 2**-94), the sum stays below 2**111, and the subtraction of the integer part is
exact in double arithmetic as well.

Variants. ``variant='reference'`` (default) is the reference ResGnT, quirks included:
mean_feature_mag is only ever increased by (1 - decay)·mean|activation| (no decay, no bias
correction, no reset), the utility is recomputed from scratch in a step where the layer replaces
and stored only then, and the optimiser's momentum is left untouched. ``variant='textbook'`` is
the algorithm of the paper's text: utility and mean feature magnitude are decayed running averages
updated every step, units are ranked by the bias-corrected utility u / (1 - decay**age), both are
reset to 0 for replaced units, and the momentum of every weight that is re-initialised or zeroed
(incoming kernel and bias, BatchNorm scale and shift, outgoing kernel entries) is reset to 0.
Both variants share the selection rule, the accumulator and the order of writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.custom_batching import custom_vmap

from lop_jax.model import FeatureLayer, feature_layers

Params = dict[str, Any]

NUM_FEATURE_LAYERS = 17
UTILITY_FUNCTIONS = ("weight", "contribution")
VARIANTS = ("reference", "textbook")

_LIMB_BITS = 28
_NUM_LIMBS = 4
_FRAC_BITS = 94
_LIMB_MASK = (1 << _LIMB_BITS) - 1
_MIN_INCREMENT = 2.0 ** -42
_MAX_INCREMENT = 2.0 ** 16


class CBPState(NamedTuple):
    """Per feature layer (17 entries each): utility, age and mean_feature_mag per channel.

    ``accumulator`` is int32 [17, 4]: the reference's double accumulator of each layer as the
    integer acc·2**94 in base-2**28 limbs, least significant first (see the module docstring).
    """

    utility: tuple[jax.Array, ...]
    age: tuple[jax.Array, ...]
    mean_feature_mag: tuple[jax.Array, ...]
    accumulator: jax.Array


def init_cbp_state(width: int) -> CBPState:
    """All-zero CBP state for the 17 feature layers of a ResNet-18 of this width."""
    chans = [layer.channels for layer in feature_layers(width)]
    return CBPState(
        utility=tuple(jnp.zeros((c,), jnp.float32) for c in chans),
        age=tuple(jnp.zeros((c,), jnp.int32) for c in chans),
        mean_feature_mag=tuple(jnp.zeros((c,), jnp.float32) for c in chans),
        accumulator=jnp.zeros((len(chans), _NUM_LIMBS), jnp.int32),
    )


# ---- exact double-precision accumulator -----------------------------------------------------


def replacement_increments(replacement_rate: float, width: int) -> list[float]:
    """rate·channels per feature layer, as the reference computes it (a Python double)."""
    return [float(replacement_rate) * layer.channels for layer in feature_layers(width)]


def _limbs(value: float) -> list[int]:
    """Base-2**28 limbs of value·2**94 (value a double that is a multiple of 2**-94)."""
    scaled = Fraction(float(value)) * (1 << _FRAC_BITS)
    if scaled.denominator != 1 or not 0 <= scaled.numerator < 1 << (_LIMB_BITS * _NUM_LIMBS):
        raise ValueError(f"{value!r} is not a multiple of 2**-{_FRAC_BITS} in the accumulator's range")
    return [(scaled.numerator >> (_LIMB_BITS * j)) & _LIMB_MASK for j in range(_NUM_LIMBS)]


def increment_limbs(increments: Sequence[float]) -> np.ndarray:
    """int32 [len, 4] limbs of r·2**94 for each increment r; raises if r is outside the exact range."""
    for r in increments:
        if not _MIN_INCREMENT <= float(r) < _MAX_INCREMENT:
            raise ValueError(f"rate·channels = {r!r} is outside the exactly emulated range [2**-42, 2**16)")
    return np.asarray([_limbs(r) for r in increments], dtype=np.int32).reshape(len(increments), _NUM_LIMBS)


def accumulator_from_values(values: Sequence[float]) -> jax.Array:
    """Accumulator limbs holding these doubles exactly (e.g. to resume from a reference run's values).

    Each value must be reachable by the reference, i.e. in [0, 1) and a multiple of 2**-94.
    """
    for v in values:
        if not 0 <= float(v) < 1:
            raise ValueError(f"an accumulator value must lie in [0, 1), got {v!r}")
    return jnp.asarray(np.asarray([_limbs(v) for v in values], dtype=np.int32).reshape(len(values), _NUM_LIMBS))


def accumulator_values(accumulator: Any) -> list[float]:
    """The accumulators as Python floats (exact), e.g. for logs and tests. Runs on the host."""
    limbs = np.asarray(accumulator).astype(np.int64)
    out = []
    for row in limbs:
        value = sum(int(v) << (_LIMB_BITS * j) for j, v in enumerate(row))
        out.append(float(Fraction(value, 1 << _FRAC_BITS)))
    return out


def _carry(limbs: list[jax.Array]) -> list[jax.Array]:
    """Normalise limbs to [0, 2**28) by propagating carries upwards."""
    limbs = list(limbs)
    for j in range(_NUM_LIMBS - 1):
        limbs[j + 1] = limbs[j + 1] + (limbs[j] >> _LIMB_BITS)
        limbs[j] = limbs[j] & _LIMB_MASK
    return limbs


def _low_bits_mask(t: jax.Array, j: int) -> jax.Array:
    """Mask of limb j selecting the bits at (global) positions < t."""
    return jnp.left_shift(jnp.int32(1), jnp.clip(t - _LIMB_BITS * j, 0, _LIMB_BITS)) - 1


def _bit_at(limbs: list[jax.Array], pos: jax.Array) -> jax.Array:
    """Bit at (global) position pos; 0 where pos is out of range."""
    bit = jnp.zeros_like(pos)
    for j, limb in enumerate(limbs):
        local = pos - _LIMB_BITS * j
        inside = (local >= 0) & (local < _LIMB_BITS)
        bit = bit + jnp.where(inside, (limb >> jnp.clip(local, 0, _LIMB_BITS - 1)) & 1, 0)
    return bit


def accumulate(accumulator: jax.Array, increments: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One reference accumulator step per layer: ``acc += r; n = int(acc); acc -= n`` in doubles.

    accumulator, increments: int32 [L, 4] limbs; active: bool [L] (layers with an eligible unit).
    Inactive layers keep their accumulator and get n = 0. Returns (new accumulator, n int32 [L]).
    """
    s = _carry([accumulator[:, j] + increments[:, j] for j in range(_NUM_LIMBS)])
    top = jnp.zeros_like(s[0])
    for j, limb in enumerate(s):
        top = jnp.maximum(top, jnp.where(limb > 0, _LIMB_BITS * j + 32 - jax.lax.clz(limb), 0))
    d = jnp.maximum(top - 53, 0)  # rounding position: keep 53 significant bits
    sticky = jnp.zeros(d.shape, bool)
    for j, limb in enumerate(s):
        sticky = sticky | ((limb & _low_bits_mask(d - 1, j)) != 0)
    round_up = (_bit_at(s, d - 1) == 1) & (sticky | (_bit_at(s, d) == 1))
    s = [limb & ~_low_bits_mask(d, j) for j, limb in enumerate(s)]
    s = _carry([limb + jnp.where(round_up & (d // _LIMB_BITS == j), jnp.left_shift(jnp.int32(1), d % _LIMB_BITS), 0)
                for j, limb in enumerate(s)])
    top_limb, shift = divmod(_FRAC_BITS, _LIMB_BITS)
    n = s[top_limb] >> shift
    s[top_limb] = s[top_limb] & ((1 << shift) - 1)
    frac = jnp.stack(s, axis=1)
    return jnp.where(active[:, None], frac, accumulator), jnp.where(active, n, 0).astype(jnp.int32)


# ---- pytree helpers -----------------------------------------------------------------------------


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    """Functional update of a nested dict (copies only the dicts along the path)."""
    if not path:
        return value
    new = dict(tree)
    new[path[0]] = _set(tree[path[0]], path[1:], value)
    return new


def _masked_put(x: jax.Array, axis: int, idx: jax.Array, valid: jax.Array, new: Any) -> jax.Array:
    """x with the slices ``idx`` along ``axis`` set to ``new`` where ``valid`` (others untouched)."""
    old = jnp.take(x, idx, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    upd = jnp.where(valid.reshape(shape), jnp.asarray(new, x.dtype), old)
    index = [slice(None)] * x.ndim
    index[axis] = idx
    return x.at[tuple(index)].set(upd)


def _input_axis(kernel: jax.Array) -> int:
    """Input-channel axis: -2 of an HWIO conv kernel (2) or 0 of an (in, out) Linear kernel."""
    return kernel.ndim - 2


def output_weight_magnitude(kernel: jax.Array) -> jax.Array:
    """Mean |w| of a next-layer kernel over everything but its input-channel axis: [in_channels]."""
    axis = _input_axis(kernel)
    axes = tuple(a for a in range(kernel.ndim) if a != axis)
    return jnp.mean(jnp.abs(kernel), axis=axes)


def feature_magnitude(feature: jax.Array) -> jax.Array:
    """Mean |activation| over batch (and H, W for conv maps): [channels], float32."""
    axes = tuple(range(feature.ndim - 1))
    return jnp.mean(jnp.abs(feature.astype(jnp.float32)), axis=axes)


def _get_momentum(opt_state: Any) -> Any:
    for part in opt_state if isinstance(opt_state, tuple) else (opt_state,):
        if isinstance(part, optax.TraceState):
            return part.trace
    raise ValueError("the textbook CBP variant needs an optax.trace (momentum) state in opt_state")


def _set_momentum(opt_state: Any, trace: Any) -> Any:
    if isinstance(opt_state, optax.TraceState):
        return opt_state._replace(trace=trace)
    parts = [p._replace(trace=trace) if isinstance(p, optax.TraceState) else p for p in opt_state]
    return type(opt_state)(parts) if type(opt_state) is tuple else type(opt_state)(*parts)


# ---- the step -----------------------------------------------------------------------------------


@custom_vmap
def any_run(pred: jax.Array) -> jax.Array:
    """``pred`` itself; under ``jax.vmap`` (the run axis), whether it holds for any run, unbatched.

    A ``lax.cond`` on a batched predicate becomes a select that runs both branches for every run
    at every step. On ``any_run(pred)`` it stays a cond, its branches mapped over the runs: the
    replacement work runs only in a step where some run replaces. Each branch must then give
    a run whose own predicate is false the same bits as the other branch would.
    """
    return pred


@any_run.def_vmap
def _any_run_rule(axis_size: int, in_batched: list[bool], pred: jax.Array) -> tuple[jax.Array, bool]:
    (batched,) = in_batched
    return any_run(jnp.any(pred, axis=0) if batched else pred), False



def _check_args(layers: list[FeatureLayer], params: Params, features: Sequence[jax.Array], replacement_rate: float,
                utility_function: str, maturity_threshold: int, decay_rate: float, variant: str) -> None:
    if utility_function not in UTILITY_FUNCTIONS:
        raise ValueError(f"utility_function must be one of {UTILITY_FUNCTIONS}, got {utility_function!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not replacement_rate > 0:
        raise ValueError(f"replacement_rate must be > 0, got {replacement_rate!r}")
    if maturity_threshold < 1:
        raise ValueError(f"maturity_threshold must be >= 1, got {maturity_threshold!r}")
    if not 0 <= decay_rate < 1:
        raise ValueError(f"decay_rate must be in [0, 1), got {decay_rate!r}")
    if len(features) != len(layers):
        raise ValueError(f"expected {len(layers)} feature maps, got {len(features)}")
    for i, (layer, feat) in enumerate(zip(layers, features, strict=True)):
        if feat.shape[-1] != layer.channels:
            raise ValueError(f"feature map {i} has {feat.shape[-1]} channels, expected {layer.channels}")
        if _get(params, layer.producer)["kernel"].shape[-1] != layer.channels:
            raise ValueError(f"params do not match width: {layer.producer} has the wrong number of channels")


def _select(utility: jax.Array, eligible: jax.Array, n: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k lowest-utility eligible channels (ineligible ones count as +inf), masked to the first n."""
    ranked = jnp.where(eligible, utility, jnp.inf)
    _, idx = jax.lax.top_k(-ranked, k)
    valid = (jnp.arange(k) < n) & eligible[idx]
    return idx, valid


def _reinitialise(params: Params, batch_stats: Params, momentum: Any, layers: list[FeatureLayer],
                  selections: list[tuple[jax.Array, jax.Array]], chosen: list[jax.Array],
                  key: jax.Array) -> tuple[Params, Params, Any]:
    """Step 6, layer by layer from 0 to 16: fresh incoming weights, zero outgoing weights, BN reset.

    ``selections`` holds (indices, valid) per layer and ``chosen`` the same as a channel mask.
    ``momentum`` is None (left untouched, the reference) or the momentum tree to zero at every
    re-initialised or zeroed weight (the textbook variant). One random draw serves all layers:
    seventeen separate draws made the step much slower to compile.
    """
    shapes = [_get(params, layer.producer)["kernel"].shape[:-1] + (idx.shape[0],)
              for layer, (idx, _) in zip(layers, selections, strict=True)]
    sizes = [math.prod(shape) for shape in shapes]
    normals = jax.random.normal(key, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    for i, layer in enumerate(layers):
        idx, valid = selections[i]
        mask = chosen[i]
        kernel = _get(params, layer.producer)["kernel"]
        std = math.sqrt(2.0 / math.prod(kernel.shape[:-1]))
        fresh = (normals[offsets[i]:offsets[i + 1]].reshape(shapes[i]) * std).astype(kernel.dtype)
        params = _set(params, layer.producer + ("kernel",), _masked_put(kernel, kernel.ndim - 1, idx, valid, fresh))
        nxt = _get(params, layer.next_layer)["kernel"]
        params = _set(params, layer.next_layer + ("kernel",), _masked_put(nxt, _input_axis(nxt), idx, valid, 0.0))
        for path, value in ((layer.producer + ("bias",), 0.0), (layer.bn + ("scale",), 1.0),
                            (layer.bn + ("bias",), 0.0)):
            params = _set(params, path, jnp.where(mask, value, _get(params, path)))
        for path, value in ((layer.bn + ("mean",), 0.0), (layer.bn + ("var",), 1.0)):
            batch_stats = _set(batch_stats, path, jnp.where(mask, value, _get(batch_stats, path)))
        if momentum is not None:
            for path in (layer.producer + ("bias",), layer.bn + ("scale",), layer.bn + ("bias",)):
                momentum = _set(momentum, path, jnp.where(mask, 0.0, _get(momentum, path)))
            path = layer.producer + ("kernel",)
            m = _get(momentum, path)
            momentum = _set(momentum, path, _masked_put(m, m.ndim - 1, idx, valid, 0.0))
            path = layer.next_layer + ("kernel",)
            m = _get(momentum, path)
            momentum = _set(momentum, path, _masked_put(m, _input_axis(m), idx, valid, 0.0))
    return params, batch_stats, momentum


def reset_units(params: Params, batch_stats: Params, masks: Sequence[jax.Array], key: jax.Array, *,
                width: int) -> tuple[Params, Params]:
    """Re-initialise the units chosen by ``masks`` (17 boolean [channels] arrays, one per feature
    layer) as CBP does: fresh incoming weights ~ N(0, 2/fan_in), incoming bias 0, outgoing weights
    0, BatchNorm scale 1, shift 0, running mean 0, running var 1. Jittable; the building block for
    other unit-reset methods (e.g. ReDo)."""
    params, batch_stats, _ = reset_units_and_momentum(params, batch_stats, None, masks, key, width=width)
    return params, batch_stats


def reset_units_and_momentum(params: Params, batch_stats: Params, opt_state: Any, masks: Sequence[jax.Array],
                             key: jax.Array, *, width: int) -> tuple[Params, Params, Any]:
    """``reset_units``, and when ``opt_state`` is not None the momentum of every weight it
    re-initialises or zeroes set to 0 (as the textbook CBP variant does)."""
    layers = feature_layers(width)
    if len(masks) != len(layers):
        raise ValueError(f"expected {len(layers)} masks, got {len(masks)}")
    selections = [(jnp.arange(layer.channels), jnp.asarray(m, bool)) for layer, m in zip(layers, masks, strict=True)]
    momentum = None if opt_state is None else _get_momentum(opt_state)
    params, batch_stats, momentum = _reinitialise(params, batch_stats, momentum, layers, selections,
                                                  [valid for _, valid in selections], key)
    return params, batch_stats, None if opt_state is None else _set_momentum(opt_state, momentum)


def cbp_step(params: Params, batch_stats: Params, opt_state: Any, cbp_state: CBPState,
             features: Sequence[jax.Array], key: jax.Array, *, width: int, replacement_rate: float,
             utility_function: str = "contribution", maturity_threshold: int = 1000, decay_rate: float = 0.99,
             variant: str = "reference",
             decide_for_all_runs: bool = False) -> tuple[Params, Params, Any, CBPState, jax.Array]:
    """One generate-and-test step after an optimiser step (semantics §7); jittable, keyword args static.

    ``features`` are the 17 post-ReLU feature maps of this step's forward pass (the model's
    ``return_features``). Selection (steps 1-5) runs for all 17 layers before the re-initialisation
    (step 6) runs layer by layer, so a layer's fresh rows overwrite the zeroed columns written by
    the layer before it. The selection and the writes sit in a ``lax.cond`` that only runs in a
    step where some layer replaces. Mapped over runs, a cond on a per-run predicate becomes a
    select that runs the replacement every step; ``decide_for_all_runs`` keeps it a cond on
    whether any run replaces (``any_run``). Each run's decisions and writes are the same either
    way, but the rest of the compiled step may fuse differently, so several runs mapped together
    are then not bit-identical to the default (XLA's CPU backend rounded the SGD update otherwise).
    Returns the new (params, batch_stats, opt_state, cbp_state) and the number of units replaced
    per layer, int32 [17]."""
    layers = feature_layers(width)
    _check_args(layers, params, features, replacement_rate, utility_function, maturity_threshold, decay_rate, variant)
    textbook = variant == "textbook"
    contribution = utility_function == "contribution"
    decay = jnp.float32(decay_rate)
    step_weight = jnp.float32(1.0 - decay_rate)
    increments = replacement_increments(replacement_rate, width)
    ks = [min(layer.channels, math.ceil(r)) for layer, r in zip(layers, increments, strict=True)]

    # steps 1-4 for every layer: age, feature magnitude, eligibility, accumulator
    ages = [a + 1 for a in cbp_state.age]
    feat_mag = [feature_magnitude(f) for f in features]
    if textbook:
        mags = [decay * m + step_weight * f for m, f in zip(cbp_state.mean_feature_mag, feat_mag, strict=True)]
    else:
        mags = [m + step_weight * f for m, f in zip(cbp_state.mean_feature_mag, feat_mag, strict=True)]
    eligible = [a > maturity_threshold for a in ages]
    any_eligible = jnp.stack([jnp.any(e) for e in eligible])
    decide = any_run if decide_for_all_runs else (lambda pred: pred)
    # inside a cond, so that XLA materialises the result instead of copying the accumulator arithmetic
    # into every consumer (which made the step several seconds slower to compile); a run without an
    # eligible unit gets its accumulator back and n = 0 from either branch
    accumulator, due = jax.lax.cond(
        decide(jnp.any(any_eligible)),
        lambda acc: accumulate(acc, jnp.asarray(increment_limbs(increments)), any_eligible),
        lambda acc: (acc, jnp.zeros((len(layers),), jnp.int32)),
        cbp_state.accumulator)

    def out_magnitudes(p: Params) -> list[jax.Array]:
        return [output_weight_magnitude(_get(p, layer.next_layer)["kernel"]) for layer in layers]

    if textbook:  # running averages move every step; rank by the bias-corrected utility
        running = [decay * u + step_weight * (om * fm if contribution else om) for u, om, fm in
                   zip(cbp_state.utility, out_magnitudes(params), feat_mag, strict=True)]
        ranked_all = [u / (1.0 - decay ** a.astype(jnp.float32)) for u, a in zip(running, ages, strict=True)]
    momentum = _get_momentum(opt_state) if textbook else None

    def replace(operands: tuple) -> tuple:
        p, bs, mom = operands
        if textbook:
            ranked = ranked_all
        else:  # step 5, on the weights as they are before any write
            ranked = [om * m if contribution else om for om, m in zip(out_magnitudes(p), mags, strict=True)]
        selections = [_select(ranked[i], eligible[i], due[i], ks[i]) for i in range(len(layers))]
        chosen = [jnp.zeros((layer.channels,), bool).at[idx].set(valid)
                  for layer, (idx, valid) in zip(layers, selections, strict=True)]
        p, bs, mom = _reinitialise(p, bs, mom, layers, selections, chosen, key)
        return p, bs, mom, chosen, ranked

    def skip(operands: tuple) -> tuple:
        p, bs, mom = operands
        chosen = [jnp.zeros((layer.channels,), bool) for layer in layers]
        return p, bs, mom, chosen, list(cbp_state.utility)

    # a run with nothing due gets the same bits from ``replace`` as from ``skip``: no unit chosen,
    # every write a copy of the old value, and its ``ranked`` only read where a layer replaces
    params, batch_stats, momentum, chosen, ranked = jax.lax.cond(
        decide(jnp.any(due > 0)), replace, skip, (params, batch_stats, momentum))

    ages = [jnp.where(c, 0, a) for c, a in zip(chosen, ages, strict=True)]
    if textbook:
        utilities = [jnp.where(c, 0.0, u) for c, u in zip(chosen, running, strict=True)]
        mags = [jnp.where(c, 0.0, m) for c, m in zip(chosen, mags, strict=True)]
        opt_state = _set_momentum(opt_state, momentum)
    else:  # the reference stores a utility only in a step where that layer replaces
        utilities = [jnp.where(due[i] > 0, jnp.where(chosen[i], 0.0, ranked[i]), cbp_state.utility[i])
                     for i in range(len(layers))]
    replaced = jnp.stack([jnp.sum(c, dtype=jnp.int32) for c in chosen])
    new_state = CBPState(utility=tuple(utilities), age=tuple(ages), mean_feature_mag=tuple(mags),
                         accumulator=accumulator)
    return params, batch_stats, opt_state, new_state, replaced
