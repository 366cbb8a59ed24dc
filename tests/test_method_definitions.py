"""Each plasticity method beyond the paper's, checked against its paper's definition on a small
hand-computed case, and all of them through a real (smoke) run with their metrics recorded."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from test_methods import LAYERS, features, optimiser_state, tiny_world

from lop_jax import methods as lm
from lop_jax.methods import MethodArgs
from lop_jax.methods.redo import dormant_scores

KEY = jax.random.PRNGKey(0)


# ---- ReDo ---------------------------------------------------------------------------------------


def test_redo_recycles_the_tau_dormant_units_every_k_steps_and_their_momentum():
    params, bs = tiny_world()
    opt = optimiser_state(params)  # momentum 1 everywhere
    feats = features()
    # block1.conv1 (layer 3, 2 channels): mean |h| 0.1 and 1.9, layer mean 1.0 → scores 0.1, 1.9
    feats[3] = jnp.asarray(np.broadcast_to([0.1, 1.9], feats[3].shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(dormant_scores(tuple(feats))[3]), [0.1, 1.9], rtol=1e-6)
    for i in range(len(LAYERS)):  # every other layer: all units score exactly 1
        if i != 3:
            feats[i] = jnp.ones_like(feats[i])
    method = lm.redo(threshold=0.15, every=2)
    state = method.init(params)
    step = jax.jit(lambda p, b, o, s: method.after_step(MethodArgs(p, b, o, s, KEY, features=tuple(feats))))
    first = step(params, bs, opt, state)
    assert int(first.state) == 1 and np.asarray(first.metrics["redo_reset_units"]).sum() == 0
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(first.params),
                                                     jax.tree_util.tree_leaves(params), strict=True))
    second = step(first.params, first.batch_stats, first.opt_state, first.state)
    expected = [0] * 17
    expected[3] = 1
    assert np.asarray(second.metrics["redo_reset_units"]).tolist() == expected
    layer = LAYERS[3]
    blk, conv = layer.producer
    old_k, new_k = np.asarray(params[blk][conv]["kernel"]), np.asarray(second.params[blk][conv]["kernel"])
    assert not np.any(new_k[..., 0] == old_k[..., 0]) and np.array_equal(new_k[..., 1], old_k[..., 1])
    nxt = np.asarray(second.params[layer.next_layer[0]][layer.next_layer[1]]["kernel"])
    assert np.all(nxt[:, :, 0, :] == 0) and not np.any(nxt[:, :, 1, :] == 0)
    momentum = second.opt_state[1].trace
    assert np.all(np.asarray(momentum[blk][conv]["kernel"])[..., 0] == 0)
    assert np.all(np.asarray(momentum[blk][conv]["kernel"])[..., 1] == 1)
    assert np.all(np.asarray(momentum["stem_conv"]["kernel"]) == 1)
    kept = lm.redo(threshold=0.15, every=1, reset_momentum=False).after_step(
        MethodArgs(params, bs, opt, jnp.zeros((), jnp.int32), KEY, features=tuple(feats)))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(kept.opt_state),
                                                     jax.tree_util.tree_leaves(opt), strict=True))
    assert np.asarray(kept.metrics["redo_reset_units"]).sum() == 1  # the unit was recycled, its momentum kept


def test_redo_at_threshold_zero_recycles_only_silent_units():
    feats = [jnp.ones((2, 1, 1, layer.channels), jnp.float32) for layer in LAYERS[:-1]]
    feats.append(jnp.asarray([[0.0, 2.0] * (LAYERS[-1].channels // 2)] * 2, jnp.float32))
    scores = dormant_scores(tuple(feats))
    assert np.asarray(scores[-1]).tolist() == [0.0, 2.0] * (LAYERS[-1].channels // 2)
    params, bs = tiny_world()
    out = lm.redo(threshold=0.0, every=1).after_step(
        MethodArgs(params, bs, optimiser_state(params), jnp.zeros((), jnp.int32), KEY, features=tuple(feats)))
    assert np.asarray(out.metrics["redo_reset_units"]).tolist() == [0] * 16 + [LAYERS[-1].channels // 2]


# ---- L2 Init ------------------------------------------------------------------------------------


def test_l2_init_adds_lambda_times_the_squared_distance_to_the_initial_parameters():
    theta0 = {"a": jnp.asarray([0.0, 0.0]), "b": jnp.asarray([[1.0]])}
    theta = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([[3.0]])}
    method = lm.l2_init(strength=0.5)
    anchor = method.init(theta0)
    term = method.loss(MethodArgs(theta, None, None, anchor, KEY))
    assert float(term) == pytest.approx(0.5 * (1 + 4 + 4))
    grads = jax.grad(lambda p: method.loss(MethodArgs(p, None, None, anchor, KEY)))(theta)
    np.testing.assert_allclose(np.asarray(grads["a"]), [1.0, 2.0])  # 2λ(θ − θ₀)
    np.testing.assert_allclose(np.asarray(grads["b"]), [[2.0]])
    out = method.after_step(MethodArgs(theta, None, None, anchor, KEY))
    assert float(out.metrics["distance_from_init"]) == pytest.approx(3.0)
    assert anchor["a"] is not theta0["a"]  # a copy: the anchor does not follow the parameters


# ---- UPGD ---------------------------------------------------------------------------------------


def test_upgd_gates_the_update_by_the_scaled_utility():
    theta = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    g = {"w": jnp.asarray([0.5, 0.5, -1.0])}
    method = lm.upgd(noise_std=0.0, beta_utility=0.5)
    state = method.init(theta)
    out = method.update(MethodArgs(theta, None, None, state, KEY, grads=g, updates=g))
    u = 0.5 * 0 + 0.5 * (-np.array([0.5, 0.5, -1.0]) * np.array([1.0, -2.0, 0.5]))  # β u + (1 − β)(−g θ)
    u_hat = u / (1 - 0.5 ** 1)  # bias correction at step 1
    gate = 1 - 1 / (1 + np.exp(-u_hat / u_hat.max()))  # 1 − sigmoid(û / max û)
    np.testing.assert_allclose(np.asarray(out.updates["w"]), np.array([0.5, 0.5, -1.0]) * gate, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.state["utility"]["w"]), u, rtol=1e-6)
    assert int(out.state["step"]) == 1
    assert float(out.metrics["mean_gate"]) == pytest.approx(gate.mean(), rel=1e-6)
    # step 2: the average moves on and the correction uses β²
    again = method.update(MethodArgs(theta, None, None, out.state, KEY, grads=g, updates=g))
    u2 = 0.5 * u + 0.5 * (-np.array([0.5, 0.5, -1.0]) * np.array([1.0, -2.0, 0.5]))
    u2_hat = u2 / (1 - 0.5 ** 2)
    gate2 = 1 - 1 / (1 + np.exp(-u2_hat / u2_hat.max()))
    np.testing.assert_allclose(np.asarray(again.updates["w"]), np.array([0.5, 0.5, -1.0]) * gate2, rtol=1e-6)


def test_upgd_perturbs_weights_of_no_utility_with_half_the_noise():
    theta = {"w": jnp.zeros((20_000,))}
    zero = {"w": jnp.zeros((20_000,))}
    method = lm.upgd(noise_std=0.01, beta_utility=0.9)
    out = method.update(MethodArgs(theta, None, None, method.init(theta), KEY, grads=zero, updates=zero))
    d = np.asarray(out.updates["w"])  # utility 0 everywhere: gate 1 − sigmoid(0) = 1/2
    assert abs(d.std() / 0.005 - 1) < 0.03 and abs(d.mean()) < 2e-4


# ---- weight clipping ----------------------------------------------------------------------------


def test_weight_clipping_clips_kernels_to_a_multiple_of_their_initial_std():
    params = {"fc": {"kernel": jnp.asarray([[-5.0], [0.1], [5.0], [0.9]]), "bias": jnp.asarray([7.0])},
              "bn": {"scale": jnp.asarray([9.0])}}
    out = lm.weight_clipping(clip_factor=2.0).after_step(MethodArgs(params, None, None, None, KEY))
    # Linear kernel (in 4, out 1): initial std √(1/4) = 0.5, bound 2 · 0.5 = 1
    np.testing.assert_array_equal(np.asarray(out.params["fc"]["kernel"]).ravel(),
                                  np.asarray([-1.0, 0.1, 1.0, 0.9], np.float32))
    assert float(out.params["fc"]["bias"][0]) == 7.0 and float(out.params["bn"]["scale"][0]) == 9.0
    assert int(out.metrics["clipped_weights"]) == 2
    conv = {"k": {"kernel": jnp.full((3, 3, 2, 1), 1.0)}}  # fan_in 18: std √(2/18) = 1/3, bound 1/3 at factor 1
    clipped = lm.weight_clipping(clip_factor=1.0).after_step(MethodArgs(conv, None, None, None, KEY)).params
    np.testing.assert_allclose(np.asarray(clipped["k"]["kernel"]), 1 / 3, rtol=1e-6)


# ---- warm-start shrink and perturb --------------------------------------------------------------


def test_warm_start_shrink_perturb_mixes_the_network_with_a_fresh_one_at_boundaries():
    params, bs = tiny_world()
    method = lm.warm_start_shrink_perturb(shrink=0.4, perturb=0.1)
    assert method.after_step is None
    out = method.at_task_boundary(MethodArgs(params, bs, None, None, KEY))
    fresh = lm.reinitialise(params, KEY)
    for new, old, f in zip(*(jax.tree_util.tree_leaves(t) for t in (out.params, params, fresh)), strict=True):
        np.testing.assert_allclose(np.asarray(new), 0.4 * np.asarray(old) + 0.1 * np.asarray(f), rtol=1e-6)
    assert out.batch_stats is bs
    halved = lm.warm_start_shrink_perturb(shrink=0.5, perturb=0.0).at_task_boundary(
        MethodArgs(params, bs, None, None, KEY)).params
    np.testing.assert_array_equal(np.asarray(halved["fc"]["bias"]), np.asarray(params["fc"]["bias"]) * 0.5)


# ---- every method in a real run ------------------------------------------------------------------


# ReDo at threshold 1: a unit scores its activation over its layer's mean, so every layer has a unit at or
# below 1 and each recycling step resets at least one unit per layer, whatever the bits of the run
ALL_NEW = [{"name": "redo", "threshold": 1.0, "every": 3}, {"name": "l2_init", "strength": 1e-3},
           {"name": "upgd", "noise_std": 1e-3}, {"name": "weight_clipping", "clip_factor": 2.0},
           {"name": "warm_start_shrink_perturb", "shrink": 0.5, "perturb": 0.1}]


def test_the_new_methods_run_together_and_their_metrics_are_recorded(tmp_path):
    from lop_jax.config import load_config
    from lop_jax.experiment import run_experiments
    from lop_jax.results import ExperimentDir

    cfg = load_config(REPO_ROOT / "configs" / "smoke.json",
                      {"results_dir": str(tmp_path), "experiment_name": "all_new", "methods": ALL_NEW})
    run_experiments(cfg, [0], progress=False, log=lambda m: None)
    folder = ExperimentDir(tmp_path / "all_new")
    redo = folder.load_metric("redo_reset_units_per_epoch", 0)
    assert redo.shape == (cfg.num_epochs, 17) and redo.dtype == np.int64
    steps = np.cumsum([cfg.steps_per_epoch(e // cfg.epochs_per_task) for e in range(cfg.num_epochs)])
    recycled = np.diff(steps // 3, prepend=0) > 0  # the epochs holding a recycling step (every 3rd)
    assert recycled.any() and np.all(redo[recycled] > 0) and np.all(redo[~recycled] == 0), redo
    distance = folder.load_metric("distance_from_init_per_epoch", 0)
    assert distance.shape == (cfg.num_epochs,) and np.all(distance > 0)
    gate = folder.load_metric("mean_gate_per_epoch", 0)
    assert np.all((gate > 0) & (gate < 1))
    clipped = folder.load_metric("clipped_weights_per_epoch", 0)
    assert clipped.dtype == np.int64 and clipped.shape == (cfg.num_epochs,)
    accuracy = folder.load_metric("test_accuracy_per_epoch", 0)
    assert np.all(np.isfinite(accuracy)) and accuracy.max() > 0
    assert not folder.has_metric("replaced_units_per_epoch", 0)  # CBP is not among them
    assert math.isfinite(float(folder.load_metric("train_loss_per_checkpoint", 0)[-1]))



# ---- CReLU --------------------------------------------------------------------------------------


def test_crelu_concatenates_the_two_halves_of_the_relu():
    from lop_jax.model import crelu

    x = jnp.asarray([[1.5, -2.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(crelu(x)), [[1.5, 0.0, 0.0, 0.0, 2.0, 0.0]])
    z = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
    c = crelu(z)
    np.testing.assert_array_equal(np.asarray(c[:, :3] - c[:, 3:]), np.asarray(z))  # the identity shortcut's inverse


def test_a_crelu_network_keeps_every_feature_width_with_half_the_producing_channels():
    from lop_jax.model import ResNet18, feature_layers

    x = jnp.zeros((2, 32, 32, 3))
    relu_vars = jax.eval_shape(lambda: ResNet18(4).init(KEY, x, train=False))
    crelu_net = ResNet18(4, activation="crelu")
    crelu_vars = crelu_net.init(KEY, x, train=False)
    assert crelu_vars["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 2)
    assert relu_vars["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 4)
    assert crelu_vars["params"]["block1"]["conv1"]["kernel"].shape == (3, 3, 4, 2)  # reads 4 CReLU channels
    assert crelu_vars["params"]["fc"]["kernel"].shape == (32, 100)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
    logits, feats = crelu_net.apply(crelu_vars, images, train=False, return_features=True)
    assert [f.shape[-1] for f in feats] == [layer.channels for layer in feature_layers(4)]
    assert logits.shape == (2, 100) and bool(jnp.all(jnp.isfinite(logits)))
    stem = np.asarray(feats[0])  # of each CReLU pair at most one unit is active
    assert not np.any((stem[..., :2] > 0) & (stem[..., 2:] > 0)) and np.any(stem > 0)


def test_crelu_is_a_config_option_refused_with_unit_resets():
    from lop_jax.config import ConfigError, make_config

    assert make_config({"activation": "crelu", "network_width": 8}).activation == "crelu"
    with pytest.raises(ConfigError, match="config key 'activation': 'crelu' cannot run with continual_backprop"):
        make_config({"activation": "crelu", "use_cbp": True, "replacement_rate": 1e-5, "maturity_threshold": 10})
    with pytest.raises(ConfigError, match="cannot run with redo"):
        make_config({"activation": "crelu", "methods": [{"name": "redo"}]})
    with pytest.raises(ConfigError, match="config key 'network_width': must be even"):
        make_config({"activation": "crelu", "network_width": 5})
    with pytest.raises(ConfigError, match="config key 'activation'"):
        make_config({"activation": "gelu"})


def test_a_crelu_run_trains_and_is_analysed(tmp_path):
    from lop_jax.analysis import analyze_experiment
    from lop_jax.config import load_config
    from lop_jax.experiment import run_experiments
    from lop_jax.results import ExperimentDir

    cfg = load_config(REPO_ROOT / "configs" / "smoke.json",
                      {"results_dir": str(tmp_path), "experiment_name": "crelu", "activation": "crelu"})
    run_experiments(cfg, [0], progress=False, log=lambda m: None)
    analyze_experiment(tmp_path / "crelu", progress=False, log=lambda m: None)
    folder = ExperimentDir(tmp_path / "crelu")
    assert folder.load_metric("test_accuracy_per_epoch", 0).max() > 0
    rank = folder.load_metric("next_task_stable_rank_analysis", 0)
    assert np.all(rank > 0)


# ---- each method's configs ------------------------------------------------------------------------


METHOD_CONFIGS = sorted((REPO_ROOT / "configs" / "methods").glob("*.json"))


def test_every_method_module_has_its_configs():
    names = {p.stem for p in METHOD_CONFIGS}
    assert names == {"redo", "l2_init", "upgd", "weight_clipping", "warm_start_shrink_perturb", "crelu"}
    assert {p.stem for p in (REPO_ROOT / "configs" / "scaled" / "methods").glob("*.json")} == names


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_a_methods_laptop_config_is_its_paper_config_scaled_by_the_rule(path):
    from lop_jax.config import load_config
    from lop_jax.scaling import scaled_method_spec, scaled_step_values, step_ratio

    paper = load_config(path)
    scaled = load_config(REPO_ROOT / "configs" / "scaled" / "methods" / path.name)
    base = load_config(REPO_ROOT / "configs" / "scaled" / "base_deep_learning_system.json")
    assert paper.experiment_name == scaled.experiment_name == path.stem
    assert paper.method_specs() or paper.activation != "relu"  # the config does run the method
    ratio = step_ratio(scaled, paper)
    assert ratio == pytest.approx(0.24)
    assert scaled.weight_decay == pytest.approx(scaled_step_values(paper, ratio)["weight_decay"], rel=0.01, abs=0)
    for got, spec in zip(scaled.method_specs(), paper.method_specs(), strict=True):
        want = scaled_method_spec(spec, ratio)
        assert got.keys() == want.keys()
        for option, value in want.items():
            assert got[option] == (value if not isinstance(value, float) else pytest.approx(value, rel=0.01)), option
    sizes = ("num_tasks", "epochs_per_task", "train_images_per_class", "network_width", "train_batch_size")
    assert all(getattr(scaled, k) == getattr(base, k) for k in sizes)
    assert scaled.activation == paper.activation
    for cfg in (paper, scaled):
        keys = [k for k in ("methods", "activation", "weight_decay") if f"_why_{k}_" in cfg._comments]
        assert keys and all(len(cfg._comments[f"_why_{k}_"]) > 20 for k in keys)


def test_the_scaling_rule_for_method_options_by_hand():
    from lop_jax.scaling import scaled_method_spec

    assert scaled_method_spec({"name": "redo", "threshold": 0.1, "every": 1000}, 0.25) == \
        {"name": "redo", "threshold": 0.1, "every": 250}
    assert scaled_method_spec({"name": "l2_init", "strength": 1e-3}, 0.25)["strength"] == pytest.approx(4e-3)
    upgd = scaled_method_spec({"name": "upgd", "noise_std": 1e-3, "beta_utility": 0.999}, 0.25)
    assert upgd["noise_std"] == pytest.approx(2e-3) and upgd["beta_utility"] == pytest.approx(0.996)
    assert scaled_method_spec({"name": "weight_clipping", "clip_factor": 2.0}, 0.25) == \
        {"name": "weight_clipping", "clip_factor": 2.0}
    with pytest.raises(ValueError, match="cannot be scaled"):
        scaled_method_spec({"name": "upgd", "beta_utility": 0.5}, 0.25)
