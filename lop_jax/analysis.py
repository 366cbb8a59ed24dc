"""Post-run analysis (semantics §9): representation metrics of the task-boundary snapshots.

The metric functions work on their own, on any feature matrix or parameter tree:

    effective_rank(x)            exp of the entropy of the normalised singular values
    stable_rank(x)               the paper's "stable rank": singular values needed for 99 % of their sum
    stable_rank_percent(x)       the same, as a percentage of the representation width
    unit_activity(features)      per layer, per channel: fraction of non-zero activations
    dormant_proportion(features) dormant channels / all channels of the given layers
    average_weight_magnitude(p)  mean |w| over every leaf of a parameter tree
    accuracy_per_class(out, y, classes)

``x`` is either a vector of singular values or a 2-D feature matrix (rows = samples).

``analyze_experiment`` runs the reference's ``post_run_analysis.py`` on a lop-jax results
directory and writes its metric files (``ANALYSIS_METRICS``), one ``index-<N>.npy`` each:
arrays of length ``num_tasks`` (snapshot i = the network at epoch i·epochs_per_task, before
task i+1), and ``accuracy_per_class_in_order`` of length K (every class of the run's class order).
Effective and stable rank are stored as raw numbers, dormant units as a proportion, exactly as
the reference stores them; the plots convert them to percentages.

The images are those of the reference, whatever the run's own split: each feature batch is ONE
batch of up to 1,000 images drawn at random, without replacement and without augmentation, from
the FULL training split of the run's data source (``lop_jax.data.load_full_split``: 500 images per
class for the real CIFAR-100, validation images included) restricted to the classes concerned;
"next task" = the classes of task i+1, "previous tasks" = every class seen before it. So at the
scaled protocol (10 validation + 36 training images per class) the next-task batch still holds
1,000 images of its 5 classes. The per-class accuracy uses the full test split (100 per class),
not the run's ``test_images_per_class``. A source with fewer images (the embedded subset: 60
training images per class) gives smaller batches: all it has, and ``analyze_experiment`` logs a
line naming the batch sizes.

Differences from the reference, on purpose: the batches are drawn from JAX keys derived from the
run index (reproducible), and the number of classes and tasks come from the run's config (the
reference hard-codes 20 tasks of 5 classes).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lop_jax.augment import normalize
from lop_jax.config import Config
from lop_jax.errors import InputError
from lop_jax.model import NUM_OUTPUTS, ResNet18
from lop_jax.results import ExperimentDir, ResultsError

ANALYSIS_METRICS = (
    "weight_magnitude_analysis",
    "previous_tasks_dormant_units_analysis",
    "next_task_dormant_units_analysis",
    "previous_tasks_effective_rank_analysis",
    "next_task_effective_rank_analysis",
    "previous_tasks_stable_rank_analysis",
    "next_task_stable_rank_analysis",
    "accuracy_per_class_in_order",
)
BN_MODES = ("train", "eval")
FEATURE_BATCH = 1000
TEST_BATCH = 1000
REFERENCE_TEST_PER_CLASS = 100  # the reference's per-class accuracy uses the whole test split
STABLE_RANK_THRESHOLD = 0.99
ANALYSIS_KEY_SALT = 0x4C4F5041  # separates the analysis' random stream from the training run's
ROLE_NEXT, ROLE_PREVIOUS, ROLE_TEST = 0, 1, 2


class AnalysisError(InputError, RuntimeError):
    """A problem with the results directory; the message is one line that names the file."""


# ---------------------------------------------------------------------------------------------
# metric functions
# ---------------------------------------------------------------------------------------------
@jax.jit
def _singular_values(matrix: jax.Array) -> jax.Array:
    return jnp.linalg.svd(matrix, compute_uv=False)


def singular_values(x: Any) -> jax.Array:
    """Singular values of a 2-D matrix; a 1-D input is taken to be singular values already."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 1:
        return x
    if x.ndim == 2:
        return _singular_values(x)
    raise ValueError(f"expected singular values (1-D) or a feature matrix (2-D), got shape {x.shape}")


@jax.jit
def _effective_rank_sv(s: jax.Array) -> jax.Array:
    p = s / jnp.sum(jnp.abs(s))
    safe = jnp.where(p > 0, p, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0))
    return jnp.exp(entropy)


@jax.jit
def _stable_rank_sv(s: jax.Array, threshold: jax.Array) -> jax.Array:
    ordered = jnp.sort(s)[::-1]
    cumulative = jnp.cumsum(ordered) / jnp.sum(s)
    return jnp.sum(cumulative < threshold) + 1


def effective_rank(x: Any) -> float:
    """Effective rank exp(−Σ p log p), p = s / Σ|s| (0·log 0 = 0), of singular values or a matrix."""
    return float(_effective_rank_sv(singular_values(x)))


def stable_rank(x: Any, threshold: float = STABLE_RANK_THRESHOLD) -> int:
    """The paper's "stable rank": 1 + the number of largest singular values whose normalised
    cumulative sum is below ``threshold`` (0.99), of singular values or a matrix."""
    return int(_stable_rank_sv(singular_values(x), jnp.float32(threshold)))


def stable_rank_percent(x: Any, width: int | None = None, threshold: float = STABLE_RANK_THRESHOLD) -> float:
    """Stable rank as a percentage of the representation width, as the paper plots it.

    ``width`` defaults to the number of columns of a matrix, or the number of singular values.
    """
    if width is None:
        width = np.shape(x)[-1]
    return 100.0 * stable_rank(x, threshold) / width


def _activity(features: Sequence[jax.Array]) -> list[jax.Array]:
    out = []
    for f in features:
        axes = tuple(range(f.ndim - 1))
        count = jnp.sum(f != 0, axis=axes, dtype=jnp.int32)
        n = int(np.prod([f.shape[a] for a in axes]))
        out.append(count.astype(jnp.float32) / jnp.float32(n))
    return out


_activity_jit = jax.jit(_activity)


def unit_activity(features: Sequence[Any]) -> list[np.ndarray]:
    """Per layer, the fraction of non-zero activations of every channel (last axis).

    Conv maps [B, H, W, C] count over images and positions; vectors [B, C] over images.
    """
    return [np.asarray(a) for a in _activity_jit([jnp.asarray(f) for f in features])]


def dormant_from_activity(activity: Sequence[Any], threshold: float = 0.01) -> float:
    """Dormant channels (activity < threshold, compared in float32 as the reference does) / all channels."""
    t = np.float32(threshold)
    dormant = sum(int(np.sum(np.asarray(a, np.float32) < t)) for a in activity)
    total = sum(int(np.size(a)) for a in activity)
    return dormant / total


def dormant_proportion(features: Sequence[Any], threshold: float = 0.01) -> float:
    """Proportion of dormant channels over the given feature layers (semantics §9).

    A channel is dormant when the fraction of its activations that are non-zero is below
    ``threshold``; with the 17 layers of ``ResNet18(..., return_features=True)`` this is the
    paper's measure.
    """
    return dormant_from_activity(unit_activity(features), threshold)


def average_weight_magnitude(params: Any) -> float:
    """Mean |w| over every entry of every leaf of a parameter tree."""
    leaves = jax.tree_util.tree_leaves(params)
    total = sum(float(np.sum(np.abs(np.asarray(leaf, np.float64)))) for leaf in leaves)
    count = sum(int(np.size(leaf)) for leaf in leaves)
    if count == 0:
        raise ValueError("the parameter tree has no entries")
    return total / count


def accuracy_per_class(outputs: Any, labels: Any, classes: Sequence[int]) -> np.ndarray:
    """Accuracy of each class in ``classes`` (in that order); NaN for a class without examples.

    ``outputs`` are logits [N, O] (arg-max over all O outputs, no mask) or predicted labels [N].
    """
    out = np.asarray(outputs)
    pred = out.argmax(axis=-1) if out.ndim == 2 else out
    labels = np.asarray(labels)
    acc = np.full(len(classes), np.nan, np.float32)
    for j, c in enumerate(np.asarray(classes)):
        mask = labels == c
        if mask.any():
            acc[j] = np.mean(pred[mask] == c)
    return acc


# ---------------------------------------------------------------------------------------------
# forward passes on snapshots
# ---------------------------------------------------------------------------------------------
def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats}


@functools.lru_cache(maxsize=8)
def _feature_fn(width: int, bn_mode: str, activation: str = "relu") -> Callable:
    model = ResNet18(width, activation=activation)

    def fn(params: Any, batch_stats: Any, images: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        x = normalize(images)
        if bn_mode == "train":
            (_, feats), _ = model.apply(_variables(params, batch_stats), x, train=True, return_features=True,
                                        mutable=["batch_stats"])
        else:
            _, feats = model.apply(_variables(params, batch_stats), x, train=False, return_features=True)
        return _activity(feats), feats[-1]

    return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def _predict_fn(width: int, bn_mode: str, activation: str = "relu") -> Callable:
    model = ResNet18(width, activation=activation)

    def fn(params: Any, batch_stats: Any, images: jax.Array, allowed: jax.Array) -> jax.Array:
        x = normalize(images)
        if bn_mode == "train":
            logits, _ = model.apply(_variables(params, batch_stats), x, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(_variables(params, batch_stats), x, train=False)
        return jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)

    return jax.jit(fn)


def _check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")


def snapshot_features(params: Any, batch_stats: Any, images: Any, width: int,
                      bn_mode: str = "train", activation: str = "relu") -> tuple[list[np.ndarray], np.ndarray]:
    """Forward uint8 NHWC images through a snapshot (no augmentation).

    Returns the per-layer channel activity of the 17 feature layers and the pooled features
    [B, 8·width]. ``bn_mode='train'`` uses the batch's statistics, as the reference does.
    """
    _check_bn_mode(bn_mode)
    activity, pooled = _feature_fn(width, bn_mode, activation)(params, batch_stats, jnp.asarray(images))
    return [np.asarray(a) for a in activity], np.asarray(pooled)


def predict(params: Any, batch_stats: Any, images: Any, width: int, bn_mode: str = "train",
            classes: Sequence[int] | None = None, activation: str = "relu") -> np.ndarray:
    """Predicted labels of uint8 NHWC images: arg-max over the outputs of ``classes`` (all if None)."""
    _check_bn_mode(bn_mode)
    allowed = np.zeros(NUM_OUTPUTS, bool)
    allowed[np.arange(NUM_OUTPUTS) if classes is None else np.asarray(classes, np.int64)] = True
    fn = _predict_fn(width, bn_mode, activation)
    return np.asarray(fn(params, batch_stats, jnp.asarray(images), jnp.asarray(allowed)))


def analysis_key(index: int, snapshot: int, role: int) -> jax.Array:
    """The JAX key of one analysis batch: run index → snapshot → role (next/previous/test)."""
    key = jax.random.fold_in(jax.random.PRNGKey(index), ANALYSIS_KEY_SALT)
    return jax.random.fold_in(jax.random.fold_in(key, snapshot), role)


def sample_batch(pool: np.ndarray, classes: Sequence[int], key: jax.Array,
                 size: int = FEATURE_BATCH) -> np.ndarray:
    """min(size, available) images drawn without replacement from ``pool[classes]``.

    ``pool`` is [K, n, 32, 32, 3] grouped by label; the candidates are the n images of every
    class in ``classes``, taken in that order.
    """
    classes = np.asarray(classes, np.int64)
    per_class = pool.shape[1]
    available = classes.size * per_class
    if available == 0:
        raise ValueError("no images to draw from")
    chosen = np.asarray(jax.random.permutation(key, available)[:min(size, available)])
    which, within = np.divmod(chosen, per_class)
    return pool[classes[which], within]


def representation_metrics(params: Any, batch_stats: Any, images: np.ndarray, width: int,
                           threshold: float = 0.01, bn_mode: str = "train",
                           activation: str = "relu") -> dict[str, float]:
    """Dormant proportion, effective rank and stable rank of a snapshot on one batch."""
    activity, pooled = snapshot_features(params, batch_stats, images, width, bn_mode, activation)
    s = singular_values(pooled)
    return {"dormant": dormant_from_activity(activity, threshold),
            "effective_rank": float(_effective_rank_sv(s)),
            "stable_rank": float(_stable_rank_sv(s, jnp.float32(STABLE_RANK_THRESHOLD)))}


def class_accuracy_on_test(params: Any, batch_stats: Any, test: np.ndarray, class_order: np.ndarray,
                           key: jax.Array, width: int, bn_mode: str = "train", batch_size: int = TEST_BATCH,
                           active_classes: Sequence[int] | None = None, activation: str = "relu") -> np.ndarray:
    """Accuracy of every class of ``class_order`` (in that order) on the clean test images.

    All test images of those classes are shuffled with ``key`` and passed in batches of
    ``batch_size`` (BatchNorm in training mode uses each batch's statistics). Predictions are
    the arg-max over the outputs of ``active_classes`` (all outputs if None).
    """
    class_order = np.asarray(class_order, np.int64)
    per_class = test.shape[1]
    n = class_order.size * per_class
    order = np.asarray(jax.random.permutation(key, n))
    which, within = np.divmod(order, per_class)
    labels = class_order[which]
    preds = np.empty(n, np.int64)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        preds[sl] = predict(params, batch_stats, test[labels[sl], within[sl]], width, bn_mode, active_classes,
                            activation)
    return accuracy_per_class(preds, labels, class_order)


# ---------------------------------------------------------------------------------------------
# whole-experiment analysis
# ---------------------------------------------------------------------------------------------
def load_experiment_config(exp_dir: str | Path) -> Config:
    """The resolved config of an experiment directory (``config.json``)."""
    folder = ExperimentDir(exp_dir)
    if not folder.has_config():
        raise AnalysisError(f"no config.json in {exp_dir}: is it an experiment directory (<results_dir>/<name>)?")
    try:
        return folder.read_config()
    except ResultsError as err:
        raise AnalysisError(str(err)) from None


def run_indices(exp_dir: str | Path) -> tuple[list[int], list[int]]:
    """(finished, unfinished) run indices, from the runs' status files (an unreadable one counts as
    unfinished)."""
    folder = ExperimentDir(exp_dir)
    started = folder.started_indices()
    if started is None:
        raise AnalysisError(f"no run_status folder in {exp_dir}: no run has been started there")
    finished = [i for i in started if folder.is_finished(i)]
    return finished, [i for i in started if i not in finished]


def _snapshot_epochs(cfg: Config) -> list[int]:
    return [t * cfg.epochs_per_task for t in range(cfg.num_tasks + 1)]


def _check_inputs(folder: ExperimentDir, cfg: Config, index: int, num_available: int) -> np.ndarray:
    order_file = folder.metric_path("class_order", index)
    try:
        class_order = np.asarray(folder.load_metric("class_order", index), np.int64)
    except ResultsError as err:
        raise AnalysisError(f"class order: {err}") from None
    if class_order.ndim != 1 or class_order.size < cfg.num_classes:
        raise AnalysisError(f"{order_file} holds {class_order.size} classes, the run needs {cfg.num_classes}")
    if class_order.max(initial=0) >= num_available:
        raise AnalysisError(f"{order_file} names class {class_order.max()} but the data set has {num_available}")
    for epoch in _snapshot_epochs(cfg):
        if not folder.has_snapshot(index, epoch):
            raise AnalysisError(f"missing network snapshot {folder.snapshot_path(index, epoch)} "
                                f"(index {index}, epoch {epoch})")
    return class_order


def analyze_run(exp_dir: str | Path, cfg: Config, index: int, pool: np.ndarray, test: np.ndarray,
                threshold: float = 0.01, bn_mode: str = "train",
                on_snapshot: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """The metrics of semantics §9 for every task-boundary snapshot of one run (nothing is written).

    ``pool`` is the source's full training split grouped by class [K, n, 32, 32, 3] (validation
    images included); ``test`` its full test split [K, n_test, 32, 32, 3]. Snapshot i (epoch
    i·epochs_per_task, i < num_tasks) gives entry i; "previous tasks" entries are 0 for i = 0, as
    in the reference. The per-class accuracy of the final network predicts among the run's
    classes (class_order[:num_classes]): at the paper's scale these are all 100 outputs, i.e. the
    reference's unmasked prediction.
    """
    _check_bn_mode(bn_mode)
    folder = ExperimentDir(exp_dir)
    class_order = _check_inputs(folder, cfg, index, pool.shape[0])
    width, cpt = cfg.network_width, cfg.classes_per_task
    out = {m: np.zeros(cfg.num_tasks, np.float32) for m in ANALYSIS_METRICS[:-1]}
    epochs = _snapshot_epochs(cfg)
    for i in range(cfg.num_tasks):
        params, batch_stats = folder.load_snapshot(index, epochs[i])
        out["weight_magnitude_analysis"][i] = average_weight_magnitude(params)
        roles = [("next_task", class_order[i * cpt:(i + 1) * cpt], ROLE_NEXT)]
        if i > 0:
            roles.append(("previous_tasks", class_order[:i * cpt], ROLE_PREVIOUS))
        for prefix, classes, role in roles:
            images = sample_batch(pool, classes, analysis_key(index, i, role))
            m = representation_metrics(params, batch_stats, images, width, threshold, bn_mode, cfg.activation)
            out[f"{prefix}_dormant_units_analysis"][i] = m["dormant"]
            out[f"{prefix}_effective_rank_analysis"][i] = m["effective_rank"]
            out[f"{prefix}_stable_rank_analysis"][i] = m["stable_rank"]
        if on_snapshot is not None:
            on_snapshot()
    params, batch_stats = folder.load_snapshot(index, epochs[-1])
    out["accuracy_per_class_in_order"] = class_accuracy_on_test(
        params, batch_stats, test, class_order, analysis_key(index, cfg.num_tasks, ROLE_TEST), width, bn_mode,
        active_classes=class_order[:cfg.num_classes], activation=cfg.activation)
    if on_snapshot is not None:
        on_snapshot()
    return out


def save_analysis(exp_dir: str | Path, index: int, results: dict[str, np.ndarray]) -> None:
    """Write each metric to ``<exp_dir>/<metric>/index-<N>.npy`` atomically (temp file + rename)."""
    folder = ExperimentDir(exp_dir)
    for name in ANALYSIS_METRICS:
        folder.save_metric(name, index, results[name])


def batch_sizes(cfg: Config, per_class: int, size: int = FEATURE_BATCH) -> dict[str, list[int]]:
    """Images per feature batch, per snapshot i < num_tasks, when the source has ``per_class``
    training images of each class: min(size, available) for "next_task" and "previous_tasks"
    (0 at i = 0, which has no previous task)."""
    cpt = cfg.classes_per_task
    return {"next_task": [min(size, cpt * per_class)] * cfg.num_tasks,
            "previous_tasks": [min(size, i * cpt * per_class) for i in range(cfg.num_tasks)]}


def small_batch_note(cfg: Config, per_class: int, per_class_test: int, source: str) -> str | None:
    """One line saying which batches hold fewer than the reference's 1,000 images (and a test split
    smaller than 100 per class), or None when the source gives the reference's sizes."""
    sizes = batch_sizes(cfg, per_class)
    short = []
    if sizes["next_task"] and sizes["next_task"][0] < FEATURE_BATCH:
        short.append(f"next task {sizes['next_task'][0]}")
    prev = sorted({n for n in sizes["previous_tasks"][1:] if n < FEATURE_BATCH})
    if prev:
        short.append(f"previous tasks {', '.join(map(str, prev))}")
    if not short and per_class_test >= REFERENCE_TEST_PER_CLASS:
        return None
    note = f"analysis: {source} has {per_class} training and {per_class_test} test images per class"
    if short:
        note += f"; images per batch: {'; '.join(short)} (the reference draws {FEATURE_BATCH:,})"
    if per_class_test < REFERENCE_TEST_PER_CLASS:
        note += f"; per-class test accuracy over {per_class_test} images (the reference: {REFERENCE_TEST_PER_CLASS})"
    return note


def _full_split(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) of a full-split object; a run's split (with ``val``) is refused, not mixed up."""
    if hasattr(data, "val"):
        raise AnalysisError("data= must be the source's full split (lop_jax.data.load_full_split), "
                            "not a run's train/val/test split")
    return np.asarray(data.train), np.asarray(data.test)


def analyze_experiment(exp_dir: str | Path, data_dir: str | Path | None = None, threshold: float = 0.01,
                       bn_mode: str = "train", progress: bool = True, data: Any = None,
                       indices: Sequence[int] | None = None,
                       log: Callable[[str], None] | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Analyse every finished run of ``exp_dir`` and write the reference's metric files.

    The images come from the full split of the run's data source (see the module docstring):
    ``data`` (a ``lop_jax.data.FullSplit``-like object with ``train`` and ``test``, every image of
    each class) skips loading it; otherwise it is loaded as the run's config says, from
    ``data_dir`` if given. When the source has fewer images than the reference's batches, a line
    names the batch sizes. ``indices`` restricts the analysis to those runs. Unfinished runs are
    skipped with a message. Returns the arrays written, per run index.
    """
    _check_bn_mode(bn_mode)
    if not 0.0 <= threshold <= 1.0:
        raise AnalysisError(f"the dormant-unit threshold must be in [0, 1], got {threshold}")
    say = log or (lambda msg: print(msg, file=sys.stderr))
    folder = ExperimentDir(exp_dir)
    if not folder.exists():
        raise AnalysisError(f"no such experiment directory: {exp_dir}")
    cfg = load_experiment_config(exp_dir)
    finished, unfinished = run_indices(exp_dir)
    if indices is not None:
        wanted = set(indices)
        missing = sorted(wanted - set(finished) - set(unfinished))
        if missing:
            raise AnalysisError(f"no run_status for index {missing[0]} in {exp_dir}")
        finished = [i for i in finished if i in wanted]
        unfinished = [i for i in unfinished if i in wanted]
    for index in unfinished:
        status = folder.status(index) or {}
        say(f"index {index}: run unfinished ({status.get('epochs_done', 0)}/{cfg.num_epochs} epochs), skipped")
    if not finished:
        return {}
    if data is None:
        from lop_jax.data import load_full_split

        if data_dir is not None:
            cfg = dataclasses.replace(cfg, data_path=str(data_dir))
        data = load_full_split(cfg)
    pool, test = _full_split(data)
    note = small_batch_note(cfg, pool.shape[1], test.shape[1], getattr(data, "source", "the data given"))
    if note:
        say(note)
    for index in finished:
        _check_inputs(folder, cfg, index, pool.shape[0])
    results = {}
    with tqdm(total=len(finished) * (cfg.num_tasks + 1), desc="snapshots", unit="snapshot",
              disable=not progress) as bar:
        for index in finished:
            bar.set_postfix_str(f"index {index}")
            results[index] = analyze_run(exp_dir, cfg, index, pool, test, threshold, bn_mode,
                                         on_snapshot=lambda: bar.update(1))
            save_analysis(exp_dir, index, results[index])
    return results
