"""Continual backprop against hand-set weights and features, and the reference's double accumulator.

Everything runs on a width-2 ResNet-18 (feature layers of 2, 4, 8 and 16 channels) with tiny
feature maps; cbp_step is compiled once per static configuration and reused.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lop_jax.cbp import (
    CBPState,
    accumulate,
    accumulator_from_values,
    accumulator_values,
    cbp_step,
    increment_limbs,
    init_cbp_state,
    replacement_increments,
)
from lop_jax.model import ResNet18, feature_layers

W = 2
LAYERS = feature_layers(W)
CHANNELS = [layer.channels for layer in LAYERS]
RATE = 0.2  # rate·channels = 0.4, 0.8, 1.6, 3.2 for 2, 4, 8, 16 channels
DECAY = 0.99


# ---- helpers ------------------------------------------------------------------------------------


def get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


@functools.cache
def step_fn(utility: str = "contribution", variant: str = "reference"):
    return jax.jit(functools.partial(cbp_step, width=W, replacement_rate=RATE, utility_function=utility,
                                     maturity_threshold=1, decay_rate=DECAY, variant=variant))


def python_schedule(r: float, steps: int, first_eligible: int = 1) -> list[int]:
    """The reference's accumulator, verbatim, in Python doubles: n per step (1-based steps)."""
    acc, out = 0.0, []
    for t in range(1, steps + 1):
        if t < first_eligible:
            out.append(0)
            continue
        acc -= -r
        n = int(acc)
        acc -= n
        out.append(n)
    return out


def tiny_model_arrays(rng: np.random.Generator):
    """Width-2 (params, batch_stats) as writable numpy trees of the model's shapes, without compiling
    the model: random kernels, zero biases, BN scale 1, running mean 0, var 1."""
    shapes = jax.eval_shape(lambda: ResNet18(W).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))

    def fill(path, x):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(x.shape) * math.sqrt(2.0 / math.prod(x.shape[:-1]))).astype(np.float32)
        return np.full(x.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    params = jax.tree_util.tree_map_with_path(fill, dict(shapes["params"]))
    batch_stats = jax.tree_util.tree_map_with_path(fill, dict(shapes["batch_stats"]))
    return params, batch_stats


@functools.cache
def hand_world(seed: int = 0):
    """Width-2 params with hand-set next-layer magnitudes, BN entries and feature magnitudes.

    Every next-layer kernel is a[in] · (±1), so the output-weight magnitude of channel c is a[c];
    a and the feature magnitudes g are distinct per channel. BN scale 3, shift 2, running mean 5,
    var 7 and producer biases 0.3 make every reset visible.
    """
    rng = np.random.default_rng(seed)
    params, batch_stats = tiny_model_arrays(rng)
    mags, gs = [], []
    for layer in LAYERS:
        kernel = get(params, layer.next_layer)["kernel"]
        axis = kernel.ndim - 2
        a = ((rng.permutation(layer.channels) + 1) * 0.05).astype(np.float32)
        shape = [1] * kernel.ndim
        shape[axis] = layer.channels
        kernel[...] = a.reshape(shape) * rng.choice([-1.0, 1.0], size=kernel.shape).astype(np.float32)
        mags.append(a)
        gs.append(rng.permutation(np.linspace(0.5, 2.0, layer.channels)).astype(np.float32))
    # in the stem the feature magnitudes reverse the order of the weight magnitudes, so the
    # "contribution" and "weight" utilities pick different channels there
    gs[0] = np.where(mags[0] == mags[0].min(), 2.0, 0.5).astype(np.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        if "bn" in names[-2] or names[-2].endswith("_bn"):
            leaf[...] = 3.0 if names[-1] == "scale" else 2.0
        elif names[-1] == "bias" and names[-2] != "fc":
            leaf[...] = 0.3
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
        leaf[...] = 5.0 if path[-1].key == "mean" else 7.0
    features = []
    for layer, g in zip(LAYERS, gs, strict=True):
        f = np.stack([0.5 * g, 1.5 * g])  # mean |f| over the batch is g
        features.append(jnp.asarray(f if layer is LAYERS[-1] else f[:, None, None, :]))
    to_j = functools.partial(jax.tree_util.tree_map, jnp.asarray)
    return to_j(params), to_j(batch_stats), features, mags, gs


def momentum_state(params, value: float = 1.0):
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.trace(decay=0.9))
    state = tx.init(params)
    return (state[0], state[1]._replace(trace=jax.tree_util.tree_map(lambda x: jnp.full_like(x, value), params)))


def mature_state(age: int = 5, acc: float = 0.7, mfm: float = 0.0, util: float = 0.0) -> CBPState:
    """A state where every channel is eligible and every layer's accumulator holds ``acc``."""
    return CBPState(utility=tuple(jnp.full((c,), util, jnp.float32) for c in CHANNELS),
                    age=tuple(jnp.full((c,), age, jnp.int32) for c in CHANNELS),
                    mean_feature_mag=tuple(jnp.full((c,), mfm, jnp.float32) for c in CHANNELS),
                    accumulator=accumulator_from_values([acc] * len(CHANNELS)))


def out_mag(params, layer) -> np.ndarray:
    kernel = np.asarray(get(params, layer.next_layer)["kernel"])
    axis = kernel.ndim - 2
    return np.abs(kernel).mean(axis=tuple(a for a in range(kernel.ndim) if a != axis))


def replaced_sets(state: CBPState) -> list[set[int]]:
    """Channels whose age was reset this step (all ages were > 0 before)."""
    return [set(np.flatnonzero(np.asarray(a) == 0).tolist()) for a in state.age]


def due_after(acc: float) -> list[int]:
    return [int(acc + r) for r in replacement_increments(RATE, W)]


# ---- the accumulator ----------------------------------------------------------------------------


@functools.cache
def _acc_scan(steps: int):
    def run(inc):
        def body(acc, _):
            acc, n = accumulate(acc, inc, jnp.ones((inc.shape[0],), bool))
            return acc, n
        return jax.lax.scan(body, jnp.zeros_like(inc), None, length=steps)
    return jax.jit(run)


def test_accumulator_follows_reference_doubles_over_a_whole_run():
    r = 1e-5 * 512
    acc, ns = _acc_scan(200_000)(jnp.asarray(increment_limbs([r])))
    ns = np.asarray(ns)[:, 0]
    assert ns.sum() == 1024
    assert (np.flatnonzero(ns)[:3] + 1).tolist() == [196, 391, 586]
    assert ns.tolist() == python_schedule(r, 200_000)
    # a float32 accumulator drifts: 1,023 replacements (this is why the double is emulated)
    a, count, r32 = np.float32(0), 0, np.float32(r)
    for _ in range(200_000):
        a = np.float32(a + r32)
        n = int(a)
        a = np.float32(a - n)
        count += n
    assert count == 1023


def test_accumulator_matches_python_doubles_for_many_increments():
    rng = np.random.default_rng(1)
    incs = [0.4, 1e-5 * 64, 1e-6 * 64, 1e-8 * 3, 2.0 ** -42, 0.999999, 1.0, 1.5, 3 - 2 ** -51, 7.3, 1 / 3, 0.1]
    incs += list(rng.uniform(1e-7, 3, size=8)) + list(10 ** rng.uniform(-12, 1, size=8))
    steps = 5000
    acc, ns = _acc_scan(steps)(jnp.asarray(increment_limbs(incs)))
    ns = np.asarray(ns)
    finals = accumulator_values(acc)
    for i, r in enumerate(incs):
        assert ns[:, i].tolist() == python_schedule(float(r), steps), r
        py = 0.0
        for _ in range(steps):
            py -= -float(r)
            py -= int(py)
        assert finals[i] == py, r


def test_accumulator_range_is_checked():
    with pytest.raises(ValueError):
        increment_limbs([2.0 ** -50])
    with pytest.raises(ValueError):
        increment_limbs([2.0 ** 17])
    with pytest.raises(ValueError):
        accumulator_from_values([1.0])
    assert accumulator_values(accumulator_from_values([0.0, 0.7])) == [0.0, 0.7]


# ---- one step on hand-set weights -----------------------------------------------------------------


def test_one_step_selection_utilities_and_writes():
    params, bs, feats, mags, gs = hand_world()
    opt = momentum_state(params)
    state = mature_state(mfm=0.001)
    new_p, new_bs, new_opt, new_state, replaced = step_fn()(params, bs, opt, state, feats, jax.random.PRNGKey(3))
    due = due_after(0.7)
    assert due == [1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert np.asarray(replaced).tolist() == due
    increments = replacement_increments(RATE, W)
    assert accumulator_values(new_state.accumulator) == [0.7 + r - int(0.7 + r) for r in increments]

    sets = replaced_sets(new_state)
    step_w = np.float32(1.0 - DECAY)
    for i, layer in enumerate(LAYERS):
        # mean_feature_mag grows by (1 - decay)·mean|f| and is not reset for replaced channels
        mfm = np.float32(0.001) + step_w * gs[i]
        np.testing.assert_allclose(np.asarray(new_state.mean_feature_mag[i]), mfm, rtol=1e-5)
        # contribution utility = out-weight magnitude × mean_feature_mag, computed from the weights before the step
        om = out_mag(params, layer)
        np.testing.assert_allclose(om, mags[i], rtol=1e-5)
        util = om * mfm
        expected = set(np.argsort(util, kind="stable")[:due[i]].tolist())
        assert sets[i] == expected, (i, util)
        stored = util.copy()
        stored[list(expected)] = 0.0
        np.testing.assert_allclose(np.asarray(new_state.utility[i]), stored, rtol=1e-5)
        ages = np.full(layer.channels, 6)
        ages[list(expected)] = 0
        assert np.asarray(new_state.age[i]).tolist() == ages.tolist()
    # the stem's features reverse the weight order: the contribution utility used them
    assert sets[0] == {int(np.argmax(mags[0]))}

    # writes: fresh incoming weights and zero bias, BN reset, zero outgoing weights; nothing else changes
    changed = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, bool), params)
    for i, layer in enumerate(LAYERS):
        s = sorted(sets[i])
        get(changed, layer.producer)["kernel"][..., s] = True
        get(changed, layer.producer)["bias"][s] = True
        get(changed, layer.bn)["scale"][s] = True
        get(changed, layer.bn)["bias"][s] = True
        nxt = get(changed, layer.next_layer)["kernel"]
        if nxt.ndim == 4:
            nxt[:, :, s, :] = True
        else:
            nxt[s, :] = True
        kernel_new = np.asarray(get(new_p, layer.producer)["kernel"])[..., s]
        kernel_old = np.asarray(get(params, layer.producer)["kernel"])[..., s]
        assert np.all(kernel_new != kernel_old) and np.all(kernel_new != 0)
        assert np.all(np.asarray(get(new_p, layer.producer)["bias"])[s] == 0)
        assert np.all(np.asarray(get(new_p, layer.bn)["scale"])[s] == 1)
        assert np.all(np.asarray(get(new_p, layer.bn)["bias"])[s] == 0)
        assert np.all(np.asarray(get(new_bs, layer.bn)["mean"])[s] == 0)
        assert np.all(np.asarray(get(new_bs, layer.bn)["var"])[s] == 1)
        others = [c for c in range(layer.channels) if c not in sets[i]]
        assert np.all(np.asarray(get(new_bs, layer.bn)["mean"])[others] == 5)
        assert np.all(np.asarray(get(new_bs, layer.bn)["var"])[others] == 7)
    for (path, old), new, mask in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(new_p),
                                      jax.tree_util.tree_leaves(changed), strict=True):
        np.testing.assert_array_equal(np.asarray(new)[~mask], np.asarray(old)[~mask],
                                      err_msg=jax.tree_util.keystr(path))
    # shortcut convs and their BNs are never touched; the reference leaves the momentum alone
    shortcut_blocks = [name for name, block in params.items() if "shortcut_conv" in block]
    assert shortcut_blocks == ["block2", "block4", "block6"]
    for name in shortcut_blocks:
        for sub in ("shortcut_conv", "shortcut_bn"):
            for leaf, value in params[name][sub].items():
                np.testing.assert_array_equal(np.asarray(new_p[name][sub][leaf]), np.asarray(value))
        for stat, value in bs[name]["shortcut_bn"].items():
            np.testing.assert_array_equal(np.asarray(new_bs[name]["shortcut_bn"][stat]), np.asarray(value))
    for a, b in zip(jax.tree_util.tree_leaves(opt), jax.tree_util.tree_leaves(new_opt), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # outgoing weights: zero, except where the next layer's own fresh rows were written afterwards
    for i, layer in enumerate(LAYERS):
        s = sorted(sets[i])
        nxt = np.asarray(get(new_p, layer.next_layer)["kernel"])
        if i + 1 < len(LAYERS) and LAYERS[i + 1].producer == layer.next_layer:
            fresh_rows = sorted(sets[i + 1])
            keep = [c for c in range(nxt.shape[-1]) if c not in sets[i + 1]]
            assert np.all(nxt[:, :, s][..., keep] == 0)
            # the order of writes of semantics §7: (new row of i+1, replaced column of i) holds the new random value
            assert np.all(nxt[:, :, s][..., fresh_rows] != 0)
        else:  # the pooled features feed the Linear layer: its rows are exactly zero
            assert layer.next_layer == ("fc",) and i == len(LAYERS) - 1
            assert np.all(nxt[s, :] == 0)
            np.testing.assert_array_equal(np.asarray(new_p["fc"]["bias"]), np.asarray(params["fc"]["bias"]))


def test_weight_utility_ignores_features():
    params, bs, feats, mags, gs = hand_world(seed=1)
    state = mature_state(mfm=0.25)
    _, _, _, new_state, replaced = step_fn("weight")(params, bs, momentum_state(params), state, feats,
                                                      jax.random.PRNGKey(0))
    sets = replaced_sets(new_state)
    assert sets[0] == {int(np.argmin(mags[0]))} != {int(np.argmin(mags[0] * gs[0]))}
    for i, layer in enumerate(LAYERS):
        om = out_mag(params, layer)
        expected = set(np.argsort(om, kind="stable")[:int(replaced[i])].tolist())
        assert sets[i] == expected
        stored = om.copy()
        stored[list(expected)] = 0
        np.testing.assert_allclose(np.asarray(new_state.utility[i]), stored, rtol=1e-5)


def test_ineligible_channels_are_never_replaced():
    params, bs, feats, mags, gs = hand_world(seed=2)
    state = mature_state(mfm=0.25, util=-1.0)
    ages = [np.asarray(a).copy() for a in state.age]
    util0 = np.asarray(mags[0]) * (np.float32(0.25) + np.float32(0.01) * gs[0])
    lowest = int(np.argmin(util0))
    ages[0][lowest] = 0  # age 1 after the increment: not > maturity 1
    ages[16][:] = 0
    ages[16][[3, 11]] = 4  # only two eligible channels while three replacements are due
    ages[5][:] = 0  # no eligible channel: the layer is skipped, its accumulator does not move
    state = state._replace(age=tuple(jnp.asarray(a) for a in ages))
    _, _, _, new_state, replaced = step_fn()(params, bs, momentum_state(params), state, feats, jax.random.PRNGKey(1))
    sets = replaced_sets(new_state)
    assert sets[0] == {1 - lowest}
    assert sets[16] == {3, 11} and int(replaced[16]) == 2
    assert int(replaced[5]) == 0 and sets[5] == set()
    accs = accumulator_values(new_state.accumulator)
    assert accs[5] == 0.7 and accs[4] == 0.7 + 0.4 - 1 and accs[6] == 0.7 + 0.8 - 1
    # the utility is stored only where the layer replaces
    np.testing.assert_array_equal(np.asarray(new_state.utility[5]), -1.0)
    assert np.all(np.asarray(new_state.utility[4]) >= 0)


def test_new_incoming_weights_have_kaiming_std():
    params, bs, feats, _, _ = hand_world(seed=3)
    state = mature_state()
    opt = momentum_state(params)
    per_layer = [[] for _ in LAYERS]
    draws = {}
    for seed in range(40):
        new_p, _, _, new_state, _ = step_fn()(params, bs, opt, state, feats, jax.random.PRNGKey(100 + seed))
        for i, (layer, s) in enumerate(zip(LAYERS, replaced_sets(new_state), strict=True)):
            kernel = np.asarray(get(new_p, layer.producer)["kernel"])
            std = math.sqrt(2.0 / math.prod(kernel.shape[:-1]))
            per_layer[i].append(kernel[..., sorted(s)].ravel() / std)
        draws[seed] = np.asarray(get(new_p, LAYERS[0].producer)["kernel"])
    for i, z in enumerate(per_layer):
        z = np.concatenate(z)
        assert z.size >= 700
        assert abs(z.std() - 1) < 0.12 and abs(z.mean()) < 0.15, (i, z.std(), z.mean())
    z = np.concatenate([np.concatenate(zs) for zs in per_layer])
    assert abs(z.std() - 1) < 0.02 and abs(z.mean()) < 0.02
    assert not np.array_equal(draws[0], draws[1])
    again = step_fn()(params, bs, opt, state, feats, jax.random.PRNGKey(100))[0]
    np.testing.assert_array_equal(np.asarray(get(again, LAYERS[0].producer)["kernel"]), draws[0])


# ---- several steps ------------------------------------------------------------------------------


def test_schedule_ages_and_mean_feature_mag_over_steps():
    params, bs, feats, _, gs = hand_world(seed=4)
    opt = momentum_state(params)
    state = init_cbp_state(W)
    steps = 14
    history = []
    utils = []
    for t in range(steps):
        params, bs, opt, state, replaced = step_fn()(params, bs, opt, state, feats, jax.random.PRNGKey(t))
        history.append(np.asarray(replaced))
        utils.append([np.asarray(u) for u in state.utility])
    history = np.stack(history)
    # maturity 1: first eligible at step 2; from then on the reference accumulator decides
    for i, r in enumerate(replacement_increments(RATE, W)):
        assert history[:, i].tolist() == python_schedule(r, steps, first_eligible=2), i
    # rate·channels = 0.4 replaces on eligible steps 3, 5, 8, 10, 13
    assert (np.flatnonzero(history[1:, 0]) + 1).tolist() == [3, 5, 8, 10, 13]
    # mean_feature_mag: never decayed, never reset
    for i in range(len(LAYERS)):
        np.testing.assert_allclose(np.asarray(state.mean_feature_mag[i]), steps * np.float32(0.01) * gs[i], rtol=1e-5)
    # the stored utility changes only in steps where the layer replaces
    for t in range(1, steps):
        for i in (0, 5, 9):
            if history[t, i] == 0:
                np.testing.assert_array_equal(utils[t][i], utils[t - 1][i])
            else:
                assert not np.array_equal(utils[t][i], utils[t - 1][i])
    # ages count the steps since the last replacement
    ages = np.asarray(state.age[0])
    assert ages.min() == 0 and ages.max() <= steps


# ---- textbook variant ---------------------------------------------------------------------------


def test_textbook_variant_decays_bias_corrects_and_resets_momentum():
    params, bs, feats, mags, gs = hand_world(seed=5)
    opt = momentum_state(params, 1.0)
    state = mature_state(mfm=0.5)
    # layer 0: channel 0 has the lower running utility but is young, so its bias-corrected utility is higher
    ages = [np.asarray(a).copy() for a in state.age]
    utils = [np.asarray(u).copy() for u in state.utility]
    ages[0][:] = [1, 499]  # 2 and 500 after the increment
    utils[0][:] = [0.5, 1.0]
    state = state._replace(age=tuple(jnp.asarray(a) for a in ages), utility=tuple(jnp.asarray(u) for u in utils))
    new_p, new_bs, new_opt, new_state, replaced = step_fn(variant="textbook")(params, bs, opt, state, feats,
                                                                              jax.random.PRNGKey(7))
    sets = replaced_sets(new_state)
    d, w = np.float32(DECAY), np.float32(1 - DECAY)
    running0 = d * utils[0] + w * out_mag(params, LAYERS[0]) * gs[0]
    assert running0[0] < running0[1]
    assert sets[0] == {1}  # ranked by u / (1 - decay**age)
    for i, layer in enumerate(LAYERS):
        running = d * utils[i] + w * out_mag(params, layer) * gs[i]
        if i > 0:  # same ages everywhere else: the bias correction does not reorder
            assert sets[i] == set(np.argsort(running, kind="stable")[:due_after(0.7)[i]].tolist())
        running[sorted(sets[i])] = 0
        np.testing.assert_allclose(np.asarray(new_state.utility[i]), running, rtol=1e-5)
        mfm = d * np.float32(0.5) + w * gs[i]
        mfm[sorted(sets[i])] = 0
        np.testing.assert_allclose(np.asarray(new_state.mean_feature_mag[i]), mfm, rtol=1e-5)
    assert np.asarray(replaced).tolist() == due_after(0.7)
    # momentum: zero exactly at the re-initialised and zeroed weights, untouched elsewhere
    trace = new_opt[1].trace
    for i, layer in enumerate(LAYERS):
        s = sorted(sets[i])
        others = [c for c in range(layer.channels) if c not in sets[i]]
        assert np.all(np.asarray(get(trace, layer.producer)["kernel"])[..., s] == 0)
        assert np.all(np.asarray(get(trace, layer.producer)["bias"])[s] == 0)
        assert np.all(np.asarray(get(trace, layer.bn)["scale"])[s] == 0)
        assert np.all(np.asarray(get(trace, layer.bn)["bias"])[others] == 1)
        nxt = np.asarray(get(trace, layer.next_layer)["kernel"])
        assert np.all((nxt[:, :, s] if nxt.ndim == 4 else nxt[s]) == 0)
    np.testing.assert_array_equal(np.asarray(trace["fc"]["bias"]), 1)
    np.testing.assert_array_equal(np.asarray(trace["block2"]["shortcut_conv"]["kernel"]), 1)
    total = sum(int(np.sum(np.asarray(x) == 0)) for x in jax.tree_util.tree_leaves(trace))
    assert 0 < total < sum(x.size for x in jax.tree_util.tree_leaves(trace)) // 2


# ---- argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(utility_function="adaptation"), dict(replacement_rate=0.0),
                                    dict(maturity_threshold=0), dict(variant="other"), dict(decay_rate=1.0)])
def test_bad_arguments_are_clear_errors(kwargs):
    params, bs, feats, _, _ = hand_world()
    args = dict(width=W, replacement_rate=RATE, utility_function="contribution", maturity_threshold=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        cbp_step(params, bs, momentum_state(params), init_cbp_state(W), feats, jax.random.PRNGKey(0), **args)
    with pytest.raises(ValueError, match="feature maps"):
        cbp_step(params, bs, momentum_state(params), init_cbp_state(W), feats[:-1], jax.random.PRNGKey(0),
                 width=W, replacement_rate=RATE)
