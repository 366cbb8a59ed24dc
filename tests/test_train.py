"""Train state and steps (semantics §1, §4, §5): masked loss, SGD semantics, the epoch, evaluation, early stopping.

Every compiled function maps over stacked runs; the tests call them as a run does, with its run on the run
axis (a stack of one).
"""

import dataclasses
import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lop_jax.config import make_config
from lop_jax.cpu_kernels import EIGEN_YNN_FUSIONS, compiler_options
from lop_jax.run_axis import stack_states, unstack_state
from lop_jax.train import (
    TrainState,
    active_mask,
    class_order_for,
    end_task,
    init_state,
    make_evaluate,
    make_model,
    make_optimizer,
    make_step_of_runs,
    make_train_epoch,
    masked_loss_and_accuracy,
    resolve_epoch_mode,
    task_data,
    update_best,
)

CFG = make_config({"num_tasks": 2, "classes_per_task": 2, "epochs_per_task": 1, "train_images_per_class": 4,
                   "val_images_per_class": 2, "test_images_per_class": 3, "network_width": 2,
                   "train_batch_size": 8, "test_batch_size": 4, "val_batch_size": 4, "weight_decay": 0.01,
                   "data_source": "embedded"})
K = 10  # classes in the tiny synthetic data set


def _tree_equal(a, b):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def _one(tree):
    """The only run of a stack of one."""
    return unstack_state(tree, 0)


# ---------------------------------------------------------------------------------------------
# masked head


def _reference_loss(logits, labels, active):
    """Cross-entropy and accuracy over the gathered active logits, in float64."""
    g = np.asarray(logits, np.float64)[:, active]
    logp = g - g.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    pos = np.array([list(active).index(y) for y in labels])
    losses = -logp[np.arange(len(labels)), pos]
    correct = np.array(active)[g.argmax(1)] == labels
    return losses, correct.astype(np.float64)


def test_masked_loss_equals_cross_entropy_over_gathered_active_logits():
    rng = np.random.default_rng(0)
    order = rng.permutation(100)
    active = order[:7]
    mask = np.asarray(active_mask(jnp.asarray(order), 7))
    assert mask.dtype == np.bool_ and mask.sum() == 7 and set(np.flatnonzero(mask)) == set(active)
    logits = rng.normal(size=(6, 100)).astype(np.float32) * 3
    logits[:, order[50]] = 50.0  # an inactive class wins every unmasked argmax
    labels = active[rng.integers(0, 7, 6)]
    logits[0, labels[0]] = 40.0  # a sure hit, so accuracy is not trivially 0
    loss, acc = masked_loss_and_accuracy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    losses, correct = _reference_loss(logits, labels, active)
    assert float(loss) == pytest.approx(losses.mean(), rel=1e-5)
    assert float(acc) == pytest.approx(correct.mean(), abs=1e-7)
    assert 0 < correct.mean() < 1
    # weighted rows (a padded last evaluation batch): the weighted mean over the real rows
    w = np.array([1, 1, 0, 1, 0, 1], np.float32)
    loss_w, acc_w = masked_loss_and_accuracy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                                             jnp.asarray(w))
    assert float(loss_w) == pytest.approx((losses * w).sum() / w.sum(), rel=1e-5)
    assert float(acc_w) == pytest.approx((correct * w).sum() / w.sum(), abs=1e-7)
    # gradients are finite, zero on the inactive logits
    grad = np.asarray(jax.grad(lambda z: masked_loss_and_accuracy(z, jnp.asarray(labels), jnp.asarray(mask))[0])(
        jnp.asarray(logits)))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[:, ~mask], 0.0)
    assert np.all(np.abs(grad[:, mask]).sum(1) > 0)


def test_class_order():
    a = np.asarray(class_order_for(0, 100))
    assert sorted(a.tolist()) == list(range(100))
    np.testing.assert_array_equal(a, np.asarray(class_order_for(0, 100)))
    assert not np.array_equal(a, np.asarray(class_order_for(1, 100)))
    assert sorted(np.asarray(class_order_for(3, 20)).tolist()) == list(range(20))


# ---------------------------------------------------------------------------------------------
# SGD as in semantics §4, on a tiny tree


def test_sgd_update_matches_pytorch_formula():
    cfg = make_config({"weight_decay": 0.01, "momentum": 0.9})
    tx = make_optimizer(cfg)
    rng = np.random.default_rng(1)
    # leaf names of a BN layer and a bias: weight decay applies to every leaf (semantics §4)
    w0 = {"conv": {"kernel": rng.normal(size=(2, 3)), "bias": rng.normal(size=3)},
          "bn": {"scale": 1 + rng.normal(size=3), "bias": rng.normal(size=3)}}
    w0 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), w0)
    grads = [jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), w0) for _ in range(3)]
    lrs = [0.1, 0.02, 0.004]

    params, opt_state = jax.tree_util.tree_map(jnp.asarray, w0), tx.init(w0)
    w = jax.tree_util.tree_map(lambda x: x.astype(np.float64), w0)
    buf = jax.tree_util.tree_map(np.zeros_like, w)
    for g, lr in zip(grads, lrs, strict=True):
        updates, opt_state = tx.update(g, opt_state, params)
        params = jax.tree_util.tree_map(lambda p, u, lr=lr: p - lr * u, params, updates)  # as the train step does
        # PyTorch: g ← g + wd·w; buf ← m·buf + g; w ← w − lr·buf
        g2 = jax.tree_util.tree_map(lambda gi, wi: gi + 0.01 * wi, g, w)
        buf = jax.tree_util.tree_map(lambda b, gi: 0.9 * b + gi, buf, g2)
        w = jax.tree_util.tree_map(lambda wi, b, lr=lr: wi - lr * b, w, buf)
        for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(w), strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # the momentum buffer lives in the optimiser state (never reset, checkpointable)
    assert any(_tree_equal_close(leaf, buf) for leaf in _subtrees(opt_state))


def _subtrees(opt_state):
    leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, dict))
    return [s for s in leaves if isinstance(s, dict)]


def _tree_equal_close(a, b):
    try:
        return all(np.allclose(np.asarray(x), y, rtol=1e-5, atol=1e-6) for x, y in
                   zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
    except (ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------
# the compiled epoch and evaluation on a tiny network and a tiny synthetic data set


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (K, 4, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (K, 3, 32, 32, 3), dtype=np.uint8)
    order = jnp.asarray(rng.permutation(K))
    state = stack_states([init_state(CFG, 0)])
    data = task_data(jnp.asarray(train), order[None], 2)
    epoch_fn = make_train_epoch(CFG)
    after, losses, accs, replaced = epoch_fn(state, data, jnp.float32(0.05), jnp.int32(0), n_active=2)
    return {"train": train, "test": test, "order": order, "state": state, "data": data, "epoch_fn": epoch_fn,
            "after": after, "losses": np.asarray(losses)[0], "accs": np.asarray(accs)[0], "replaced": replaced}


def _momentum(opt_state, params):
    """The optimiser's momentum buffer: the subtree shaped like the parameters that is not them."""
    structure = jax.tree_util.tree_structure(params)
    for s in _subtrees(opt_state):
        if jax.tree_util.tree_structure(s) == structure:
            return s
    raise AssertionError("no momentum buffer in the optimiser state")


def test_epoch_applies_sgd_step_with_the_given_lr(tiny):
    s0, s1 = _one(tiny["state"]), _one(tiny["after"])
    assert tiny["losses"].shape == (1,) and tiny["accs"].shape == (1,)  # 2 classes × 4 images / batch 8
    assert np.isfinite(tiny["losses"]).all() and 0 <= tiny["accs"][0] <= 1
    buf = _momentum(s1.opt_state, s1.params)
    # one step from a zero buffer: buf = g + wd·w0 and w1 = w0 − lr·buf, on every leaf (BN and biases too)
    for w0, w1, b in zip(jax.tree_util.tree_leaves(s0.params), jax.tree_util.tree_leaves(s1.params),
                         jax.tree_util.tree_leaves(buf), strict=True):
        np.testing.assert_allclose(np.asarray(w1), np.asarray(w0) - 0.05 * np.asarray(b), rtol=1e-5, atol=1e-7)
    # the head's bias gradient (its w0 is 0, so buf = g) is zero for inactive classes, sums to 0 over active ones
    g_bias = np.asarray(buf["fc"]["bias"])
    active = np.asarray(tiny["order"])[:2]
    inactive = np.setdiff1d(np.arange(100), active)
    np.testing.assert_array_equal(g_bias[inactive], 0.0)
    assert np.all(g_bias[active] != 0) and abs(g_bias[active].sum()) < 1e-6
    # training mode updated the BatchNorm running statistics; the copy slots are untouched
    assert not _tree_equal(s0.batch_stats, s1.batch_stats)
    assert _tree_equal(s1.best_params, s0.best_params)


def test_epoch_is_deterministic_and_depends_on_epoch_lr_and_order(tiny):
    fn, s0, data = tiny["epoch_fn"], tiny["state"], tiny["data"]
    again = fn(s0, data, jnp.float32(0.05), jnp.int32(0), n_active=2)
    assert _tree_equal(again[0].params, tiny["after"].params)
    np.testing.assert_array_equal(np.asarray(again[1])[0], tiny["losses"])
    other_epoch = fn(s0, data, jnp.float32(0.05), jnp.int32(1), n_active=2)
    assert not _tree_equal(other_epoch[0].params, tiny["after"].params)  # reshuffle and new augmentation
    other_lr = fn(s0, data, jnp.float32(0.02), jnp.int32(0), n_active=2)
    assert not _tree_equal(other_lr[0].params, tiny["after"].params)
    other_order = task_data(data.images, jnp.roll(tiny["order"], 3)[None], 2)
    other_order = fn(s0, other_order, jnp.float32(0.05), jnp.int32(0), n_active=2)
    assert not _tree_equal(other_order[0].params, tiny["after"].params)


def _network_programs_compiled(caplog):
    """Compilations of programs that take the network's parameters (the stem kernel of one run at width 2)."""
    return [r.getMessage()[:120] for r in caplog.records
            if "Compiling" in r.getMessage() and "float32[1,3,3,3,2]" in r.getMessage()]


def test_new_lr_epoch_order_and_task_do_not_recompile_the_step(tiny, caplog):
    fn, s0, images = tiny["epoch_fn"], tiny["state"], tiny["data"].images
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        jax.jit(lambda p: p["stem_conv"]["kernel"] * 2)(s0.params)  # a fresh program: the capture works
        assert len(_network_programs_compiled(caplog)) == 1
        caplog.clear()
        fn(s0, task_data(images, jnp.roll(tiny["order"], 1)[None], 2), jnp.float32(0.004), jnp.int32(7), n_active=2)
        assert _network_programs_compiled(caplog) == []
        if resolve_epoch_mode(CFG.epoch_mode) == "loop":
            # the active classes are a mask (data): a new task changes no compiled step on the CPU
            out = fn(s0, task_data(images, tiny["order"][None], 4), jnp.float32(0.1), jnp.int32(1), n_active=4)
            assert out[1].shape == (1, 2)  # 4 classes × 4 images / batch 8
            assert _network_programs_compiled(caplog) == []


def test_scan_and_loop_epochs_agree(tiny):
    # accelerators run the epoch as one lax.scan, the CPU as a loop of jitted steps: same keys, same result
    modes = {resolve_epoch_mode(CFG.epoch_mode)}
    other = ({"scan", "loop"} - modes).pop()
    cfg = dataclasses.replace(CFG, epoch_mode=other)
    s1, losses, accs, _ = make_train_epoch(cfg)(tiny["state"], tiny["data"], jnp.float32(0.05), jnp.int32(0),
                                                 n_active=2)
    np.testing.assert_allclose(np.asarray(losses)[0], tiny["losses"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(accs)[0], tiny["accs"])
    for x, y in zip(jax.tree_util.tree_leaves((s1.params, s1.batch_stats)),
                    jax.tree_util.tree_leaves((tiny["after"].params, tiny["after"].batch_stats)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    s = tiny["after"]
    args = (s.params, s.batch_stats, tiny["data"]._replace(images=jnp.asarray(tiny["test"])),
            jax.random.PRNGKey(9)[None])
    for augment_images in (False, True):
        a = make_evaluate(cfg, 4, augment_images)(*args, n_active=2)
        b = make_evaluate(CFG, 4, augment_images)(*args, n_active=2)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


def _library_convolutions(compiled_text):
    """How many of a compiled program's YNNPACK fusions compute a convolution."""
    bodies = compiled_text.split("\n\n")
    ynn_convs = {b.split(" ", 1)[0].lstrip("%") for b in bodies if " convolution(" in b and b.startswith("%")}
    return sum(1 for line in compiled_text.splitlines()
               if '"__ynn_fusion"' in line and any(f"calls=%{name}," in line for name in ynn_convs))


def test_eigen_cpu_kernels_train_like_the_default_and_leave_convolutions_to_eigen(tiny):
    """``cpu_kernels: "eigen"``: the same epoch within float32 rounding, deterministic, and no
    convolution in XLA's YNNPACK fusions (the default keeps them there)."""
    cfg = dataclasses.replace(CFG, cpu_kernels="eigen")
    args = (tiny["state"], tiny["data"], jnp.float32(0.05), jnp.int32(0))
    epoch = make_train_epoch(cfg)
    s1, losses, accs, _ = epoch(*args, n_active=2)
    s2, losses2, _, _ = epoch(*args, n_active=2)
    assert _tree_equal((s1.params, s1.batch_stats), (s2.params, s2.batch_stats))
    np.testing.assert_array_equal(np.asarray(losses), np.asarray(losses2))
    np.testing.assert_allclose(np.asarray(losses)[0], tiny["losses"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(accs)[0], tiny["accs"])
    for x, y in zip(jax.tree_util.tree_leaves((s1.params, s1.batch_stats)),
                    jax.tree_util.tree_leaves((tiny["after"].params, tiny["after"].batch_stats)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    # at width 2 XLA keeps every convolution out of YNNPACK anyway: compile a width-8 step
    wide = dataclasses.replace(CFG, network_width=8)
    step_args = (stack_states([init_state(wide, 0)]), tiny["data"], jnp.zeros((1, 8), jnp.int32), jnp.int32(0),
                 jnp.int32(0), jnp.float32(0.05))
    texts = {name: make_step_of_runs(c).lower(*step_args).compile().as_text()
             for name, c in (("default", wide), ("eigen", dataclasses.replace(wide, cpu_kernels="eigen")))}
    assert _library_convolutions(texts["eigen"]) == 0
    assert _library_convolutions(texts["default"]) > 0  # else this test no longer tells the two apart
    assert compiler_options(CFG) is None
    assert compiler_options(cfg) == {"xla_cpu_experimental_ynn_fusion_type": EIGEN_YNN_FUSIONS}


def test_epoch_with_buffer_donation_runs_from_a_fresh_state(monkeypatch, tiny):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the donating variant, as built on an accelerator
    fn = make_train_epoch(dataclasses.replace(CFG, epoch_mode="loop"))
    monkeypatch.undo()
    out = fn(stack_states([init_state(CFG, 0)]), tiny["data"], jnp.float32(0.05), jnp.int32(0), n_active=2)
    assert _tree_equal(out[0].params, tiny["after"].params)


@pytest.fixture(scope="module")
def evaluation(tiny):
    s = tiny["after"]
    clean = make_evaluate(CFG, 4, False)
    noisy = make_evaluate(CFG, 4, True)
    key, other = jax.random.PRNGKey(9)[None], jax.random.PRNGKey(1)[None]
    args = (s.params, s.batch_stats, tiny["data"]._replace(images=jnp.asarray(tiny["test"])))

    def one_run(out):
        return tuple(float(v[0]) for v in out)

    return {"clean": one_run(clean(*args, key, n_active=2)),
            "clean_other_key": one_run(clean(*args, other, n_active=2)),
            "noisy": one_run(noisy(*args, key, n_active=2)), "noisy_again": one_run(noisy(*args, key, n_active=2)),
            "noisy_other_key": one_run(noisy(*args, other, n_active=2))}


def test_clean_evaluation_is_per_batch_mean_in_eval_mode(tiny, evaluation):
    s = _one(tiny["after"])
    order = np.asarray(tiny["order"])
    # the active classes' test images, class-order major: 2 classes × 3 = 6 images, batches of 4 and 2
    x = np.concatenate([tiny["test"][c] for c in order[:2]])
    y = np.repeat(order[:2], 3)
    xn = ((x / 255.0 - np.array([0.5071, 0.4865, 0.4409])) / np.array([0.2673, 0.2564, 0.2762])).astype(np.float32)
    logits = make_model(CFG).apply({"params": s.params, "batch_stats": s.batch_stats}, xn, train=False)
    losses, correct = _reference_loss(np.asarray(logits), y, list(order[:2]))
    loss, acc = evaluation["clean"]
    # the reference averages per-batch means (a short last batch weighs like a full one)
    assert loss == pytest.approx((losses[:4].mean() + losses[4:].mean()) / 2, rel=1e-4)
    assert acc == pytest.approx((correct[:4].mean() + correct[4:].mean()) / 2, abs=1e-6)
    assert tuple(evaluation["clean"]) == tuple(evaluation["clean_other_key"])  # no randomness without augmentation


def test_test_time_augmentation_quirk_is_keyed(evaluation):
    assert tuple(evaluation["noisy"]) == tuple(evaluation["noisy_again"])
    assert float(evaluation["noisy"][0]) != float(evaluation["clean"][0])
    assert float(evaluation["noisy"][0]) != float(evaluation["noisy_other_key"][0])


# ---------------------------------------------------------------------------------------------
# early stopping (semantics §5) on a hand-made state


def _update_best_alone(state, val_acc):
    """``update_best`` of one run: the run as a stack of one, then back."""
    return _one(update_best(stack_states([state]), jnp.asarray([val_acc], jnp.float32)))


def _end_task_alone(state, restore):
    return _one(end_task(stack_states([state]), restore=restore))


def _state(seed):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    params = {"conv": {"kernel": arr(3, 3, 1, 2)}, "bn": {"scale": arr(2), "bias": arr(2)}}
    stats = {"bn": {"mean": arr(2), "var": arr(2)}}
    return params, stats, {"momentum": {"conv": {"kernel": arr(3, 3, 1, 2)}}, "count": arr(1)}


def _swap_network(state, seed):
    params, stats, _ = _state(seed)
    return state.replace(params=params, batch_stats=stats)


def test_update_best_keeps_strictly_best_and_end_task_restores_network_only():
    params, stats, opt = _state(0)
    s = TrainState(params=params, batch_stats=stats, opt_state=opt, algo_state={"age": jnp.zeros(2)},
                   best_params=params, best_batch_stats=stats, best_acc=jnp.zeros((), jnp.float32),
                   has_best=jnp.zeros((), jnp.bool_), key=jax.random.PRNGKey(0))
    s = _update_best_alone(s, jnp.float32(0.5))  # epoch 1: best so far
    best_p, best_s = s.params, s.batch_stats
    assert bool(s.has_best) and float(s.best_acc) == 0.5
    s = _update_best_alone(_swap_network(s, 1), jnp.float32(0.5))  # equal: does not replace
    assert _tree_equal(s.best_params, best_p) and _tree_equal(s.best_batch_stats, best_s)
    s = _update_best_alone(_swap_network(s, 2), jnp.float32(0.25))  # worse: does not replace
    assert _tree_equal(s.best_params, best_p) and float(s.best_acc) == 0.5
    s = _swap_network(s, 3)
    best_p, best_s = s.params, s.batch_stats
    s = _update_best_alone(s, jnp.float32(0.75))  # strictly better: replaces, parameters AND statistics
    assert _tree_equal(s.best_params, best_p) and _tree_equal(s.best_batch_stats, best_s)
    assert float(s.best_acc) == 0.75

    # the last epoch of the task moved the network and the optimiser on
    last_p, last_s, last_opt = _state(4)
    s = s.replace(params=last_p, batch_stats=last_s, opt_state=last_opt, algo_state={"age": jnp.ones(2)})
    restored = _end_task_alone(s, restore=True)
    assert _tree_equal(restored.params, best_p) and _tree_equal(restored.batch_stats, best_s)
    assert _tree_equal(restored.opt_state, last_opt)  # the optimiser state is NOT restored
    assert _tree_equal(restored.algo_state, {"age": jnp.ones(2)})
    assert float(restored.best_acc) == 0 and not bool(restored.has_best)  # the copy is cleared

    kept = _end_task_alone(s, restore=False)
    assert _tree_equal(kept.params, last_p) and _tree_equal(kept.batch_stats, last_s)
    assert not bool(kept.has_best)

    # next task: the first validation accuracy is a new best even if lower than the last task's best
    nxt = _update_best_alone(_swap_network(restored, 5), jnp.float32(0.1))
    assert _tree_equal(nxt.best_params, nxt.params) and float(nxt.best_acc) == pytest.approx(0.1)


def test_end_task_without_any_improvement_keeps_the_network():
    params, stats, opt = _state(0)
    s = TrainState(params=params, batch_stats=stats, opt_state=opt, algo_state=None,
                   best_params=params, best_batch_stats=stats, best_acc=jnp.zeros((), jnp.float32),
                   has_best=jnp.zeros((), jnp.bool_), key=jax.random.PRNGKey(0))
    s = _update_best_alone(_swap_network(s, 1), jnp.float32(0.0))  # never above 0
    cur = s.params
    out = _end_task_alone(s, restore=True)
    assert _tree_equal(out.params, cur)


def test_init_state_is_a_pytree_with_the_run_key(tiny):
    s = _one(tiny["state"])
    leaves = jax.tree_util.tree_leaves(s)
    assert all(isinstance(x, jax.Array) for x in leaves)
    np.testing.assert_array_equal(np.asarray(s.key), np.asarray(jax.random.PRNGKey(0)))
    assert _tree_equal(s.best_params, s.params) and not bool(s.has_best)
    flat = flax.traverse_util.flatten_dict(s.params)
    assert flat[("fc", "kernel")].shape == (16, 100)
    assert _tree_equal(jax.tree_util.tree_map(jnp.zeros_like, _momentum(s.opt_state, s.params)),
                       _momentum(s.opt_state, s.params))
