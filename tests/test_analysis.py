"""Post-run analysis: metric functions against hand-computed values, and the analysis of a tiny run."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from experiments import analyze as analyze_cli
from lop_jax import analysis as A
from lop_jax.augment import normalize
from lop_jax.config import make_config
from lop_jax.data import FullSplit, load_data
from lop_jax.model import ResNet18
from lop_jax.results import ExperimentDir

WIDTH = 2
NUM_TASKS, CPT, EPOCHS_PER_TASK = 2, 2, 1
N_TRAIN, N_VAL, N_TEST, K = 6, 2, 3, 5
N_FULL = 8  # training images per class of the fake source's full split (the analysis draws from all of them)


# ---------------------------------------------------------------------------------------------
# ranks
# ---------------------------------------------------------------------------------------------
def test_effective_rank_identity_matrix_and_singular_values():
    assert A.effective_rank(np.eye(8)) == pytest.approx(8.0, rel=1e-5)
    assert A.effective_rank(np.ones(8)) == pytest.approx(8.0, rel=1e-5)


def test_effective_rank_rank_one_matrix():
    u = np.arange(1.0, 11.0)
    assert A.effective_rank(np.outer(u, u + 1.0)) == pytest.approx(1.0, abs=1e-4)


def test_effective_rank_known_spectrum_and_zeros():
    p = np.array([3.0, 2.0, 1.0]) / 6.0
    expected = math.exp(-sum(q * math.log(q) for q in p))
    assert A.effective_rank([3.0, 2.0, 1.0]) == pytest.approx(expected, rel=1e-6)
    # 0·log 0 = 0: two equal values and two zeros have effective rank exactly 2
    assert A.effective_rank([2.0, 0.0, 2.0, 0.0]) == pytest.approx(2.0, rel=1e-6)


def test_stable_rank_identity_rank_one_and_known_spectrum():
    # identity 512: cumulative sums k/512 < 0.99 for k = 1..506, plus one
    assert A.stable_rank(np.eye(512)) == 507
    u = np.arange(1.0, 11.0)
    assert A.stable_rank(np.outer(u, u)) == 1
    # cumulative 0.90, 0.98, 0.995, 1.0: two below 0.99, plus one; order of the input is irrelevant
    assert A.stable_rank([90.0, 8.0, 1.5, 0.5]) == 3
    assert A.stable_rank([0.5, 90.0, 1.5, 8.0]) == 3
    assert A.stable_rank([90.0, 8.0, 1.5, 0.5], threshold=0.9) == 1


def test_stable_rank_percent_of_width():
    assert A.stable_rank_percent(np.eye(512)) == pytest.approx(100.0 * 507 / 512)
    assert A.stable_rank_percent([90.0, 8.0, 1.5, 0.5], width=512) == pytest.approx(100.0 * 3 / 512)
    features = np.zeros((1000, 512), np.float32)
    features[:, 0] = 1.0
    assert A.stable_rank_percent(features) == pytest.approx(100.0 / 512)


def test_rank_rejects_3d_input():
    with pytest.raises(ValueError, match="2-D"):
        A.effective_rank(np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------------------------
# dormant units, weight magnitude, per-class accuracy
# ---------------------------------------------------------------------------------------------
def _hand_built_features() -> list[np.ndarray]:
    conv = np.ones((10, 2, 5, 3), np.float32)  # 100 activations per channel
    conv[..., 0] = 0.0  # never active → dormant
    conv[..., 1] = 0.0
    conv[3, 1, 4, 1] = 0.5  # exactly 1 % active → NOT dormant at 0.01 (strictly below is dormant)
    pooled = np.zeros((100, 4), np.float32)  # 100 images
    pooled[7, 1] = 2.0  # exactly 1 %
    pooled[:, 2] = 0.3
    return [conv, pooled]  # dormant: conv ch0, pooled ch0 and ch3


def test_dormant_proportion_hand_built_with_threshold_boundary():
    feats = _hand_built_features()
    assert A.dormant_proportion(feats, 0.01) == pytest.approx(3 / 7)
    assert A.dormant_proportion(feats, 0.02) == pytest.approx(5 / 7)
    assert A.dormant_proportion(feats, 0.0) == 0.0
    activity = A.unit_activity(feats)
    np.testing.assert_allclose(activity[0], [0.0, 0.01, 1.0])
    np.testing.assert_allclose(activity[1], [0.0, 0.01, 1.0, 0.0])


def test_dormant_proportion_pooled_layer_counts_over_images_only():
    pooled = np.zeros((50, 2), np.float32)
    pooled[0, 0] = 1.0  # 2 % of images
    assert A.dormant_proportion([pooled], 0.02) == pytest.approx(0.5)
    assert A.dormant_proportion([pooled], 0.03) == pytest.approx(1.0)


def test_average_weight_magnitude_tiny_tree():
    tree = {"a": {"kernel": np.array([[1.0, -2.0], [3.0, -4.0]])}, "b": np.array([0.5, -0.5])}
    assert A.average_weight_magnitude(tree) == pytest.approx(11.0 / 6.0)


def test_accuracy_per_class_in_given_order():
    labels = np.array([2, 2, 0, 0, 0, 1])
    preds = np.array([2, 1, 0, 0, 1, 1])
    np.testing.assert_allclose(A.accuracy_per_class(preds, labels, [1, 2, 0]), [1.0, 0.5, 2 / 3])
    logits = np.eye(3)[preds]
    np.testing.assert_allclose(A.accuracy_per_class(logits, labels, [0, 1, 2]), [2 / 3, 1.0, 0.5])
    assert np.isnan(A.accuracy_per_class(preds, labels, [5])[0])


# ---------------------------------------------------------------------------------------------
# analysis of a tiny run
# ---------------------------------------------------------------------------------------------
def _config() -> dict:
    return make_config({
        "experiment_name": "tiny", "data_source": "embedded", "num_tasks": NUM_TASKS,
        "classes_per_task": CPT, "epochs_per_task": EPOCHS_PER_TASK, "train_images_per_class": N_TRAIN,
        "val_images_per_class": N_VAL, "test_images_per_class": N_TEST, "network_width": WIDTH,
        "train_batch_size": 4,
    }).to_dict()


def _fake_data() -> FullSplit:
    """A fake source's full split (no validation images taken out): what the analysis draws from."""
    rng = np.random.default_rng(0)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (K, n, 32, 32, 3), dtype=np.uint8)

    return FullSplit(train=images(N_FULL), test=images(N_TEST), names=tuple(map(str, range(K))), source="fake")


def _random_network(seed: int) -> tuple[dict, dict]:
    """Random (params, batch_stats) of the tiny ResNet-18 (shapes from eval_shape: no slow init compile)."""
    shapes = jax.eval_shape(lambda: ResNet18(WIDTH).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(np.float32), shapes["params"])
    stats = jax.tree_util.tree_map(lambda s: rng.uniform(0.1, 1.0, s.shape).astype(np.float32),
                                   shapes["batch_stats"])
    return params, stats


def _apply(params, batch_stats, images, train: bool):
    """((logits, features), ...) of an independent jitted forward pass with the model itself."""
    mutable = ["batch_stats"] if train else False
    fn = jax.jit(lambda p, b, x: ResNet18(WIDTH).apply({"params": p, "batch_stats": b}, normalize(x), train=train,
                                                       return_features=True, mutable=mutable))
    out = fn(params, batch_stats, images)
    return out[0] if train else out


def _write_run(exp_dir, index: int, finished: bool, num_classes: int = K, num_tasks: int = NUM_TASKS) -> None:
    order = np.random.default_rng(100 + index).permutation(num_classes)
    (exp_dir / "class_order").mkdir(parents=True, exist_ok=True)
    np.save(exp_dir / "class_order" / f"index-{index}.npy", order)
    num_epochs = num_tasks * EPOCHS_PER_TASK
    folder = ExperimentDir(exp_dir)
    folder.save_status(index, num_epochs if finished else 1, finished)
    if not finished:
        return
    for t in range(num_tasks + 1):
        params, bs = _random_network(10 * index + t)
        folder.save_snapshot(index, t * EPOCHS_PER_TASK, params, bs)


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    exp_dir = tmp_path_factory.mktemp("results") / "tiny"
    exp_dir.mkdir()
    (exp_dir / "config.json").write_text(json.dumps(_config()))
    _write_run(exp_dir, 0, True)
    _write_run(exp_dir, 1, True)
    _write_run(exp_dir, 2, False)
    data = _fake_data()
    messages: list[str] = []
    results = A.analyze_experiment(exp_dir, data=data, progress=False, log=messages.append)
    return SimpleNamespace(exp_dir=exp_dir, data=data, results=results, messages=messages)


def test_analysis_writes_every_file_with_the_right_shape_and_range(tiny_experiment):
    exp_dir = tiny_experiment.exp_dir
    assert sorted(tiny_experiment.results) == [0, 1]
    for index in (0, 1):
        loaded = {m: np.load(exp_dir / m / f"index-{index}.npy") for m in A.ANALYSIS_METRICS}
        for m, arr in loaded.items():
            expected = (K,) if m == "accuracy_per_class_in_order" else (NUM_TASKS,)
            assert arr.shape == expected, m
            assert arr.dtype == np.float32, m
            np.testing.assert_array_equal(arr, tiny_experiment.results[index][m])
        pooled_width = 8 * WIDTH
        for prefix in ("next_task", "previous_tasks"):
            start = 0 if prefix == "next_task" else 1
            dormant = loaded[f"{prefix}_dormant_units_analysis"][start:]
            erank = loaded[f"{prefix}_effective_rank_analysis"][start:]
            srank = loaded[f"{prefix}_stable_rank_analysis"][start:]
            assert np.all((dormant >= 0) & (dormant <= 1))
            assert np.all((erank >= 1) & (erank <= pooled_width))
            assert np.all((srank >= 1) & (srank <= pooled_width)) and np.all(srank == np.round(srank))
        for prefix in ("previous_tasks_dormant_units", "previous_tasks_effective_rank", "previous_tasks_stable_rank"):
            assert loaded[f"{prefix}_analysis"][0] == 0.0
        acc = loaded["accuracy_per_class_in_order"]
        assert np.all(np.isin(np.round(acc * N_TEST, 4), np.arange(N_TEST + 1)))
        for t in range(NUM_TASKS):
            params, _ = ExperimentDir(exp_dir).load_snapshot(index, t * EPOCHS_PER_TASK)
            assert loaded["weight_magnitude_analysis"][t] == pytest.approx(A.average_weight_magnitude(params), rel=1e-6)
    assert not (exp_dir / "weight_magnitude_analysis" / "index-2.npy").exists()
    assert any("index 2" in m and "unfinished" in m for m in tiny_experiment.messages)


def test_analysis_matches_an_independent_forward_pass(tiny_experiment):
    """Previous-tasks metrics of snapshot 1 and the final per-class accuracy, recomputed by hand."""
    exp_dir, data = tiny_experiment.exp_dir, tiny_experiment.data
    index = 1
    order = np.load(exp_dir / "class_order" / f"index-{index}.npy")
    params, bs = ExperimentDir(exp_dir).load_snapshot(index, EPOCHS_PER_TASK)
    images = A.sample_batch(data.train, order[:CPT], A.analysis_key(index, 1, A.ROLE_PREVIOUS))
    assert images.shape == (CPT * N_FULL, 32, 32, 3)  # fewer than 1,000 available: all of them
    _, feats = _apply(params, bs, images, train=True)
    assert len(feats) == 17
    written = tiny_experiment.results[index]
    assert written["previous_tasks_dormant_units_analysis"][1] == pytest.approx(A.dormant_proportion(feats), abs=1e-7)
    assert written["previous_tasks_effective_rank_analysis"][1] == pytest.approx(A.effective_rank(feats[-1]), rel=1e-5)
    assert written["previous_tasks_stable_rank_analysis"][1] == A.stable_rank(feats[-1])

    # one test batch holds every test image, so training-mode BN statistics do not depend on the order
    params, bs = ExperimentDir(exp_dir).load_snapshot(index, NUM_TASKS * EPOCHS_PER_TASK)
    test_images = data.test[order].reshape(-1, 32, 32, 3)
    labels = np.repeat(order, N_TEST)
    logits, _ = _apply(params, bs, test_images, train=True)
    active = np.full(100, -np.inf)
    active[order[:NUM_TASKS * CPT]] = 0.0  # the run's classes; all 100 outputs at the paper's scale
    expected = A.accuracy_per_class(np.asarray(logits) + active, labels, order)
    np.testing.assert_allclose(written["accuracy_per_class_in_order"], expected)


def test_predict_restricts_the_arg_max_to_the_given_classes(tiny_experiment):
    params, bs = ExperimentDir(tiny_experiment.exp_dir).load_snapshot(0, 0)
    images = tiny_experiment.data.test[0]
    free = A.predict(params, bs, images, WIDTH)
    logits, _ = _apply(params, bs, images, train=True)
    np.testing.assert_array_equal(free, np.argmax(logits, axis=-1))
    classes = [c for c in range(100) if c != free[0]][:3]
    assert set(A.predict(params, bs, images, WIDTH, classes=classes)) <= set(classes)


def test_eval_mode_uses_running_statistics(tiny_experiment):
    exp_dir, data = tiny_experiment.exp_dir, tiny_experiment.data
    params, bs = ExperimentDir(exp_dir).load_snapshot(0, EPOCHS_PER_TASK)
    images = data.train[0]
    _, feats = _apply(params, bs, images, train=False)
    _, pooled = A.snapshot_features(params, bs, images, WIDTH, bn_mode="eval")
    np.testing.assert_allclose(pooled, np.asarray(feats[-1]), rtol=1e-5, atol=1e-6)
    _, pooled_train = A.snapshot_features(params, bs, images, WIDTH, bn_mode="train")
    assert not np.allclose(pooled, pooled_train)


def test_rerun_gives_identical_numbers(tiny_experiment):
    exp_dir = tiny_experiment.exp_dir
    before = {m: (exp_dir / m / "index-0.npy").read_bytes() for m in A.ANALYSIS_METRICS}
    again = A.analyze_experiment(exp_dir, data=tiny_experiment.data, progress=False, indices=[0], log=lambda m: None)
    assert list(again) == [0]
    for m in A.ANALYSIS_METRICS:
        assert (exp_dir / m / "index-0.npy").read_bytes() == before[m], m
    assert not list(exp_dir.rglob("*.tmp"))


def test_missing_snapshot_is_a_one_line_error_naming_the_file(tiny_experiment, tmp_path):
    exp_dir = tmp_path / "copy"
    shutil.copytree(tiny_experiment.exp_dir, exp_dir)
    gone = ExperimentDir(exp_dir).snapshot_path(1, NUM_TASKS * EPOCHS_PER_TASK)
    shutil.rmtree(gone)
    with pytest.raises(A.AnalysisError) as err:
        A.analyze_experiment(exp_dir, data=tiny_experiment.data, progress=False, log=lambda m: None)
    assert str(gone) in str(err.value) and "\n" not in str(err.value)


def test_cli_analyses_with_the_configured_data_and_reports_errors(tiny_experiment, tmp_path, capsys):
    exp_dir = tmp_path / "cli"
    shutil.copytree(tiny_experiment.exp_dir, exp_dir)
    for m in A.ANALYSIS_METRICS:
        shutil.rmtree(exp_dir / m)
    assert analyze_cli.main(["--results-dir", str(exp_dir), "--bn-mode", "eval", "--no-progress"]) == 0
    for m in A.ANALYSIS_METRICS:
        assert sorted(p.name for p in (exp_dir / m).iterdir()) == ["index-0.npy", "index-1.npy"]
    assert "index 2" in capsys.readouterr().err

    assert analyze_cli.main(["--results-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nowhere" in err and "\n" not in err
    assert analyze_cli.main(["--results-dir", str(exp_dir), "--dormant-unit-threshold", "2"]) == 2
    assert "threshold" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the images the analysis draws: the source's full split, as the reference (semantics §9)
# ---------------------------------------------------------------------------------------------
def _experiment_of(tmp_path, num_classes: int, **keys) -> tuple:
    """An experiment folder with one finished run (random snapshots) of 2 tasks of 5 classes."""
    cfg = make_config({**_config(), "classes_per_task": 5, "train_batch_size": 5, **keys})
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    (exp_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    _write_run(exp_dir, 0, True, num_classes=num_classes, num_tasks=cfg.num_tasks)
    return cfg, exp_dir, np.load(exp_dir / "class_order" / "index-0.npy")


def _record_batches(monkeypatch) -> dict:
    """Replace the forward passes by recorders of what they are given (no compile, no compute)."""
    seen: dict = {"batches": [], "test": []}

    def metrics(params, batch_stats, images, width, threshold=0.01, bn_mode="train", activation="relu"):
        seen["batches"].append(np.asarray(images))
        return {"dormant": 0.0, "effective_rank": 1.0, "stable_rank": 1.0}

    def accuracy(params, batch_stats, test, class_order, key, width, bn_mode="train", **kwargs):
        seen["test"].append(np.asarray(test))
        return np.zeros(len(class_order), np.float32)

    monkeypatch.setattr(A, "representation_metrics", metrics)
    monkeypatch.setattr(A, "class_accuracy_on_test", accuracy)
    return seen


def _tagged_full_split(num_classes: int, per_class: int, per_class_test: int) -> FullSplit:
    """Images whose first pixels say (class, position in the class), so a drawn image is traceable."""
    def images(n: int) -> np.ndarray:
        x = np.zeros((num_classes, n, 32, 32, 3), np.uint8)
        x[..., 0, 0, 0] = np.arange(num_classes)[:, None]
        x[..., 0, 0, 1], x[..., 0, 0, 2] = np.divmod(np.arange(n), 256)
        return x

    return FullSplit(train=images(per_class), test=images(per_class_test), names=tuple(map(str, range(num_classes))),
                     source="tagged")


def _tags(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class, position in the class) of tagged images."""
    px = images[:, 0, 0].astype(np.int64)
    return px[:, 0], px[:, 1] * 256 + px[:, 2]


def test_batches_hold_1000_images_of_the_full_training_split_whatever_the_runs_own_split(tmp_path, monkeypatch):
    """The scaled protocol's own split (10 validation + 36 training images per class, 20 test) would
    give 230 images for a task of 5 classes; the analysis loads the full split (500 per class) and
    draws 1,000, from anywhere in it, and evaluates the per-class accuracy on all 100 test images."""
    cfg, exp_dir, order = _experiment_of(tmp_path, 10, data_source="cifar100", data_path="nowhere",
                                         train_images_per_class=36, val_images_per_class=10,
                                         test_images_per_class=20)
    full = _tagged_full_split(10, 500, 100)
    asked = []
    monkeypatch.setattr("lop_jax.data.load_full_split", lambda c: asked.append(c) or full)
    seen = _record_batches(monkeypatch)
    messages: list[str] = []
    A.analyze_experiment(exp_dir, progress=False, log=messages.append)
    assert [c.data_source for c in asked] == ["cifar100"]
    next0, next1, previous1 = seen["batches"]  # snapshot 0: next task; snapshot 1: next, previous tasks
    for batch, classes in ((next0, order[:5]), (next1, order[5:10]), (previous1, order[:5])):
        assert batch.shape == (1000, 32, 32, 3)
        label, position = _tags(batch)
        assert set(label) <= set(classes)
        assert len(set(zip(label, position, strict=True))) == 1000  # without replacement
        assert position.max() >= 46  # images beyond the run's own validation + training slice
        assert np.mean(position >= 46) > 0.8  # 454 of every 500 candidates lie there
    assert seen["test"][0].shape[1] == 100
    assert not messages  # the reference's sizes: nothing to say
    # the same run index draws the same batches again
    again = _record_batches(monkeypatch)
    A.analyze_experiment(exp_dir, data=full, progress=False, log=messages.append)
    for a, b in zip(seen["batches"], again["batches"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_real_cifar100_gives_batches_of_its_500_images_per_class(tmp_path, monkeypatch, real_data_dir):
    """With data=None the real data set is read in full: batches of 1,000 real training images of the
    task's classes, most of them outside the run's own (10 + 36 per class) slice."""
    cfg, exp_dir, order = _experiment_of(tmp_path, 100, data_source="cifar100", data_path="nowhere", num_tasks=2,
                                         train_images_per_class=36, val_images_per_class=10,
                                         test_images_per_class=20)
    seen = _record_batches(monkeypatch)
    A.analyze_experiment(exp_dir, data_dir=real_data_dir.parent, progress=False, log=lambda m: None)
    own = load_data(make_config({**cfg.to_dict(), "data_path": str(real_data_dir.parent)}))
    assert own.train.shape[1] + own.val.shape[1] == 46
    batch = seen["batches"][0]
    assert batch.shape == (1000, 32, 32, 3)
    classes = order[:5]
    own_images = {im.tobytes() for k in classes for im in np.concatenate([own.val[k], own.train[k]])}
    from lop_jax.data import load_full_split

    full = load_full_split(make_config({**cfg.to_dict(), "data_path": str(real_data_dir.parent)}))
    candidates = {im.tobytes() for k in classes for im in full.train[k]}
    drawn = [im.tobytes() for im in batch]
    assert set(drawn) <= candidates and len(candidates) == 2500
    assert sum(d not in own_images for d in drawn) > 800
    assert seen["test"][0].shape == (100, 100, 32, 32, 3)


def test_the_embedded_subset_gives_what_it_has_and_the_analysis_says_so(tmp_path, monkeypatch):
    """60 training images per class: batches of 300 images for a task of 5 classes, and a logged line
    naming that size (and the 20 test images per class)."""
    _, exp_dir, order = _experiment_of(tmp_path, 20, data_source="embedded")
    seen = _record_batches(monkeypatch)
    messages: list[str] = []
    A.analyze_experiment(exp_dir, progress=False, log=messages.append)
    assert [b.shape[0] for b in seen["batches"]] == [300, 300, 300]
    assert seen["test"][0].shape[1] == 20
    note = [m for m in messages if "images per batch" in m]
    assert len(note) == 1 and "next task 300" in note[0] and "previous tasks 300" in note[0] and "1,000" in note[0]
    assert "20 test" in note[0]


def test_a_runs_own_split_is_refused_as_analysis_data(tiny_experiment):
    data = tiny_experiment.data
    own = SimpleNamespace(train=data.train, val=data.train, test=data.test)
    with pytest.raises(A.AnalysisError, match="full split"):
        A.analyze_experiment(tiny_experiment.exp_dir, data=own, progress=False, log=lambda m: None)
