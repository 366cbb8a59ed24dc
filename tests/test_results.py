"""The results folder (semantics §8): ``ExperimentDir`` reads and writes the reference's layout, and no
other module of the package spells that layout."""

from __future__ import annotations

import ast
import json
import re

import numpy as np
import pytest
from conftest import REPO_ROOT

from lop_jax.config import ConfigError, make_config
from lop_jax.results import ExperimentDir, ResultsError

CFG = make_config({"num_tasks": 2, "classes_per_task": 2, "epochs_per_task": 1, "network_width": 2,
                   "train_images_per_class": 4, "train_batch_size": 4, "data_source": "embedded",
                   "results_dir": "somewhere", "experiment_name": "tiny"})


@pytest.fixture
def folder(tmp_path):
    return ExperimentDir(tmp_path / "tiny")


def test_the_folder_of_a_config_and_its_config_file(folder, tmp_path):
    assert ExperimentDir.of(CFG).path.parts[-2:] == ("somewhere", "tiny")
    assert ExperimentDir.of(make_config({"experiment_name": "x"})).path.parts == ("results", "x")
    assert not folder.exists() and not folder.has_config() and folder.config_diff(CFG, "r") == []
    folder.write_config(CFG)
    assert folder.exists() and json.loads((folder.path / "config.json").read_text()) == CFG.to_dict()
    assert folder.read_config() == CFG
    before = folder.config_path.read_bytes()
    folder.write_config(make_config({**CFG.to_dict(), "results_dir": "elsewhere", "num_workers": 3}))
    assert folder.config_path.read_bytes() == before  # operational keys may differ
    with pytest.raises(ConfigError, match="keys differ: epochs_per_task, stepsize"):
        folder.write_config(make_config({**CFG.to_dict(), "stepsize": 0.5, "epochs_per_task": 3}))
    assert folder.config_path.read_bytes() == before
    folder.config_path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON; do this"):
        folder.config_diff(CFG, "do this")
    with pytest.raises(ResultsError, match="cannot read .*config.json"):
        folder.read_config()
    with pytest.raises(ResultsError, match="no config.json"):
        ExperimentDir(tmp_path / "none").read_config()


def test_run_status_and_the_finished_and_unfinished_indices(folder):
    assert folder.started_indices() is None and folder.finished_indices() is None  # no run started
    assert folder.status(0) is None and not folder.is_finished(0)
    folder.save_status(0, 2, True)
    folder.save_status(10, 1, False)
    folder.save_status(2, 2, True)
    (folder.path / "run_status" / "index-3.json").write_text("{half")  # unreadable: started, not finished
    (folder.path / "run_status" / "notes.json").write_text("{}")
    assert json.loads(folder.status_path(0).read_text()) == {"epochs_done": 2, "finished": True}
    assert folder.status(10) == {"epochs_done": 1, "finished": False} and folder.status(3) is None
    assert folder.started_indices() == [0, 2, 3, 10]
    assert folder.finished_indices() == [0, 2]
    assert folder.is_finished(2) and not folder.is_finished(10) and not folder.is_finished(3)


def test_metric_arrays_one_file_per_metric_and_index(folder):
    a = np.arange(4, dtype=np.float32)
    folder.save_metric("test_accuracy_per_epoch", 1, a)
    folder.save_metric("test_accuracy_per_epoch", 10, a + 1)
    path = folder.path / "test_accuracy_per_epoch" / "index-1.npy"
    assert folder.metric_path("test_accuracy_per_epoch", 1) == path and path.is_file()
    got = folder.load_metric("test_accuracy_per_epoch", 1)
    assert got.dtype == a.dtype and np.array_equal(got, a)
    assert folder.metric_indices("test_accuracy_per_epoch") == [1, 10] and folder.metric_indices("nothing") == []
    assert folder.has_metric("test_accuracy_per_epoch", 10) and not folder.has_metric("test_accuracy_per_epoch", 2)
    with pytest.raises(ResultsError, match=r"missing .*index-2\.npy \(index 2\)"):
        folder.load_metric("test_accuracy_per_epoch", 2)
    (folder.path / "class_order").mkdir()
    (folder.path / "class_order" / "index-1.npy").write_bytes(b"not an array")
    with pytest.raises(ResultsError, match="cannot read .*index-1.npy"):
        folder.load_metric("class_order", 1)
    assert not list(folder.path.rglob("*.tmp"))  # written atomically


def test_run_files_are_the_small_files_of_one_run(folder):
    folder.save_metric("test_accuracy_per_epoch", 1, np.zeros(2))
    folder.save_metric("test_accuracy_per_epoch", 10, np.zeros(2))
    folder.save_metric("next_task_dormant_units_analysis", 1, np.zeros(2))
    folder.save_status(1, 2, True)
    for heavy in ("model_parameters", "checkpoints", "previous_runs"):
        (folder.path / heavy / "index-1").mkdir(parents=True)
        (folder.path / heavy / "index-1.npy").write_bytes(b"")
    names = [str(p.relative_to(folder.path)) for p in folder.run_files(1)]
    assert names == ["next_task_dormant_units_analysis/index-1.npy", "run_status/index-1.json",
                     "test_accuracy_per_epoch/index-1.npy"]
    assert ExperimentDir(folder.path / "none").run_files(1) == []


def test_snapshots_checkpoint_folder_and_moving_a_run_aside(folder):
    params = {"fc": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.zeros(3, np.float32)}}
    stats = {"bn": {"mean": np.ones(2, np.float32)}}
    folder.save_snapshot(1, 4, params, stats)
    assert folder.has_snapshot(1, 4) and folder.snapshot_path(1, 4).parts[-3:] == ("model_parameters", "index-1",
                                                                                   "epoch-4")
    p, s = folder.load_snapshot(1, 4)
    assert np.array_equal(p["fc"]["kernel"], params["fc"]["kernel"])
    assert np.array_equal(s["bn"]["mean"], stats["bn"]["mean"])
    with pytest.raises(ResultsError, match="epoch-2"):
        folder.load_snapshot(1, 2)
    checkpoints = folder.checkpoint_path(1)
    assert checkpoints.parts[-2:] == ("checkpoints", "index-1") and checkpoints.is_absolute()

    folder.save_status(1, 4, True)
    folder.save_status(10, 1, False)
    folder.save_metric("test_accuracy_per_epoch", 1, np.zeros(2))
    moved = folder.move_run_aside(1)
    assert moved.parent == folder.path / "previous_runs" and moved.name.startswith("index-1-")
    small = sorted(str(f.relative_to(moved)) for f in moved.rglob("*")
                   if f.is_file() and "model_parameters" not in f.relative_to(moved).parts)
    assert small == ["run_status/index-1.json", "test_accuracy_per_epoch/index-1.npy"]
    assert (moved / "model_parameters" / "index-1" / "epoch-4").is_dir()
    assert folder.status(1) is None and not folder.has_snapshot(1, 4) and folder.status(10) is not None
    assert folder.move_run_aside(1) is None and ExperimentDir(folder.path / "none").move_run_aside(0) is None


# path pieces of the layout: a per-run name, or a layout folder or file as a whole path component
LAYOUT = re.compile(r"(?:^|/)(?:index-|(?:config\.json|run_status|model_parameters|checkpoints|previous_runs)(?:/|$))")
# the sweep's timing file names a run "<system>/index-<N>": its own keys (written by the sweep, read by
# the signature), not a path
ALLOWED = {("sweep.py", "/index-"), ("signature.py", "/index-")}


def _path_fragments(source: str) -> list[str]:
    """String constants (f-string pieces included) that build a results path; docstrings and messages
    that name a file ("no config.json in ...") do not."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in docstrings
            and isinstance(node.value, str) and LAYOUT.search(node.value)]


def test_no_other_module_spells_the_results_layout():
    offenders = {p.name: [f for f in _path_fragments(p.read_text()) if (p.name, f) not in ALLOWED]
                 for p in sorted((REPO_ROOT / "lop_jax").glob("*.py")) if p.name != "results.py"}
    assert {name: found for name, found in offenders.items() if found} == {}
    # the check sees what it must, and lets messages and other keys be
    assert sorted(_path_fragments('p = f"{d}/run_status/index-{i}.json"; q = "config.json"; r = d / "checkpoints"')) \
        == ["/run_status/index-", "checkpoints", "config.json"]
    assert _path_fragments('m = f"no config.json in {d}"; k = "checkpoints_to_keep"') == []
