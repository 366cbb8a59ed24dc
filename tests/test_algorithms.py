"""The algorithm seam: built-in methods selected by the reference's config keys, shrink and perturb,
head and full resets, CBP through ``after_step``, and the registry for new methods."""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lop_jax import algorithms as alg
from lop_jax.cbp import CBPState, replacement_increments
from lop_jax.config import ConfigError, load_config, make_config
from lop_jax.model import ResNet18, feature_layers

W = 2
LAYERS = feature_layers(W)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_world(seed: int = 0):
    """Width-2 (params, batch_stats) with non-default values everywhere, built without compiling
    the model: random kernels, biases 0.3, BN scale 3 and shift 2, running mean 5 and var 7."""
    shapes = jax.eval_shape(lambda: ResNet18(W).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name, owner = path[-1].key, path[-2].key
        if name == "kernel":
            return jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        if name == "bias":
            value = 2.0 if "bn" in owner else 0.3
        else:
            value = {"scale": 3.0, "mean": 5.0, "var": 7.0}[name]
        return jnp.full(x.shape, value, jnp.float32)

    params = jax.tree_util.tree_map_with_path(fill, dict(shapes["params"]))
    batch_stats = jax.tree_util.tree_map_with_path(fill, dict(shapes["batch_stats"]))
    return params, batch_stats


def optimiser_state(params):
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.trace(decay=0.9))
    state = tx.init(params)
    return (state[0], state[1]._replace(trace=jax.tree_util.tree_map(jnp.ones_like, params)))


def features(seed: int = 0) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    out = []
    for layer in LAYERS:
        shape = (2, layer.channels) if layer is LAYERS[-1] else (2, 1, 1, layer.channels)
        out.append(jnp.asarray(rng.uniform(0.1, 2.0, size=shape), jnp.float32))
    return out


def cfg(**values):
    return make_config({"network_width": W, **values})


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


# ---- selection by the reference's config keys ---------------------------------------------------


@pytest.mark.parametrize("name, methods", [
    ("base_deep_learning_system", []),
    ("continual_backpropagation", ["continual_backprop"]),
    ("shrink_and_perturb", ["shrink_and_perturb"]),
    ("head_resetting", ["head_reset"]),
    ("retrained_network", ["full_reset"]),
])
def test_reference_configs_select_their_method(name, methods):
    c = load_config(CONFIGS / f"{name}.json")
    assert [m.name for m in alg.active_methods(c)] == methods
    assert alg.needs_features(c) == (methods == ["continual_backprop"])
    state = alg.init_algo_state(c, None)
    if methods == ["continual_backprop"]:
        assert list(state) == ["continual_backprop"]
        cbp = state["continual_backprop"]
        assert isinstance(cbp, CBPState)
        assert [u.shape[0] for u in cbp.utility] == [layer.channels for layer in feature_layers(64)]
    else:
        assert state == {}


def test_out_of_range_cbp_settings_are_config_errors():
    with pytest.raises(ConfigError, match="replacement_rate"):
        cfg(use_cbp=True, replacement_rate=0.0, maturity_threshold=10)
    with pytest.raises(ConfigError, match="utility_function"):
        cfg(use_cbp=True, replacement_rate=1e-5, maturity_threshold=10, utility_function="adaptation")
    with pytest.raises(ConfigError, match="maturity_threshold"):
        cfg(use_cbp=True, replacement_rate=1e-5, maturity_threshold=0)


# ---- per-step hooks -----------------------------------------------------------------------------


def test_after_step_is_identity_without_a_per_step_method():
    params, bs = tiny_world()
    opt = optimiser_state(params)
    c = cfg(reset_head=True)
    p, b, o, s, replaced = alg.after_step(c, params, bs, opt, alg.init_algo_state(c, params), None,
                                          jax.random.PRNGKey(0))
    assert p is params and b is bs and o is opt and s == {}
    assert replaced.dtype == jnp.int32 and np.asarray(replaced).tolist() == [0] * 17


def test_shrink_and_perturb_noise_has_the_right_std_and_is_reproducible():
    params, bs = tiny_world()
    opt = optimiser_state(params)
    c = cfg(noise_std=0.01)
    step = jax.jit(functools.partial(alg.after_step, c))
    p1, b1, o1, s1, rep = step(params, bs, opt, {}, None, jax.random.PRNGKey(1))
    again = step(params, bs, opt, {}, None, jax.random.PRNGKey(1))[0]
    other = step(params, bs, opt, {}, None, jax.random.PRNGKey(2))[0]
    assert leaves_equal(p1, again)
    diffs = [np.asarray(n) - np.asarray(o) for n, o in zip(jax.tree_util.tree_leaves(p1),
                                                          jax.tree_util.tree_leaves(params), strict=True)]
    assert all(np.all(d != 0) for d in diffs)  # every parameter, BN scale/shift and biases included
    d = np.concatenate([x.ravel() for x in diffs])
    assert d.size > 10_000
    assert abs(d.std() / 0.01 - 1) < 0.03 and abs(d.mean()) < 0.001
    d2 = np.concatenate([(np.asarray(n) - np.asarray(o)).ravel() for n, o in
                         zip(jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(params), strict=True)])
    assert abs(np.corrcoef(d, d2)[0, 1]) < 0.05
    assert leaves_equal(b1, bs) and leaves_equal(o1, opt) and s1 == {}
    assert np.asarray(rep).tolist() == [0] * 17


def test_cbp_runs_through_after_step_before_the_noise():
    params, bs = tiny_world(seed=1)
    opt = optimiser_state(params)
    c = cfg(use_cbp=True, replacement_rate=0.2, maturity_threshold=1, utility_function="contribution",
            noise_std=1e-3)
    assert [m.name for m in alg.active_methods(c)] == ["continual_backprop", "shrink_and_perturb"]
    state = alg.init_algo_state(c, params)
    step = jax.jit(functools.partial(alg.after_step, c))
    feats = features()
    history = []
    for t in range(4):
        new_params, bs, opt, state, replaced = step(params, bs, opt, state, feats, jax.random.PRNGKey(t))
        history.append(np.asarray(replaced))
        if t == 1:  # first eligible step: the 8- and 16-channel layers replace (rate·channels >= 1)
            ages = np.asarray(state["continual_backprop"].age[16])
            fresh = np.flatnonzero(ages == 0)
            assert fresh.size == 3
            # CBP zeroes the Linear rows of replaced pooled features, then the noise perturbs them
            rows = np.asarray(new_params["fc"]["kernel"])[fresh]
            assert np.all(rows != 0) and np.all(np.abs(rows) < 6e-3)
            scale = np.asarray(new_params["block7"]["bn2"]["scale"])[fresh]
            assert np.all(np.abs(scale - 1) < 6e-3)
        params = new_params
    history = np.stack(history)
    for i, r in enumerate(replacement_increments(0.2, W)):
        acc, expected = 0.0, [0]
        for _ in range(3):
            acc += r
            expected.append(int(acc))
            acc -= int(acc)
        assert history[:, i].tolist() == expected, i
    assert np.all(history.sum(axis=0) > 0)  # every feature layer replaced at least once


def test_cbp_needs_the_features():
    c = cfg(use_cbp=True, replacement_rate=0.2, maturity_threshold=1)
    params, bs = tiny_world()
    with pytest.raises(ValueError, match="feature maps"):
        alg.after_step(c, params, bs, optimiser_state(params), alg.init_algo_state(c, params), None,
                       jax.random.PRNGKey(0))


# ---- task-boundary hooks ------------------------------------------------------------------------


def test_task_boundary_never_sees_the_optimiser_state():
    assert list(inspect.signature(alg.at_task_boundary).parameters) == ["cfg", "params", "batch_stats", "key"]
    params, bs = tiny_world()
    p, b = alg.at_task_boundary(cfg(), params, bs, jax.random.PRNGKey(0))
    assert p is params and b is bs


def test_head_reset_changes_only_the_linear_layer():
    params, bs = tiny_world()
    p, b = alg.at_task_boundary(cfg(reset_head=True), params, bs, jax.random.PRNGKey(3))
    assert b is bs
    for name in params:
        if name != "fc":
            assert leaves_equal(p[name], params[name]), name
    kernel = np.asarray(p["fc"]["kernel"])
    assert kernel.shape == (8 * W, 100)
    assert not np.any(kernel == np.asarray(params["fc"]["kernel"]))
    assert abs(kernel.std() / math.sqrt(1 / (8 * W)) - 1) < 0.08 and abs(kernel.mean()) < 0.03
    assert np.all(np.asarray(p["fc"]["bias"]) == 0)
    again, _ = alg.at_task_boundary(cfg(reset_head=True), params, bs, jax.random.PRNGKey(3))
    assert leaves_equal(again, p)


def test_full_reset_reinitialises_all_weights_but_keeps_running_statistics():
    params, bs = tiny_world()
    p, b = alg.at_task_boundary(cfg(reset_network=True), params, bs, jax.random.PRNGKey(4))
    assert b is bs  # BatchNorm running statistics kept (reference quirk)
    zs = []
    for path, new in jax.tree_util.tree_flatten_with_path(p)[0]:
        old = np.asarray(functools.reduce(lambda tree, k: tree[k.key], path, params))
        new = np.asarray(new)
        name = path[-1].key
        where = jax.tree_util.keystr(path)
        if name == "kernel":
            assert not np.any(new == old), where
            fan_in = math.prod(new.shape[:-1])
            std = math.sqrt((2.0 if new.ndim == 4 else 1.0) / fan_in)
            zs.append(new.ravel() / std)
            if new.size >= 1500:
                assert abs(new.std() / std - 1) < 0.1, where
        elif name == "bias":
            assert np.all(new == 0), where
        else:
            assert name == "scale" and np.all(new == 1), where
    z = np.concatenate(zs)
    assert z.size > 10_000 and abs(z.std() - 1) < 0.03 and abs(z.mean()) < 0.03
    assert "shortcut_conv" in p["block2"]  # shortcut convs are among the re-initialised kernels above


def test_both_resets_run_head_then_network():
    c = cfg(reset_head=True, reset_network=True)
    assert [m.name for m in alg.active_methods(c)] == ["head_reset", "full_reset"]
    params, bs = tiny_world()
    p, b = alg.at_task_boundary(c, params, bs, jax.random.PRNGKey(5))
    full, _ = alg.at_task_boundary(cfg(reset_network=True), params, bs, jax.random.PRNGKey(5))
    assert leaves_equal(p, full)  # the full reset draws with its own key, after the head reset
    assert b is bs


# ---- registry -----------------------------------------------------------------------------------


@pytest.fixture
def toy_method():
    def init_state(c, params):
        return {"steps": jnp.zeros((), jnp.int32)}

    def after_step(c, params, batch_stats, opt_state, state, feats, key):
        params = dict(params, fc=dict(params["fc"], bias=params["fc"]["bias"] * 0.5))
        return params, batch_stats, opt_state, {"steps": state["steps"] + 1}, jnp.ones((17,), jnp.int32)

    def at_boundary(c, params, batch_stats, key):
        return dict(params, fc=dict(params["fc"], bias=params["fc"]["bias"] + 1.0)), batch_stats

    method = alg.register_method(alg.PlasticityMethod(
        name="toy_redo", enabled=lambda c: c.experiment_name == "toy_redo", init_state=init_state,
        after_step=after_step, at_task_boundary=at_boundary))
    yield method
    alg.unregister_method("toy_redo")


def test_registered_method_runs_without_touching_the_train_loop(toy_method):
    assert "toy_redo" in alg.registered_methods()
    with pytest.raises(ValueError, match="already registered"):
        alg.register_method(toy_method)
    c = cfg(experiment_name="toy_redo", noise_std=0.01)
    assert [m.name for m in alg.active_methods(c)] == ["shrink_and_perturb", "toy_redo"]
    assert alg.active_methods(cfg()) == []
    params, bs = tiny_world()
    state = alg.init_algo_state(c, params)
    assert list(state) == ["toy_redo"]
    opt = optimiser_state(params)
    p, b, o, state, replaced = alg.after_step(c, params, bs, opt, state, None, jax.random.PRNGKey(0))
    assert int(state["toy_redo"]["steps"]) == 1 and np.asarray(replaced).tolist() == [1] * 17
    # the noise ran first (registration order), then the toy halved the perturbed bias
    assert np.all(np.abs(np.asarray(p["fc"]["bias"]) - 0.15) < 0.05)
    p2, _ = alg.at_task_boundary(c, params, bs, jax.random.PRNGKey(0))
    assert np.allclose(np.asarray(p2["fc"]["bias"]), 1.3)


# ---- the config seam for new methods: extra_methods, method_options, reset_units -------------------


def test_extra_methods_switches_a_registered_method_on_with_its_options():
    seen = []

    def after_step(c, params, batch_stats, opt_state, state, feats, key):
        seen.append(c.options_for("scale_fc"))
        factor = c.options_for("scale_fc")["factor"]
        return dict(params, fc=dict(params["fc"], kernel=params["fc"]["kernel"] * factor)), batch_stats, \
            opt_state, state, None

    alg.register_method(alg.PlasticityMethod(name="scale_fc", after_step=after_step))
    try:
        params, bs = tiny_world()
        assert alg.active_methods(cfg()) == []  # registered but not named: off
        c = cfg(extra_methods=["scale_fc"], method_options={"scale_fc": {"factor": 0.5}})
        assert [m.name for m in alg.active_methods(c)] == ["scale_fc"]
        p, *_ = alg.after_step(c, params, bs, optimiser_state(params), {}, None, jax.random.PRNGKey(0))
        np.testing.assert_array_equal(np.asarray(p["fc"]["kernel"]), np.asarray(params["fc"]["kernel"]) * 0.5)
        assert seen == [{"factor": 0.5}]
        assert c.to_dict()["extra_methods"] == ["scale_fc"]  # JSON-ready, reloads to the same config
        assert make_config(c.to_dict()) == c
    finally:
        alg.unregister_method("scale_fc")


@pytest.mark.parametrize("values, message", [
    ({"extra_methods": "redo"}, "config key 'extra_methods': expected a list"),
    ({"extra_methods": ["a", "a"]}, "config key 'extra_methods': a method is named twice"),
    ({"method_options": {"redo": 3}}, "config key 'method_options': expected an object"),
])
def test_extension_keys_have_typed_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**values)


def test_an_unregistered_method_is_a_named_error_before_anything_is_written(tmp_path):
    from lop_jax.experiment import run_experiments

    for key, value in (("extra_methods", ["no_such_method"]), ("method_options", {"no_such_method": {}})):
        c = cfg(**{key: value}, results_dir=str(tmp_path), experiment_name="x")
        with pytest.raises(ConfigError, match=f"config key '{key}': no plasticity method named 'no_such_method'"):
            run_experiments(c, [0], progress=False)
        assert not (tmp_path / "x").exists()


def test_reset_units_reinitialises_only_the_chosen_units_like_cbp():
    params, bs = tiny_world()
    masks = [jnp.zeros((layer.channels,), bool) for layer in LAYERS]
    masks[3] = masks[3].at[1].set(True)  # block1.conv1: output channel 1 of 2
    p, b = jax.jit(functools.partial(alg.reset_units, width=W))(params, bs, masks, jax.random.PRNGKey(3))
    layer = LAYERS[3]
    k_old, k_new = (np.asarray(t[layer.producer[0]][layer.producer[1]]["kernel"]) for t in (params, p))
    assert not np.array_equal(k_new[..., 1], k_old[..., 1])
    np.testing.assert_array_equal(np.delete(k_new, 1, axis=-1), np.delete(k_old, 1, axis=-1))
    nxt = p[layer.next_layer[0]][layer.next_layer[1]]["kernel"]
    assert np.all(np.asarray(nxt)[:, :, 1, :] == 0)
    bn_p, bn_s = p[layer.bn[0]][layer.bn[1]], b[layer.bn[0]][layer.bn[1]]
    assert float(bn_p["scale"][1]) == 1.0 and float(bn_p["bias"][1]) == 0.0
    assert float(bn_s["mean"][1]) == 0.0 and float(bn_s["var"][1]) == 1.0
    assert float(bn_s["mean"][0]) == 5.0 and float(bn_p["scale"][0]) == 3.0
    # every other layer is untouched
    assert leaves_equal(p["stem_conv"], params["stem_conv"]) and leaves_equal(p["fc"], params["fc"])
