"""The plasticity-method seam (``lop_jax.methods``): the paper's methods selected by the reference's
config keys and run through the hooks, ``chain``, the registry and the config's ``methods`` key."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lop_jax import methods as lm
from lop_jax.cbp import CBPState, replacement_increments
from lop_jax.config import ConfigError, load_config, make_config
from lop_jax.methods import MethodArgs
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


def after_step(c, params, bs, opt, state, feats, key):
    """The config's methods' per-step hook: (params, batch_stats, opt_state, state, metrics)."""
    return tuple(lm.from_config(c).after_step(MethodArgs(params, bs, opt, state, key, features=feats)))


def at_task_boundary(c, params, bs, opt, key):
    out = lm.from_config(c).at_task_boundary(MethodArgs(params, bs, opt, {}, key))
    return out.params, out.batch_stats, out.opt_state


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
    method = lm.from_config(c)
    assert [m.name for m in method.methods] == methods
    assert method.uses_features == (methods == ["continual_backprop"])
    params = jax.eval_shape(lambda: ResNet18(64).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                      train=False))["params"]
    state = method.init(params)
    if methods == ["continual_backprop"]:
        assert list(state) == ["continual_backprop"]
        cbp = state["continual_backprop"]
        assert isinstance(cbp, CBPState)
        assert [u.shape[0] for u in cbp.utility] == [layer.channels for layer in feature_layers(64)]
        assert dict(method.metrics) == {"replaced_units": lm.MetricSpec((17,), jnp.int32)}
    else:
        assert state == {} and dict(method.metrics) == {}


def test_out_of_range_cbp_settings_are_config_errors():
    with pytest.raises(ConfigError, match="replacement_rate"):
        cfg(use_cbp=True, replacement_rate=0.0, maturity_threshold=10)
    with pytest.raises(ConfigError, match="utility_function"):
        cfg(use_cbp=True, replacement_rate=1e-5, maturity_threshold=10, utility_function="adaptation")
    with pytest.raises(ConfigError, match="maturity_threshold"):
        cfg(use_cbp=True, replacement_rate=1e-5, maturity_threshold=0)


# ---- per-step hooks -----------------------------------------------------------------------------


def test_a_config_without_a_per_step_method_has_no_per_step_hook():
    assert lm.from_config(cfg(reset_head=True)).after_step is None
    assert lm.from_config(cfg()).after_step is None and lm.from_config(cfg()).at_task_boundary is None


def test_shrink_and_perturb_noise_has_the_right_std_and_is_reproducible():
    params, bs = tiny_world()
    opt = optimiser_state(params)
    c = cfg(noise_std=0.01)
    step = jax.jit(functools.partial(after_step, c))
    p1, b1, o1, s1, metrics = step(params, bs, opt, {}, None, jax.random.PRNGKey(1))
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
    assert leaves_equal(b1, bs) and leaves_equal(o1, opt) and s1 == {} and metrics == {}


def test_cbp_runs_through_after_step_before_the_noise():
    params, bs = tiny_world(seed=1)
    opt = optimiser_state(params)
    c = cfg(use_cbp=True, replacement_rate=0.2, maturity_threshold=1, utility_function="contribution",
            noise_std=1e-3)
    method = lm.from_config(c)
    assert [m.name for m in method.methods] == ["continual_backprop", "shrink_and_perturb"]
    state = method.init(params)
    step = jax.jit(functools.partial(after_step, c))
    feats = tuple(features())
    history = []
    for t in range(4):
        new_params, bs, opt, state, metrics = step(params, bs, opt, state, feats, jax.random.PRNGKey(t))
        history.append(np.asarray(metrics["replaced_units"]))
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
        after_step(c, params, bs, optimiser_state(params), lm.from_config(c).init(params), None,
                   jax.random.PRNGKey(0))


# ---- task-boundary hooks ------------------------------------------------------------------------


def test_the_resets_keep_the_momentum_as_the_reference():
    params, bs = tiny_world()
    opt = optimiser_state(params)
    for c in (cfg(reset_head=True), cfg(reset_network=True)):
        _, b, o = at_task_boundary(c, params, bs, opt, jax.random.PRNGKey(0))
        assert o is opt and b is bs


def test_head_reset_changes_only_the_linear_layer():
    params, bs = tiny_world()
    opt = optimiser_state(params)
    p, b, _ = at_task_boundary(cfg(reset_head=True), params, bs, opt, jax.random.PRNGKey(3))
    assert b is bs
    for name in params:
        if name != "fc":
            assert leaves_equal(p[name], params[name]), name
    kernel = np.asarray(p["fc"]["kernel"])
    assert kernel.shape == (8 * W, 100)
    assert not np.any(kernel == np.asarray(params["fc"]["kernel"]))
    assert abs(kernel.std() / math.sqrt(1 / (8 * W)) - 1) < 0.08 and abs(kernel.mean()) < 0.03
    assert np.all(np.asarray(p["fc"]["bias"]) == 0)
    again, _, _ = at_task_boundary(cfg(reset_head=True), params, bs, opt, jax.random.PRNGKey(3))
    assert leaves_equal(again, p)


def test_full_reset_reinitialises_all_weights_but_keeps_running_statistics():
    params, bs = tiny_world()
    p, b, _ = at_task_boundary(cfg(reset_network=True), params, bs, optimiser_state(params), jax.random.PRNGKey(4))
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
    assert [m.name for m in lm.from_config(c).methods] == ["head_reset", "full_reset"]
    params, bs = tiny_world()
    opt = optimiser_state(params)
    p, b, _ = at_task_boundary(c, params, bs, opt, jax.random.PRNGKey(5))
    full, _, _ = at_task_boundary(cfg(reset_network=True), params, bs, opt, jax.random.PRNGKey(5))
    assert leaves_equal(p, full)  # the full reset draws with its own key, after the head reset
    assert b is bs


# ---- chain --------------------------------------------------------------------------------------


def halve_fc_bias(name="halve", metric="halved"):
    """A toy method: halves the Linear bias after every step, counts its steps, adds 1 at boundaries."""
    def after(args):
        params = dict(args.params, fc=dict(args.params["fc"], bias=args.params["fc"]["bias"] * 0.5))
        return lm.MethodUpdate(params, args.batch_stats, args.opt_state, args.state + 1,
                               {metric: jnp.ones((), jnp.int32)})

    def boundary(args):
        params = dict(args.params, fc=dict(args.params["fc"], bias=args.params["fc"]["bias"] + 1.0))
        return lm.MethodUpdate(params, args.batch_stats, args.opt_state, args.state, {})

    return lm.PlasticityMethod(name, init=lambda params: jnp.zeros((), jnp.int32), after_step=after,
                               at_task_boundary=boundary, metrics={metric: lm.MetricSpec((), jnp.int32)})


def test_chain_runs_its_methods_in_order_each_with_its_state_and_key():
    params, bs = tiny_world()
    opt = optimiser_state(params)
    noise = lm.shrink_and_perturb(noise_std=0.01)
    method = lm.chain(noise, halve_fc_bias())
    assert [m.name for m in method.methods] == ["shrink_and_perturb", "halve"]
    state = method.init(params)
    assert list(state) == ["halve"]
    out = method.after_step(MethodArgs(params, bs, opt, state, jax.random.PRNGKey(0)))
    assert int(out.state["halve"]) == 1 and int(out.metrics["halved"]) == 1
    # the noise ran first, then the toy halved the perturbed bias
    assert np.all(np.abs(np.asarray(out.params["fc"]["bias"]) - 0.15) < 0.05)
    alone = noise.after_step(MethodArgs(params, bs, opt, None, lm.method_key(jax.random.PRNGKey(0),
                                                                              "shrink_and_perturb")))
    np.testing.assert_array_equal(np.asarray(out.params["fc"]["bias"]),
                                  np.asarray(alone.params["fc"]["bias"]) * np.float32(0.5))
    # the toy's key-free hook does not change the noise's draws (each method's key is fixed by its name)
    swapped = lm.chain(halve_fc_bias(), noise).after_step(MethodArgs(params, bs, opt, state, jax.random.PRNGKey(0)))
    assert leaves_equal(swapped.params["stem_conv"], out.params["stem_conv"])
    p2 = method.at_task_boundary(MethodArgs(params, bs, opt, state, jax.random.PRNGKey(0))).params
    assert np.allclose(np.asarray(p2["fc"]["bias"]), 1.3)


def test_chain_refuses_a_name_or_a_metric_twice():
    with pytest.raises(ValueError, match="twice"):
        lm.chain(halve_fc_bias(), halve_fc_bias(metric="other"))
    with pytest.raises(ValueError, match="metric named 'halved'"):
        lm.chain(halve_fc_bias(), halve_fc_bias(name="again"))


# ---- registry and the config's methods key ------------------------------------------------------


def scale_fc(*, factor: float, every: int = 1) -> lm.PlasticityMethod:
    """A toy factory: the Linear kernel times ``factor`` after every step."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")

    def after(args):
        params = dict(args.params, fc=dict(args.params["fc"], kernel=args.params["fc"]["kernel"] * factor))
        return lm.MethodUpdate(params, args.batch_stats, args.opt_state, args.state, {})

    return lm.PlasticityMethod("scale_fc", after_step=after)


@pytest.fixture
def registered_scale_fc():
    lm.register("scale_fc", scale_fc)
    yield
    lm.unregister("scale_fc")


def test_a_registered_factory_runs_from_the_config_with_its_options(registered_scale_fc):
    params, bs = tiny_world()
    c = cfg(methods=[{"name": "scale_fc", "factor": 1}], noise_std=0.01)
    assert c.methods == (("scale_fc", (("factor", 1.0),)),)  # typed as the factory's annotation says
    assert [m.name for m in lm.from_config(c).methods] == ["shrink_and_perturb", "scale_fc"]
    p, *_ = after_step(cfg(methods=[{"name": "scale_fc", "factor": 0.5}]), params, bs, optimiser_state(params), {},
                       None, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(p["fc"]["kernel"]), np.asarray(params["fc"]["kernel"]) * 0.5)
    assert c.to_dict()["methods"] == [{"name": "scale_fc", "factor": 1.0}]  # JSON-ready, reloads the same
    assert make_config(c.to_dict()) == c
    with pytest.raises(ValueError, match="already registered"):
        lm.register("scale_fc", lambda: None)


@pytest.mark.parametrize("methods, message", [
    ("redo", "expected a list"),
    ([{"threshold": 0.1}], "an object with a 'name'"),
    ([{"name": "no_such_method"}], "no plasticity method named 'no_such_method'"),
    ([{"name": "scale_fc"}], "option 'factor' is required"),
    ([{"name": "scale_fc", "factr": 2.0}], "has no option 'factr'"),
    ([{"name": "scale_fc", "factor": "big"}], "option 'factor' must be a number"),
    ([{"name": "scale_fc", "factor": 1.0, "every": 1.5}], "option 'every' must be an integer"),
    ([{"name": "scale_fc", "factor": -1.0}], "'scale_fc': factor must be > 0"),
    ([{"name": "scale_fc", "factor": 1.0}, {"name": "scale_fc", "factor": 2.0}], "named twice"),
])
def test_a_misnamed_or_misconfigured_method_is_a_one_line_config_error(registered_scale_fc, methods, message):
    with pytest.raises(ConfigError, match=message) as err:
        cfg(methods=methods)
    assert str(err.value).startswith("config key 'methods'") and "\n" not in str(err.value)


def test_the_old_seams_keys_load_when_empty_and_name_their_successor_otherwise():
    assert cfg(extra_methods=[], method_options={}) == cfg()
    with pytest.raises(ConfigError, match="config key 'extra_methods' was replaced by 'methods'"):
        cfg(extra_methods=["redo"])


def test_an_unknown_method_is_a_named_error_before_anything_is_written(tmp_path):
    from lop_jax.experiment import run_experiments

    lm.register("scale_fc", scale_fc)
    c = cfg(methods=[{"name": "scale_fc", "factor": 2.0}], results_dir=str(tmp_path), experiment_name="x")
    lm.unregister("scale_fc")
    with pytest.raises(ConfigError, match="no plasticity method named 'scale_fc'"):
        run_experiments(c, [0], progress=False)
    assert not (tmp_path / "x").exists()


def test_reset_units_reinitialises_only_the_chosen_units_like_cbp():
    from lop_jax.cbp import reset_units

    params, bs = tiny_world()
    masks = [jnp.zeros((layer.channels,), bool) for layer in LAYERS]
    masks[3] = masks[3].at[1].set(True)  # block1.conv1: output channel 1 of 2
    p, b = jax.jit(functools.partial(reset_units, width=W))(params, bs, masks, jax.random.PRNGKey(3))
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


def test_a_config_stored_before_the_methods_seam_matches_the_same_system_today():
    """Exported runs made before ``activation`` and ``methods`` existed stay resumable and comparable:
    a missing key is its default, and a stored config that differs from it still differs."""
    from lop_jax.config import config_diff

    today = cfg().to_dict()
    stored = {k: v for k, v in today.items() if k not in ("activation", "methods")}
    stored.update(extra_methods=[], method_options={})
    assert config_diff(stored, today) == []
    assert config_diff(stored, cfg(activation="crelu").to_dict()) == ["activation"]
    assert config_diff(stored, cfg(methods=[{"name": "redo"}]).to_dict()) == ["methods"]
