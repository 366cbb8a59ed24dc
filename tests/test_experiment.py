"""The smoke run end to end (semantics §1, §5, §8), its determinism, and the command line."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT

from experiments.run import main
from lop_jax.config import ConfigError, load_config
from lop_jax.data import load_data
from lop_jax.experiment import run_experiment
from lop_jax.model import ResNet18, count_params, init_model
from lop_jax.plan import make_plan
from lop_jax.results import ExperimentDir, ResultsError
from lop_jax.run_axis import stack_states
from lop_jax.train import make_evaluate, task_data

SMOKE = REPO_ROOT / "configs" / "smoke.json"
EPOCH_METRICS = ("test_loss_per_epoch", "test_accuracy_per_epoch", "test_evaluation_runtime",
                 "validation_loss_per_epoch", "validation_accuracy_per_epoch", "validation_evaluation_runtime",
                 "epoch_runtime")
STEP_METRICS = ("train_loss_per_checkpoint", "train_accuracy_per_checkpoint")
RUNTIMES = ("test_evaluation_runtime", "validation_evaluation_runtime", "epoch_runtime")
ALL_METRICS = EPOCH_METRICS + STEP_METRICS + ("class_order",)


def _arrays(exp_dir, index):
    return {m: np.load(exp_dir / m / f"index-{index}.npy") for m in ALL_METRICS}


def load_snapshot(exp_dir, index, epoch):
    return ExperimentDir(exp_dir).load_snapshot(index, epoch)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Index 0 twice (two results dirs) and index 1 beside the first: one compiled set of steps per run."""
    out = {}
    for name, index in (("a", 0), ("b", 0), ("a", 1)):
        root = tmp_path_factory.getbasetemp() / f"results_{name}"
        cfg = load_config(SMOKE, {"results_dir": str(root)})
        run_experiment(cfg, index, progress=False)
        out[(name, index)] = (cfg, root / cfg.experiment_name)
    return out


def test_smoke_writes_every_results_file_with_the_right_shapes(smoke):
    cfg, exp_dir = smoke[("a", 0)]
    data = load_data(cfg)
    assert cfg.num_epochs == 4 and cfg.train_summaries == 12  # the smoke config: 2 tasks × 2 epochs
    a = _arrays(exp_dir, 0)
    for m in EPOCH_METRICS:
        assert a[m].shape == (cfg.num_tasks * cfg.epochs_per_task,), m
        assert np.all(np.isfinite(a[m])), m
    for m in STEP_METRICS:
        assert a[m].shape == (cfg.train_summaries,), m
    # every summary slot was written: a mean training loss is > 0, accuracies are fractions
    assert np.all(a["train_loss_per_checkpoint"] > 0)
    for m in ("test_loss_per_epoch", "validation_loss_per_epoch"):
        assert np.all(a[m] > 0), m
    for m in ("test_accuracy_per_epoch", "validation_accuracy_per_epoch", "train_accuracy_per_checkpoint"):
        assert np.all((a[m] >= 0) & (a[m] <= 1)), m
    for m in RUNTIMES:
        assert np.all(a[m] > 0), m
    assert a["class_order"].shape == (data.num_classes,)
    assert sorted(a["class_order"].tolist()) == list(range(data.num_classes))


def test_smoke_config_and_status(smoke):
    cfg, exp_dir = smoke[("a", 0)]
    stored = json.loads((exp_dir / "config.json").read_text())
    assert stored == cfg.to_dict()
    assert stored["network_width"] == 4 and stored["results_dir"] == str(exp_dir.parent)
    assert ExperimentDir(exp_dir).read_config() == cfg
    status = json.loads((exp_dir / "run_status" / "index-0.json").read_text())
    assert status["finished"] is True and status["epochs_done"] == cfg.num_epochs


def test_smoke_snapshots_at_task_boundaries(smoke):
    cfg, exp_dir = smoke[("a", 0)]
    e = cfg.epochs_per_task
    snaps = sorted(p.name for p in (exp_dir / "model_parameters" / "index-0").iterdir())
    assert snaps == sorted(f"epoch-{k}" for k in (0, e, 2 * e))
    shapes = jax.eval_shape(lambda: init_model(ResNet18(width=cfg.network_width), jax.random.PRNGKey(0)))
    p0, s0 = load_snapshot(exp_dir, 0, 0)
    assert jax.tree_util.tree_structure(p0) == jax.tree_util.tree_structure(shapes[0])
    assert jax.tree_util.tree_map(np.shape, p0) == jax.tree_util.tree_map(lambda x: x.shape, shapes[0])
    assert jax.tree_util.tree_map(np.shape, s0) == jax.tree_util.tree_map(lambda x: x.shape, shapes[1])
    # epoch 0 is the untrained network: zero biases, fresh BatchNorm statistics
    np.testing.assert_array_equal(p0["fc"]["bias"], 0.0)
    np.testing.assert_array_equal(s0["stem_bn"]["var"], 1.0)
    p1, s1 = load_snapshot(exp_dir, 0, e)
    assert not np.array_equal(p1["fc"]["bias"], p0["fc"]["bias"])
    assert not np.array_equal(s1["stem_bn"]["var"], s0["stem_bn"]["var"])
    with pytest.raises(ResultsError, match="epoch-1"):
        load_snapshot(exp_dir, 0, 1)


def test_smoke_snapshot_is_the_best_validation_network(smoke):
    # Early stopping (semantics §5): the network saved at the end of task t is the one of that task's first epoch with
    # the highest validation accuracy (strictly greater replaces), BatchNorm statistics included, so evaluating it
    # again gives that epoch's validation accuracy AND loss (the loss tells the epochs' networks apart).
    cfg, exp_dir = smoke[("a", 0)]
    a = _arrays(exp_dir, 0)
    data = load_data(cfg)
    evaluate = make_evaluate(cfg, cfg.val_batch_size, False)
    e = cfg.epochs_per_task
    checked = 0
    for task in range(cfg.num_tasks):
        accs = a["validation_accuracy_per_epoch"][task * e:(task + 1) * e]
        if accs.max() == 0:
            continue  # no copy was ever kept in this task; nothing to compare
        best = task * e + int(np.argmax(accs))  # the first epoch reaching the maximum
        params, stats = stack_states([load_snapshot(exp_dir, 0, (task + 1) * e)])  # the run as a stack of one
        val = task_data(jnp.asarray(data.val), jnp.asarray(a["class_order"])[None], cfg.active_classes(task))
        loss, acc = (v[0] for v in evaluate(params, stats, val, jax.random.PRNGKey(0)[None],
                                            n_active=cfg.active_classes(task)))
        assert np.float32(acc) == a["validation_accuracy_per_epoch"][best], task
        assert float(loss) == pytest.approx(float(a["validation_loss_per_epoch"][best]), rel=1e-5), task
        others = [ep for ep in range(task * e, (task + 1) * e) if ep != best]
        assert all(abs(float(loss) / a["validation_loss_per_epoch"][ep] - 1) > 1e-4 for ep in others), task
        checked += 1
    assert checked >= 1


def test_same_index_is_bit_identical(smoke):
    _, dir_a = smoke[("a", 0)]
    _, dir_b = smoke[("b", 0)]
    a, b = _arrays(dir_a, 0), _arrays(dir_b, 0)
    for m in ALL_METRICS:
        if m not in RUNTIMES:
            np.testing.assert_array_equal(a[m], b[m], err_msg=m)
    for epoch in (2, 4):
        pa, sa = load_snapshot(dir_a, 0, epoch)
        pb, sb = load_snapshot(dir_b, 0, epoch)
        for x, y in zip(jax.tree_util.tree_leaves((pa, sa)), jax.tree_util.tree_leaves((pb, sb)), strict=True):
            np.testing.assert_array_equal(x, y)


def test_different_indices_differ_and_share_the_directory(smoke):
    _, exp_dir = smoke[("a", 0)]
    a0, a1 = _arrays(exp_dir, 0), _arrays(exp_dir, 1)
    assert not np.array_equal(a0["class_order"], a1["class_order"])
    assert not np.array_equal(a0["train_loss_per_checkpoint"], a1["train_loss_per_checkpoint"])
    assert json.loads((exp_dir / "run_status" / "index-1.json").read_text())["finished"] is True


def test_config_mismatch_is_refused_and_keeps_the_old_config(smoke):
    cfg, exp_dir = smoke[("a", 0)]
    before = (exp_dir / "config.json").read_bytes()
    other = load_config(SMOKE, {"results_dir": cfg.results_dir, "stepsize": 0.05})
    with pytest.raises(ConfigError, match="stepsize"):
        run_experiment(other, 2, progress=False)
    assert (exp_dir / "config.json").read_bytes() == before
    assert not (exp_dir / "run_status" / "index-2.json").exists()


def test_write_config_mismatch_names_every_differing_key(tmp_path):
    cfg = load_config(SMOKE, {"results_dir": str(tmp_path)})
    folder = ExperimentDir.of(cfg)
    exp_dir = folder.path
    assert exp_dir == tmp_path / cfg.experiment_name
    folder.write_config(cfg)
    before = (exp_dir / "config.json").read_bytes()
    with pytest.raises(ConfigError) as info:
        folder.write_config(load_config(SMOKE, {"results_dir": str(tmp_path), "num_tasks": 3, "momentum": 0.5}))
    assert "num_tasks" in str(info.value) and "momentum" in str(info.value)
    assert "stepsize" not in str(info.value)
    assert (exp_dir / "config.json").read_bytes() == before
    # the locations (data_path, results_dir, num_workers) may differ between runs of one experiment
    folder.write_config(load_config(SMOKE, {"results_dir": str(tmp_path), "data_path": "/elsewhere"}))
    assert (exp_dir / "config.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# the command line


def _plan_number(text, label):
    m = re.search(r"^\s*" + label + r":\s*([\d,]+)\s*$", text, re.M)
    assert m, (label, text)
    return int(m.group(1).replace(",", ""))


def test_cli_dry_run_prints_the_plan(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["--config", "configs/smoke.json", "--dry-run", "--results-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0
    cfg = load_config(SMOKE)
    shapes = jax.eval_shape(lambda: init_model(ResNet18(width=cfg.network_width), jax.random.PRNGKey(0)))
    assert _plan_number(out, "trainable parameters") == count_params(shapes[0])
    assert _plan_number(out, "tasks") == 2 and _plan_number(out, "epochs") == 4
    assert _plan_number(out, "training steps") == (4 + 8) * 2
    assert _plan_number(out, "training images in all") == (4 + 8) * 2 * 25
    assert "network_width" in out and "embedded" in out
    assert not (tmp_path / "r").exists()  # nothing written by a dry run


def test_cli_dry_run_paper_config_without_data(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["--config", "configs/base_deep_learning_system.json", "--dry-run",
               "--data-dir", str(tmp_path / "no_data"), "--results-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0
    assert _plan_number(out, "trainable parameters") == 11_224_932
    assert _plan_number(out, "training steps") == sum(25 * t * 200 for t in range(1, 21))
    assert re.search(r"num_workers.*no effect", out)  # said once
    assert len(re.findall(r"no effect", out)) == 1
    assert not (tmp_path / "no_data").exists() and not (tmp_path / "r").exists()


def test_make_plan_paper():
    plan = make_plan(load_config(REPO_ROOT / "configs" / "continual_backpropagation.json"))
    assert (plan.tasks, plan.epochs, plan.trainable_parameters, plan.feature_units) == (20, 4000, 11_224_932, 3904)
    assert plan.training_images == 200 * sum(2250 * t for t in range(1, 21))


@pytest.mark.parametrize("override,key", [
    ('stepsize="fast"', "stepsize"),
    ("stepsize=fast", "stepsize"),
    ("use_cbp=1", "use_cbp"),
    ("bogus_key=1", "bogus_key"),
    ("num_tasks=30", "num_tasks"),
])
def test_cli_bad_set_returns_2_naming_the_key(override, key, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["--config", "configs/smoke.json", "--dry-run", "--results-dir", str(tmp_path), "--set", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert key in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_set_overrides_are_applied(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["--config", "configs/smoke.json", "--dry-run", "--results-dir", str(tmp_path),
               "--set", "num_tasks=3", "--set", 'experiment_name="renamed"', "--set", "network_width=2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert _plan_number(out, "tasks") == 3
    assert "renamed" in out
    cfg = load_config(SMOKE, {"network_width": 2})
    shapes = jax.eval_shape(lambda: init_model(ResNet18(width=2), jax.random.PRNGKey(0)))
    assert cfg.network_width == 2
    assert _plan_number(out, "trainable parameters") == count_params(shapes[0])


def test_cli_missing_config_and_mismatch_return_2(capsys, monkeypatch, tmp_path, smoke):
    monkeypatch.chdir(REPO_ROOT)
    assert main(["--config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    cfg, exp_dir = smoke[("a", 0)]
    before = (exp_dir / "config.json").read_bytes()
    rc = main(["--config", "configs/smoke.json", "--results-dir", cfg.results_dir, "--experiment-index", "3",
               "--set", "weight_decay=0.001"])
    assert rc == 2 and "weight_decay" in capsys.readouterr().err
    assert (exp_dir / "config.json").read_bytes() == before


def test_cli_unwritable_results_is_one_line_and_keeps_the_old_files(capsys, monkeypatch, smoke):
    import lop_jax.results as results_module

    cfg, exp_dir = smoke[("a", 0)]
    before = {p: p.read_bytes() for p in exp_dir.glob("*/index-0.npy")}

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(results_module, "atomic_write_bytes", refuse)
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["--config", "configs/smoke.json", "--results-dir", cfg.results_dir, "--experiment-index", "0"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not the bar
    assert rc == 1 and len(err) == 1 and "cannot write the results" in err[0] and "Permission denied" in err[0]
    assert "Traceback" not in "\n".join(err)
    assert {p: p.read_bytes() for p in exp_dir.glob("*/index-0.npy")} == before


def test_cli_second_interrupt_exits_130_with_a_resume_hint(capsys, monkeypatch, tmp_path):
    import lop_jax.experiment as experiment_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment_module, "run_experiments", interrupted)
    monkeypatch.chdir(REPO_ROOT)
    assert main(["--config", "configs/smoke.json", "--results-dir", str(tmp_path)]) == 130
    assert "run the same command to resume" in capsys.readouterr().err


def test_cli_verbose_lines_and_progress_bar(capsys, monkeypatch, tmp_path):
    """--verbose: one line per epoch (test/validation accuracy, epoch time) and the running train
    accuracy every running_avg_window steps; without it a tqdm bar with the task, accuracy and ETA."""
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_config(SMOKE)
    assert main(["--config", "configs/smoke.json", "--results-dir", str(tmp_path / "v"), "--verbose"]) == 0
    captured = capsys.readouterr()
    epoch_lines = re.findall(r"epoch (\d+) \(task (\d+)\): test accuracy (\d\.\d{4}), validation accuracy "
                             r"(\d\.\d{4}), epoch run time (\d+\.\d\d) s", captured.out)
    assert [(int(e), int(t)) for e, t, *_ in epoch_lines] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    saved = np.load(tmp_path / "v" / cfg.experiment_name / "test_accuracy_per_epoch" / "index-0.npy")
    np.testing.assert_allclose([float(line[2]) for line in epoch_lines], saved, atol=5e-5)
    w = cfg.running_avg_window  # the reference numbers the step within the epoch
    expected = [s for t in range(cfg.num_tasks) for _ in range(cfg.epochs_per_task)
                for s in range(w, cfg.steps_per_epoch(t) + 1, w)]
    summaries = re.findall(r"step (\d+): running train accuracy (\d\.\d{4})", captured.out)
    assert [int(s) for s, _ in summaries] == expected
    assert "it/s" not in captured.err  # no bar in verbose mode

    assert main(["--config", "configs/smoke.json", "--results-dir", str(tmp_path / "q")]) == 0
    captured = capsys.readouterr()
    assert "epoch 1 (task 1)" not in captured.out and "running train accuracy" not in captured.out
    bar = captured.err.replace("\r", "\n")
    assert re.search(r"4/4 \[[0-9:]+<[0-9:]+", bar), bar  # epochs done/total, elapsed<ETA
    assert re.search(r"task=2, test_acc=\d\.\d{3}, val_acc=\d\.\d{3}", bar), bar
