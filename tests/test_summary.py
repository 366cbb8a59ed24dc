"""What a run says when it ends (lop_jax.summary, printed by experiments.run): the per-task table read
back from the saved arrays, the methods' arrays as columns, the times, the folder and next commands
that work as printed."""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
from conftest import write_replacing_cbp_config

from experiments import plot as plot_cli
from experiments import report as report_cli
from experiments import run as run_cli
from lop_jax.config import make_config
from lop_jax.results import ExperimentDir, ResultsError
from lop_jax.summary import format_duration, index_label, summarize, task_table

CFG = make_config({"num_tasks": 2, "classes_per_task": 2, "epochs_per_task": 3, "network_width": 2,
                   "train_images_per_class": 4, "train_batch_size": 4, "data_source": "embedded",
                   "experiment_name": "tiny"})
TEST = {0: [0.1, 0.5, 0.3, 0.2, 0.6, 0.4], 1: [0.3, 0.2, 0.1, 0.4, 0.1, 0.1]}
VAL = {0: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 1: [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]}


def _tiny(tmp_path, epochs_done: int = 6) -> ExperimentDir:
    folder = ExperimentDir(tmp_path / "tiny")
    folder.write_config(CFG)
    for i in (0, 1):
        folder.save_metric("test_accuracy_per_epoch", i, np.array(TEST[i], np.float32))
        folder.save_metric("validation_accuracy_per_epoch", i, np.array(VAL[i], np.float32))
        folder.save_metric("epoch_runtime", i, np.full(6, 2.0, np.float32))
        folder.save_metric("test_evaluation_runtime", i, np.full(6, 0.5, np.float32))
        # a method's count per epoch and feature layer, a float per task boundary, and a misfit (left out)
        folder.save_metric("replaced_units_per_epoch", i, np.arange(12, dtype=np.int64).reshape(6, 2) + i)
        folder.save_metric("dormant_fraction_per_task", i, np.array([[0.25 + i, 0.75]], np.float32))
        folder.save_metric("odd_per_epoch", i, np.zeros(5, np.float32))
        folder.save_status(i, epochs_done, epochs_done == 6)
    return folder


def test_the_table_reads_the_arrays_and_the_methods_columns(tmp_path):
    folder = _tiny(tmp_path)
    summary = summarize(folder)
    assert summary.indices == [0, 1] and summary.epochs_done == 6
    headers, rows = task_table(summary)
    assert headers == ["task", "classes", "best test accuracy (%)", "final validation accuracy (%)",
                       "dormant fraction (at the task's end)", "replaced units"]
    # task 1: best 50 and 30 -> 40 ± 10; final validation 40 and 20 -> 30 ± 10; replaced: epochs 0-2 of
    # [[0, 1], [2, 3], [4, 5]] (+1 each for run 1) = 15 and 21 -> 18 ± 3; dormant: mean(0.25, 0.75) and 1.0
    assert rows[0] == ["1", "2", "40.0 ± 10.0", "30.0 ± 10.0", "0.750 ± 0.250", "18 ± 3"]
    # task 2: best 60 and 40; final validation 70 and 30; replaced 51 and 57; no boundary after the last task
    assert rows[1] == ["2", "4", "50.0 ± 10.0", "50.0 ± 20.0", "-", "54 ± 3"]
    assert summary.recorded_seconds == {0: 15.0, 1: 15.0}  # 6 × (2 + 0.5); no validation time recorded
    assert summary.total_seconds == 15.0  # the same times: trained together, counted once
    folder.save_metric("epoch_runtime", 1, np.full(6, 1.0, np.float32))
    assert summarize(folder).total_seconds == 15.0 + 9.0

    one = task_table(summarize(folder, [1]))[1]
    assert one[0][2:] == ["30.0", "20.0", "1.000", "21"]


def test_an_unfinished_run_shows_its_partial_task_and_no_run_is_an_error(tmp_path):
    folder = _tiny(tmp_path, epochs_done=4)
    with pytest.raises(ResultsError, match="no finished run in"):
        summarize(folder)
    rows = task_table(summarize(folder, [0]))[1]
    assert [r[0] for r in rows] == ["1", "2 (1 of 3 epochs)"]
    assert rows[1][2:4] == ["20.0", "50.0"] and rows[1][4] == "-"  # only epoch 4 counts; no boundary yet
    assert summarize(folder, [0]).recorded_seconds == {0: 10.0}


def test_labels_and_durations():
    assert [index_label(i) for i in ([3], [0, 1, 2], [0, 2, 5])] == ["index 3", "indices 0-2", "indices 0, 2, 5"]
    assert [format_duration(s) for s in (4.25, 65, 3725)] == ["4.2 s", "1 min 05 s", "1 h 02 min"]


def test_a_folder_of_another_size_is_refused(tmp_path):
    folder = _tiny(tmp_path)
    folder.save_metric("validation_accuracy_per_epoch", 0, np.zeros(5, np.float32))
    with pytest.raises(ResultsError, match="epochs"):
        summarize(folder)


@pytest.fixture(scope="module")
def cbp_run(tmp_path_factory):
    """experiments.run on the smoke scale with CBP replacing units, two indices vmapped: (stdout, folder)."""
    root = tmp_path_factory.mktemp("summary")
    config = write_replacing_cbp_config(root)
    return root, config


def test_the_run_command_ends_with_the_table_times_folder_and_next_commands(cbp_run, capsys):
    root, config = cbp_run
    results = root / "results"
    assert run_cli.main(["--config", str(config), "--results-dir", str(results), "--experiment-index", "0-1"]) == 0
    out = capsys.readouterr().out
    text = out[out.index("cbp_smoke, indices 0-1"):]
    folder = ExperimentDir(results / "cbp_smoke")
    lines = text.splitlines()
    assert lines[0] == "cbp_smoke, indices 0-1: 4 epochs, 2 tasks (each cell: mean ± standard error over the 2 runs)"
    assert lines[1].split() == ["task", "classes", "best", "test", "accuracy", "(%)", "final", "validation",
                                "accuracy", "(%)", "replaced", "units"]
    test = np.stack([folder.load_metric("test_accuracy_per_epoch", i) for i in (0, 1)]) * 100
    val = np.stack([folder.load_metric("validation_accuracy_per_epoch", i) for i in (0, 1)]) * 100
    replaced = np.stack([folder.load_metric("replaced_units_per_epoch", i).sum(axis=1) for i in (0, 1)])
    assert replaced.sum() > 0  # CBP replaced units, so the column has something to show
    for t in range(2):
        cells = re.split(r"\s{2,}", lines[2 + t].strip())
        epochs = slice(2 * t, 2 * t + 2)
        best, final, units = test[:, epochs].max(axis=1), val[:, 2 * t + 1], replaced[:, epochs].sum(axis=1)
        expect = [f"{v.mean():.{d}f} ± {v.std(ddof=1) / np.sqrt(2):.{d}f}"
                  for v, d in ((best, 1), (final, 1), (units, 0))]
        assert cells == [str(t + 1), str(5 * (t + 1)), *expect]
    assert re.fullmatch(r"wall time: \S+( min \d\d)? s for this command \(compilation included\); recorded training "
                        r"and evaluation: .+ per run \(every session; the runs trained together\)", lines[4])
    assert lines[5] == f"results: {folder.path}"
    assert lines[6] == "next:"
    commands = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in lines[7:10]}
    assert list(commands) == ["analyse", "plot", "report"]
    assert commands["analyse"] == f"python -m experiments.analyze --results-dir {folder.path}"

    # the plot and report commands run as printed
    for name, cli_module in (("plot", plot_cli), ("report", report_cli)):
        argv = shlex.split(commands[name])
        assert argv[:3] == ["python", "-m", f"experiments.{name}"]
        extra = ["--output-dir", str(root / "plots")] if name == "plot" else ["--out", str(root / "report.html")]
        assert cli_module.main(argv[3:] + extra) == 0, name
    assert (root / "plots" / "summary_table.csv").is_file() and (root / "report.html").is_file()
