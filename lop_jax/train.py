"""Train state and the pure, jitted epoch and evaluation functions (semantics §1, §4, §5).

Written for one run, mapped once over runs: every function is defined for a single run and
compiled as ``jit(vmap(...))`` over runs stacked along a leading axis (``lop_jax.run_axis``); a
single run is a stack of one, so there is one path. A task's data travels as a ``TaskData``
(the images, shared by the runs; each run's class order and active-class mask), and the mapping
names its fields (``RUN_AXES``), not positions.

The train step is one pure function: the images live on the device, the shuffle and the
augmentation run there from JAX keys, and the optimiser step and the plasticity methods' hooks
(``lop_jax.methods``: a loss term, an update rule, a per-step hook) are fused into it. An epoch
is either one compiled ``lax.scan`` over the steps (accelerators) or a loop of the jitted step
(CPU), with the same keys and results. The head
always has 100 logits and the active classes are a boolean mask, so a new task changes data,
not code.

Randomness: every draw comes from the run's root key ``PRNGKey(index)`` folded with a stream
id, the epoch and the step, never from global state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lop_jax import methods as plasticity
from lop_jax.augment import augment, normalize
from lop_jax.config import Config
from lop_jax.cpu_kernels import compiler_options, uses_eigen
from lop_jax.methods.registry import factory as method_factory
from lop_jax.model import NUM_OUTPUTS, ResNet18, init_model

STREAM_CLASS_ORDER, STREAM_INIT, STREAM_TRAIN, STREAM_EVAL, STREAM_TASK = 0, 1, 2, 3, 4
NUM_FEATURE_LAYERS = 17


@flax.struct.dataclass
class TrainState:
    """Everything that changes during a run, as one pytree (checkpointable, vmappable)."""

    params: Any
    batch_stats: Any
    opt_state: Any
    algo_state: Any
    best_params: Any
    best_batch_stats: Any
    best_acc: jax.Array  # best validation accuracy within the current task
    has_best: jax.Array  # whether best_* hold a copy for the current task
    key: jax.Array  # the run's root key (raw uint32[2])


def make_model(cfg: Config, conv_grad: str = "auto") -> ResNet18:
    """The config's ResNet-18. ``conv_grad`` (``lop_jax.conv``) is only set to analyse on the CPU
    the program an accelerator compiles (``"xla"``); runs keep ``"auto"``, which under
    the ``eigen`` CPU kernels (``lop_jax.cpu_kernels``) is the ``eigen`` mode."""
    if conv_grad == "auto" and uses_eigen(cfg):
        conv_grad = "eigen"
    dtype = jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32
    return ResNet18(width=cfg.network_width, num_outputs=NUM_OUTPUTS, dtype=dtype, activation=cfg.activation,
                    conv_grad=conv_grad)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """PyTorch SGD semantics (semantics §4): g ← g + wd·w; buf ← m·buf + g. The caller applies −lr·buf."""
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.trace(decay=cfg.momentum))


def run_key(index: int) -> jax.Array:
    return jax.random.PRNGKey(index)


def class_order_for(index: int, num_available: int) -> jax.Array:
    """The run's permutation of the available classes (semantics §1), drawn from its seed."""
    return jax.random.permutation(jax.random.fold_in(run_key(index), STREAM_CLASS_ORDER), num_available)


def init_state(cfg: Config, index: int) -> TrainState:
    """Initial network, optimiser and algorithm state of run ``index``."""
    key = run_key(index)
    params, batch_stats = init_model(make_model(cfg), jax.random.fold_in(key, STREAM_INIT))
    opt_state = make_optimizer(cfg).init(params)
    return TrainState(
        params=params, batch_stats=batch_stats, opt_state=opt_state,
        algo_state=plasticity.from_config(cfg).init(params),
        best_params=jax.tree_util.tree_map(jnp.copy, params),
        best_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats),
        best_acc=jnp.zeros((), jnp.float32), has_best=jnp.zeros((), jnp.bool_), key=key)


def active_mask(class_order: jax.Array, n_active: int) -> jax.Array:
    """Boolean [100] mask of the first ``n_active`` classes of the order."""
    return jnp.zeros((NUM_OUTPUTS,), jnp.bool_).at[class_order[:n_active]].set(True)


def masked_loss_and_accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                             weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and accuracy over the active logits only (mean over the weighted rows)."""
    masked = jnp.where(mask, logits, -jnp.inf)
    losses = optax.softmax_cross_entropy_with_integer_labels(masked, labels)
    correct = (jnp.argmax(masked, axis=-1) == labels).astype(jnp.float32)
    if weights is None:
        return jnp.mean(losses), jnp.mean(correct)
    total = jnp.sum(weights)
    return jnp.sum(losses * weights) / total, jnp.sum(correct * weights) / total


def _gather(images: jax.Array, class_order: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images and labels for flat indices into the active classes' images (class-order major)."""
    per_class = images.shape[1]
    labels = class_order[idx // per_class]
    return images[labels, idx % per_class], labels


class TaskData(NamedTuple):
    """What an epoch or an evaluation of one run reads during a task."""

    images: jax.Array  # [K, n, 32, 32, 3] uint8: every class's images, shared by the runs
    class_order: jax.Array  # [K]: the run's class order
    mask: jax.Array  # [100] bool: the task's active classes (the first ones of the order)


# how stacked runs hold a TaskData: one copy of the images, a class order and a mask per run
RUN_AXES = TaskData(images=None, class_order=0, mask=0)


@partial(jax.jit, static_argnames=("n_active",))
def active_masks(class_orders: jax.Array, n_active: int) -> jax.Array:
    """Every run's mask of its first ``n_active`` classes, [S, 100] (one small program per task)."""
    return jax.vmap(lambda order: active_mask(order, n_active))(class_orders)


def task_data(images: jax.Array, class_orders: jax.Array, n_active: int) -> TaskData:
    """The TaskData of stacked runs (class orders [S, K]) during a task of ``n_active`` classes."""
    return TaskData(images, class_orders, active_masks(class_orders, n_active))


def make_train_step(cfg: Config, method: plasticity.PlasticityMethod | None = None,
                    conv_grad: str = "auto") -> Callable:
    """The pure train step of one run: ``(state, data, idx, key, lr) → (state, loss, accuracy,
    metrics)``: gather the batch ``idx`` of ``data``, augment it, take the SGD step (semantics §4)
    with the plasticity methods' loss term and update rule, then their per-step hook. ``metrics``
    holds the methods' per-step metrics. ``method`` defaults to the config's
    (``lop_jax.methods.from_config``); ``conv_grad`` as in ``make_model``."""
    model = make_model(cfg, conv_grad)
    tx = make_optimizer(cfg)
    method = plasticity.from_config(cfg) if method is None else method
    use_features = method.uses_features

    def loss_fn(params, batch_stats, algo_state, key, x, labels, mask):
        (logits, feats), new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True,
            return_features=True, mutable=["batch_stats"])
        loss, acc = masked_loss_and_accuracy(logits, labels, mask)
        objective = loss
        if method.loss is not None:
            objective = loss + method.loss(plasticity.MethodArgs(params, batch_stats, None, algo_state, key))
        return objective, (loss, acc, tuple(feats) if use_features else None, new_vars["batch_stats"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(st: TrainState, data: TaskData, idx, key, lr):
        k_aug, k_algo = jax.random.split(key)
        raw, labels = _gather(data.images, data.class_order, idx)
        x = augment(k_aug, normalize(raw))
        (_, (loss, acc, feats, new_bs)), grads = grad_fn(st.params, st.batch_stats, st.algo_state, k_algo, x,
                                                          labels, data.mask)
        updates, opt_state = tx.update(grads, st.opt_state, st.params)
        algo_state, metrics = st.algo_state, {}
        if method.update is not None:
            out = method.update(plasticity.MethodArgs(st.params, new_bs, opt_state, algo_state, k_algo,
                                                      grads=grads, updates=updates))
            updates, algo_state, metrics = out.updates, out.state, dict(out.metrics)
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u, st.params, updates)
        if method.after_step is not None:
            out = method.after_step(plasticity.MethodArgs(params, new_bs, opt_state, algo_state, k_algo,
                                                          features=feats))
            params, new_bs, opt_state, algo_state = out.params, out.batch_stats, out.opt_state, out.state
            metrics.update(out.metrics)
        plasticity.check_metrics(metrics, method.metrics, method.name, "per-step")
        st = st.replace(params=params, batch_stats=new_bs, opt_state=opt_state, algo_state=algo_state)
        return st, loss, acc, metrics

    return train_step


def reduce_metrics(method: plasticity.PlasticityMethod, per_step: dict[str, jax.Array], axis: int) -> dict:
    """An epoch's per-step metrics (steps along ``axis``) reduced as each metric declares."""
    out = {}
    for name, spec in method.metrics.items():
        values = per_step[name]
        out[name] = jnp.sum(values, axis=axis) if spec.reduce == "sum" else jnp.mean(values, axis=axis)
    return out


def _epoch_keys(root: jax.Array, epoch: jax.Array) -> tuple[jax.Array, jax.Array]:
    epoch_key = jax.random.fold_in(jax.random.fold_in(root, STREAM_TRAIN), epoch)
    return jax.random.fold_in(epoch_key, 0), jax.random.fold_in(epoch_key, 1)


def _batches(root: jax.Array, epoch: jax.Array, n_images: int, batch: int) -> jax.Array:
    """One run's reshuffled batches of flat image indices for the epoch, [steps, batch] (full
    batches only)."""
    shuffle_key, _ = _epoch_keys(root, epoch)
    steps = n_images // batch
    return jax.random.permutation(shuffle_key, n_images)[: steps * batch].reshape(steps, batch)


@partial(jax.jit, static_argnames=("n_images", "batch"))
def epoch_batches(roots: jax.Array, epoch: jax.Array, n_images: int, batch: int) -> jax.Array:
    """Every run's batches for the epoch from the root keys [S, 2]: [S, steps, batch]."""
    return jax.vmap(lambda root: _batches(root, epoch, n_images, batch))(roots)


@partial(jax.jit, static_argnames=("n_images", "batch"))
def epoch_plan(roots: jax.Array, epoch: jax.Array, n_images: int,
               batch: int) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """What the loop of steps feeds each step, made on the device in one call per epoch: every
    step's batches of every run ([S, batch] each) and its step number (an int32 scalar). Slicing
    the batches or making the step number on the host per step would be a host-to-device
    transfer per step (and one small compilation per task for the slice)."""
    batches = epoch_batches(roots, epoch, n_images, batch)
    steps = batches.shape[1]
    return tuple(batches[:, i] for i in range(steps)), tuple(jnp.arange(steps, dtype=jnp.int32))


def _step_key(root: jax.Array, epoch: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(_epoch_keys(root, epoch)[1], step)


def resolve_epoch_mode(mode: str) -> str:
    """``auto`` → one ``lax.scan`` per epoch on accelerators, a loop of jitted steps on the CPU
    (XLA's CPU backend runs convolutions inside a while loop much more slowly; the measurement is in
    docs/performance_notes.md)."""
    if mode != "auto":
        return mode
    return "loop" if jax.default_backend() == "cpu" else "scan"


def _donate() -> tuple[int, ...]:
    return (0,) if jax.default_backend() != "cpu" else ()


def _keyed(train_step: Callable) -> Callable:
    """One run's step taking (epoch, step) instead of its key."""

    def run_step(st, data, idx, epoch, step, lr):
        return train_step(st, data, idx, _step_key(st.key, epoch, step), lr)

    return run_step


def make_step_of_runs(cfg: Config, method: plasticity.PlasticityMethod | None = None,
                      conv_grad: str = "auto") -> Callable:
    """The train step of stacked runs as the loop of steps dispatches it: ``(state, data, idx
    [S, batch], epoch, step, lr) → (state, loss [S], accuracy [S], metrics)``, one run's step
    (its key drawn from the run's root key, the epoch and the step) mapped over the runs and
    jitted, the state donated on accelerators. ``method`` and ``conv_grad`` as in
    ``make_train_step``."""
    run_step = _keyed(make_train_step(cfg, method, conv_grad))
    return jax.jit(jax.vmap(run_step, in_axes=(0, RUN_AXES, 0, None, None, None)), donate_argnums=_donate(),
                   compiler_options=compiler_options(cfg))


def make_train_epoch(cfg: Config) -> Callable:
    """Build the epoch of stacked runs: ``(state, data, lr, epoch, n_active) → (state,
    step_losses [S, steps], step_accuracies [S, steps], metrics)``, ``data`` the runs' ``TaskData``
    of the training images and ``metrics`` the plasticity methods' per-step metrics reduced over
    the epoch (``{name: [S, *shape]}``).

    Both modes run the same step with the same keys: ``scan`` compiles one run's whole epoch
    (its shuffle, then a ``lax.scan`` over its steps), mapped over the runs, into one program
    (once per task); ``loop`` shuffles, then dispatches the mapped step per batch (compiled once
    per run) with no host sync and no host-to-device transfer inside (``epoch_plan``)."""
    method = plasticity.from_config(cfg)
    batch = cfg.train_batch_size

    if resolve_epoch_mode(cfg.epoch_mode) == "scan":
        run_step = _keyed(make_train_step(cfg, method))

        def one_epoch(st, data, lr, epoch, n_active: int):
            batches = _batches(st.key, epoch, n_active * data.images.shape[1], batch)

            def body(st, step):
                st, loss, acc, metrics = run_step(st, data, batches[step], epoch, step, lr)
                return st, (loss, acc, metrics)

            st, (losses, accs, metrics) = jax.lax.scan(body, st, jnp.arange(batches.shape[0]))
            return st, losses, accs, reduce_metrics(method, metrics, axis=0)

        @partial(jax.jit, static_argnames=("n_active",), donate_argnums=_donate(),
                 compiler_options=compiler_options(cfg))
        def scan_epoch(state, data, lr, epoch, n_active: int):
            runs = jax.vmap(partial(one_epoch, n_active=n_active), in_axes=(0, RUN_AXES, None, None))
            return runs(state, data, lr, epoch)

        return scan_epoch

    steps_of_runs = make_step_of_runs(cfg, method)

    def loop_epoch(state, data, lr, epoch, n_active: int):
        step_batches, step_numbers = epoch_plan(state.key, epoch, n_active * data.images.shape[1], batch)
        losses, accs, metrics = [], [], []
        for idx, step in zip(step_batches, step_numbers, strict=True):
            state, loss, acc, m = steps_of_runs(state, data, idx, epoch, step, lr)
            losses.append(loss)
            accs.append(acc)
            metrics.append(m)
        stacked = {name: jnp.stack([m[name] for m in metrics], axis=1) for name in method.metrics}
        return state, jnp.stack(losses, axis=1), jnp.stack(accs, axis=1), reduce_metrics(method, stacked, axis=1)

    return loop_epoch


def _eval_batches(n: int, batch: int) -> tuple[jax.Array, jax.Array]:
    """Indices [nb, batch] of ``n`` images in batches (the last one padded with the last image)
    and the weights that count each image once."""
    nb = -(-n // batch)
    idx = jnp.arange(nb * batch)
    weights = (idx < n).astype(jnp.float32).reshape(nb, batch)
    return jnp.minimum(idx, n - 1).reshape(nb, batch), weights


@partial(jax.jit, static_argnames=("n", "batch"))
def eval_plan(n: int, batch: int) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """The loop of evaluation batches' inputs, made on the device in one call: per batch its
    indices, its weights and its number (int32), so that no batch needs a host-to-device transfer."""
    idx, weights = _eval_batches(n, batch)
    return tuple(idx), tuple(weights), tuple(jnp.arange(idx.shape[0], dtype=jnp.int32))


def _batch_metrics(model: ResNet18, augment_images: bool) -> Callable:
    """One run's (loss, accuracy) on one evaluation batch, network in evaluation mode."""

    def batch_metrics(params, batch_stats, data, b_idx, w, key, b):
        raw, labels = _gather(data.images, data.class_order, b_idx)
        x = normalize(raw)
        if augment_images:
            x = augment(jax.random.fold_in(key, b), x)
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return masked_loss_and_accuracy(logits, labels, data.mask, w)

    return batch_metrics


def make_eval_batch_of_runs(cfg: Config, augment_images: bool, conv_grad: str = "auto") -> Callable:
    """One evaluation batch of stacked runs as the loop of batches dispatches it: ``(params,
    batch_stats, data, idx [batch], weights [batch], key [S, 2], b) → (loss [S], accuracy [S])``,
    jitted. ``conv_grad`` as in ``make_model``."""
    batch_metrics = _batch_metrics(make_model(cfg, conv_grad), augment_images)
    return jax.jit(jax.vmap(batch_metrics, in_axes=(0, 0, RUN_AXES, None, None, 0, None)),
                   compiler_options=compiler_options(cfg))


def make_evaluate(cfg: Config, batch: int, augment_images: bool) -> Callable:
    """Build the evaluation of stacked runs: ``(params, batch_stats, data, key, n_active) →
    (loss [S], accuracy [S])``, network in evaluation mode, per run the mean over batches of the
    per-batch means (the reference's averaging, which weights a partial last batch like a full
    one). ``key`` (one per run) draws the test-time augmentation when ``augment_images``."""
    if resolve_epoch_mode(cfg.epoch_mode) == "scan":
        batch_metrics = _batch_metrics(make_model(cfg), augment_images)

        def one_run(params, batch_stats, data, key, n_active: int):
            idx, weights = _eval_batches(n_active * data.images.shape[1], batch)

            def body(carry, xs):
                b_idx, w, b = xs
                return carry, batch_metrics(params, batch_stats, data, b_idx, w, key, b)

            _, (losses, accs) = jax.lax.scan(body, None, (idx, weights, jnp.arange(idx.shape[0])))
            return jnp.mean(losses), jnp.mean(accs)

        @partial(jax.jit, static_argnames=("n_active",), compiler_options=compiler_options(cfg))
        def evaluate(params, batch_stats, data, key, n_active: int):
            runs = jax.vmap(partial(one_run, n_active=n_active), in_axes=(0, 0, RUN_AXES, 0))
            return runs(params, batch_stats, data, key)

        return evaluate

    batch_of_runs = make_eval_batch_of_runs(cfg, augment_images)

    def evaluate_loop(params, batch_stats, data, key, n_active: int):
        plan = eval_plan(n_active * data.images.shape[1], batch)
        out = [batch_of_runs(params, batch_stats, data, b_idx, w, key, b) for b_idx, w, b in zip(*plan, strict=True)]
        return jnp.mean(jnp.stack([o[0] for o in out]), axis=0), jnp.mean(jnp.stack([o[1] for o in out]), axis=0)

    return evaluate_loop


def _update_best(state: TrainState, val_acc: jax.Array) -> TrainState:
    better = val_acc > state.best_acc
    pick = partial(jax.tree_util.tree_map, lambda new, old: jnp.where(better, new, old))
    return state.replace(best_params=pick(state.params, state.best_params),
                         best_batch_stats=pick(state.batch_stats, state.best_batch_stats),
                         best_acc=jnp.where(better, val_acc, state.best_acc),
                         has_best=state.has_best | better)


update_best = jax.jit(jax.vmap(_update_best))
update_best.__doc__ = """Per run, keep a copy of the network when its validation accuracy (one per run)
strictly improves (semantics §5)."""


def _end_task(state: TrainState, restore: bool) -> TrainState:
    if restore:
        pick = partial(jax.tree_util.tree_map, lambda best, cur: jnp.where(state.has_best, best, cur))
        state = state.replace(params=pick(state.best_params, state.params),
                              batch_stats=pick(state.best_batch_stats, state.batch_stats))
    return state.replace(best_acc=jnp.zeros_like(state.best_acc), has_best=jnp.zeros_like(state.has_best))


@partial(jax.jit, static_argnames=("restore",))
def end_task(state: TrainState, restore: bool) -> TrainState:
    """Task boundary, per run: restore the best-validation network if early stopping (parameters
    and BatchNorm statistics, not the optimiser or algorithm state), then clear the copy. If
    validation accuracy never rose above 0 in the task the reference would crash; here the network
    is kept."""
    return jax.vmap(partial(_end_task, restore=restore))(state)


def _boundary_reset(method: plasticity.PlasticityMethod, state: TrainState, task: jax.Array) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.fold_in(state.key, STREAM_TASK), task)
    out = method.at_task_boundary(plasticity.MethodArgs(state.params, state.batch_stats, state.opt_state,
                                                        state.algo_state, key))
    plasticity.check_metrics(out.metrics, method.task_metrics, method.name, "task-boundary")
    return state.replace(params=out.params, batch_stats=out.batch_stats, opt_state=out.opt_state,
                         algo_state=out.state), out.metrics


_BOUNDARY_RESETS: OrderedDict[tuple, Callable | None] = OrderedDict()
_BOUNDARY_CACHE_SIZE = 16


def _build_boundary_reset(cfg: Config) -> Callable | None:
    method = plasticity.from_config(cfg)
    if method.at_task_boundary is None:
        return None
    return jax.jit(jax.vmap(partial(_boundary_reset, method), in_axes=(0, None)))


def _compiled_boundary_reset(cfg: Config) -> Callable | None:
    """The jitted task-boundary hook of stacked runs, built once per config and per registered
    factory of its methods (a new jit per call compiled it again at every task boundary); None
    when no method has the hook. The last few are kept."""
    key = (cfg, tuple(method_factory(name) for name, _ in cfg.methods))
    try:
        hit = key in _BOUNDARY_RESETS
    except TypeError:  # an option value that cannot be hashed: build it for this call only
        return _build_boundary_reset(cfg)
    if hit:
        _BOUNDARY_RESETS.move_to_end(key)
    else:
        _BOUNDARY_RESETS[key] = _build_boundary_reset(cfg)
        while len(_BOUNDARY_RESETS) > _BOUNDARY_CACHE_SIZE:
            _BOUNDARY_RESETS.popitem(last=False)
    return _BOUNDARY_RESETS[key]


def task_boundary_reset(cfg: Config, state: TrainState, task: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """Apply the plasticity methods' task-boundary hooks (e.g. head or network reset) to every run
    before task ``task + 1``; also their task-boundary metrics ({name: [S, *shape]}). Compiled
    once per config; the task number reaches the device as an explicit transfer."""
    reset = _compiled_boundary_reset(cfg)
    if reset is None:
        return state, {}
    return reset(state, jax.device_put(np.int32(task)))


@jax.jit
def _eval_keys(keys: jax.Array, epoch: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, STREAM_EVAL), epoch))(keys)


def eval_key(state: TrainState, epoch: int) -> jax.Array:
    """Per run, the key of the test-time augmentation quirk at ``epoch`` ([S, 2]); the epoch
    reaches the device as an explicit transfer."""
    return _eval_keys(state.key, jax.device_put(np.int32(epoch)))
