"""Figures and summary table from (synthetic) results directories of two runs per algorithm."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from experiments import plot as plot_cli
from lop_jax import plots
from lop_jax.analysis import ANALYSIS_METRICS
from lop_jax.config import make_config

NUM_TASKS, CPT, EPOCHS_PER_TASK, WIDTH, K = 2, 2, 3, 2, 5  # representation width 16
ALGORITHMS = ("base_deep_learning_system", "continual_backpropagation", "retrained_network")
SCALE = plots.Scale(NUM_TASKS, CPT, EPOCHS_PER_TASK, WIDTH)

# test accuracy per epoch of runs 0 and 1: best of task 1 / task 2
BASE_ACC = {0: [0.1, 0.5, 0.3, 0.2, 0.6, 0.4], 1: [0.7, 0.2, 0.3, 0.1, 0.2, 0.4]}  # 50/60 and 70/40 %
RETRAINED_ACC = {0: [0.2, 0.6, 0.3, 0.7, 0.1, 0.1], 1: [0.6, 0.6, 0.6, 0.5, 0.5, 0.5]}  # 60/70 and 60/50 %


def _write_experiment(root, name: str, acc: dict[int, list[float]], analysed: bool = True) -> None:
    exp = root / name
    cfg = make_config({"experiment_name": name, "num_tasks": NUM_TASKS, "classes_per_task": CPT,
                       "epochs_per_task": EPOCHS_PER_TASK, "network_width": WIDTH,
                       "train_images_per_class": 6, "train_batch_size": 4})
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(json.dumps(cfg.to_dict()))
    rng = np.random.default_rng(len(name))
    runs = dict(acc)
    runs[2] = [0.99] * (NUM_TASKS * EPOCHS_PER_TASK)  # an unfinished run: must be left out
    for index, values in runs.items():
        arrays = {"test_accuracy_per_epoch": np.array(values, np.float32),
                  "test_loss_per_epoch": np.linspace(3.0, 1.0, NUM_TASKS * EPOCHS_PER_TASK).astype(np.float32)}
        if analysed:
            for m in ANALYSIS_METRICS:
                n = K if m == "accuracy_per_class_in_order" else NUM_TASKS
                values_m = rng.uniform(0.0, 1.0, n)
                if "rank" in m:
                    values_m = rng.integers(1, 17, n)
                if m.startswith("previous_tasks"):
                    values_m[0] = 0
                arrays[m] = values_m.astype(np.float32)
        for m, a in arrays.items():
            (exp / m).mkdir(exist_ok=True)
            np.save(exp / m / f"index-{index}.npy", a)
        (exp / "run_status").mkdir(exist_ok=True)
        (exp / "run_status" / f"index-{index}.json").write_text(
            json.dumps({"finished": index != 2, "epochs_done": NUM_TASKS * EPOCHS_PER_TASK}))


@pytest.fixture
def results_dir(tmp_path):
    root = tmp_path / "results"
    _write_experiment(root, "base_deep_learning_system", BASE_ACC)
    _write_experiment(root, "continual_backpropagation", BASE_ACC)
    _write_experiment(root, "retrained_network", RETRAINED_ACC)
    return root


# ---------------------------------------------------------------------------------------------
# per-task values
# ---------------------------------------------------------------------------------------------
def test_per_task_values_of_every_kind():
    x, v = plots.per_task_values("test_accuracy_per_epoch", np.array(BASE_ACC[0]), SCALE)
    np.testing.assert_array_equal(x, [2, 4])
    np.testing.assert_allclose(v, [50.0, 60.0])
    _, v = plots.per_task_values("test_loss_per_epoch", np.array([3, 1, 2, 0.5, 4, 1.0]), SCALE)
    np.testing.assert_allclose(v, [1.0, 0.5])
    x, v = plots.per_task_values("next_task_stable_rank_analysis", np.array([8.0, 16.0]), SCALE)
    np.testing.assert_array_equal(x, [2, 4])
    np.testing.assert_allclose(v, [50.0, 100.0])
    _, v = plots.per_task_values("next_task_effective_rank_analysis", np.array([4.0, 2.0]), SCALE)
    np.testing.assert_allclose(v, [25.0, 12.5])
    x, v = plots.per_task_values("previous_tasks_dormant_units_analysis", np.array([0.0, 0.25]), SCALE)
    np.testing.assert_array_equal(x, [2])
    np.testing.assert_allclose(v, [25.0])
    _, v = plots.per_task_values("weight_magnitude_analysis", np.array([0.1, 0.2]), SCALE)
    np.testing.assert_allclose(v, [0.1, 0.2])
    _, v = plots.per_task_values("accuracy_per_class_in_order", np.array([1.0, 0.5, 0.0, 1.0, 0.9]), SCALE)
    np.testing.assert_allclose(v, [75.0, 50.0])
    with pytest.raises(plots.PlotError, match="epochs"):
        plots.per_task_values("test_accuracy_per_epoch", np.zeros(5), SCALE)


def test_paper_scale_without_config():
    scale = plots.Scale()
    assert (scale.num_tasks, scale.classes_per_task, scale.epochs_per_task, scale.representation_width) == \
        (20, 5, 200, 512)
    x, v = plots.per_task_values("next_task_stable_rank_analysis", np.full(20, 384.0), scale)
    assert x[0] == 5 and x[-1] == 100
    np.testing.assert_allclose(v, 75.0)


def test_curves_mean_standard_error_and_finished_runs_only(results_dir):
    curves = plots.metric_curves(results_dir, ["base_deep_learning_system"], "test_accuracy_per_epoch")
    c = curves["base_deep_learning_system"]
    assert c.indices == [0, 1]  # index 2 is unfinished
    np.testing.assert_allclose(c.mean, [60.0, 50.0])
    np.testing.assert_allclose(c.standard_error, [10.0, 10.0])  # std(ddof=1) / sqrt(2)


def test_relative_accuracy_pairs_runs_with_the_retrained_network(results_dir):
    curves = plots.metric_curves(results_dir, ALGORITHMS, "relative_accuracy_per_epoch")
    assert sorted(curves) == ["base_deep_learning_system", "continual_backpropagation"]
    np.testing.assert_allclose(curves["base_deep_learning_system"].values, [[-10.0, -10.0], [10.0, -10.0]],
                               atol=1e-4)
    with pytest.raises(plots.PlotError, match="retrained_network"):
        plots.metric_curves(results_dir, ALGORITHMS[:2], "relative_accuracy_per_epoch")


def test_reference_quirk_drops_the_lowest_index_of_next_task_metrics(results_dir):
    m = "next_task_dormant_units_analysis"
    full = plots.metric_curves(results_dir, ALGORITHMS[:1], m)[ALGORITHMS[0]]
    quirk = plots.metric_curves(results_dir, ALGORITHMS[:1], m, drop_first_next_index=True)[ALGORITHMS[0]]
    assert full.indices == [0, 1] and quirk.indices == [1]
    np.testing.assert_allclose(quirk.values[0], full.values[1])


def test_missing_analysis_is_a_clear_error(tmp_path):
    _write_experiment(tmp_path, "base_deep_learning_system", BASE_ACC, analysed=False)
    with pytest.raises(plots.PlotError, match="experiments.analyze"):
        plots.metric_curves(tmp_path, ["base_deep_learning_system"], "next_task_stable_rank_analysis")
    with pytest.raises(plots.PlotError, match="does not exist"):
        plots.metric_curves(tmp_path, ["nope"], "test_accuracy_per_epoch")


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def _assert_figure(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000, path
    if path.suffix == ".png":
        assert data.startswith(b"\x89PNG")
    else:
        assert b"<svg" in data[:2000]


def test_plot_all_writes_every_figure_and_the_summary(results_dir, tmp_path):
    out = tmp_path / "figures"
    messages: list[str] = []
    written = plots.plot_all(results_dir, ALGORITHMS, out, log=messages.append)
    assert messages == []
    for name in plots.PLOT_METRICS + (plots.SUMMARY_NAME,):
        for suffix in (".png", ".svg"):
            assert out / f"{name}{suffix}" in written
            _assert_figure(out / f"{name}{suffix}")
    assert len(written) == 2 * (len(plots.PLOT_METRICS) + 1)


def test_plot_all_without_the_baseline_skips_relative_accuracy(results_dir, tmp_path):
    out = tmp_path / "figures"
    messages: list[str] = []
    plots.plot_all(results_dir, ALGORITHMS[:2], out, log=messages.append)
    assert len(messages) == 1 and "relative_accuracy_per_epoch" in messages[0]
    assert not (out / "relative_accuracy_per_epoch.png").exists()
    _assert_figure(out / "summary.png")  # first panel falls back to test accuracy


def test_colours_follow_the_paper():
    colors = plots.algorithm_colors(list(ALGORITHMS) + ["head_resetting", "shrink_and_perturb", "mine"])
    assert colors["base_deep_learning_system"] == "#d62728"
    assert colors["continual_backpropagation"] == "#1f77b4"
    assert colors["head_resetting"] == "#2ca02c"
    assert colors["shrink_and_perturb"] == "#ff7f0e"
    assert colors["retrained_network"] == "#7f7f7f"
    assert colors["mine"] not in plots.PAPER_COLORS.values()


# ---------------------------------------------------------------------------------------------
# table and command line
# ---------------------------------------------------------------------------------------------
def test_summary_table_values_text_and_csv(results_dir, tmp_path):
    rows = {r["algorithm"]: r for r in plots.summary_table(results_dir, ALGORITHMS)}
    base = rows["base_deep_learning_system"]
    assert base["n"] == 2 and base["n_analysed"] == 2 and base["classes"] == NUM_TASKS * CPT
    assert base["accuracy"] == pytest.approx((50.0, 10.0))
    assert base["relative_accuracy"] == pytest.approx((-10.0, 0.0), abs=1e-4)
    assert rows["retrained_network"]["relative_accuracy"] is None
    base_dir = results_dir / "base_deep_learning_system"
    srank = [np.load(base_dir / "next_task_stable_rank_analysis" / f"index-{i}.npy")[-1] for i in (0, 1)]
    assert base["stable_rank_percent"][0] == pytest.approx(100.0 * np.mean(srank) / 16)
    erank = [np.load(base_dir / "next_task_effective_rank_analysis" / f"index-{i}.npy")[-1] for i in (0, 1)]
    assert base["effective_rank"][0] == pytest.approx(np.mean(erank), rel=1e-6)

    text = plots.format_table(list(rows.values()))
    assert all(a in text for a in ALGORITHMS) and "50.00 ± 10.00" in text
    path = plots.write_table_csv(list(rows.values()), tmp_path / "t.csv")
    with open(path) as f:
        table = {r["algorithm"]: r for r in csv.DictReader(f)}
    assert float(table["base_deep_learning_system"]["accuracy_mean"]) == pytest.approx(50.0)
    assert table["retrained_network"]["relative_accuracy_mean"] == ""


def test_cli_figure_and_table(results_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = plot_cli.main(["--results-dir", str(results_dir), "--algorithms", ",".join(ALGORITHMS),
                          "--metric", "relative_accuracy_per_epoch", "--output-dir", str(out), "--table"])
    assert code == 0
    _assert_figure(out / "relative_accuracy_per_epoch.svg")
    assert (out / "summary_table.csv").is_file() and (out / "summary_table.txt").is_file()
    assert "continual_backpropagation" in capsys.readouterr().out


def test_cli_relative_accuracy_without_baseline_is_a_one_line_error(results_dir, tmp_path, capsys):
    code = plot_cli.main(["--results-dir", str(results_dir), "--algorithms", "base_deep_learning_system",
                          "--metric", "relative_accuracy_per_epoch", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "retrained_network" in err and "\n" not in err
    assert not (tmp_path / "o" / "relative_accuracy_per_epoch.png").exists()
    assert plot_cli.main(["--results-dir", str(results_dir), "--algorithms", "base_deep_learning_system"]) == 2


def test_cli_metric_choices_match_the_library():
    assert plot_cli.METRIC_CHOICES == plots.PLOT_METRICS + ("summary", "all")
