"""Live tracking (lop_jax.tracking): what a run and its analysis log is read back from the files the
tools wrote, TensorBoard's event files with TensorBoard's own reader and the W&B offline run's
transaction log parsed with W&B's own record schema, and compared with the run's result arrays.

The packages are optional (``pip install 'lop-jax[track]'``; the test extra installs them too): a
test that needs one skips, saying so, only when it is not installed, and never under CI (``CI`` set),
where a missing package is a failure."""

import importlib.util
import json
import os
import struct
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_replacing_cbp_config

from lop_jax import methods as lm
from lop_jax import tracking
from lop_jax.analysis import ANALYSIS_METRICS
from lop_jax.config import load_config
from lop_jax.errors import EXIT_INPUT
from lop_jax.experiment import RunInterrupted, run_experiments
from lop_jax.records import RunResults
from lop_jax.results import ExperimentDir

REPO_ROOT = Path(__file__).parents[1]
# under CI every backend counts as present: a missing package then fails the tests instead of skipping them
HAVE = {kind: bool(os.environ.get("CI")) or importlib.util.find_spec(kind) is not None for kind in tracking.KINDS}
needs_tensorboard = pytest.mark.skipif(not HAVE["tensorboard"], reason="tensorboard is not installed "
                                       "(pip install 'lop-jax[track]')")
needs_wandb = pytest.mark.skipif(not HAVE["wandb"], reason="wandb is not installed (pip install 'lop-jax[track]')")


# ---- reading back ---------------------------------------------------------------------------
def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run folder (all its event files), by tag, as (step, value), read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``), parsed with W&B's record schema.

    The file is a 7-byte header (``:W&B``, magic, version) and then records in 32 KiB blocks, each
    chunk a 7-byte header (CRC-32 of the type byte and data, length, type: 1 full, 2 first, 3
    middle, 4 last) and its data. Every chunk's checksum is verified."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"not a W&B transaction log: {path}"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos} of {path}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_runs(folder: ExperimentDir, index: int) -> list[dict]:
    """Each W&B offline run folder of an index, oldest first: its run record and history rows."""
    runs = []
    for path in sorted(folder.wandb_dir.glob(f"offline-run-*-{tracking.wandb_run_id(f'{folder.name}-index-{index}')}")):
        records = wandb_records(next(path.glob("run-*.wandb")))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for item in r.config.update}
        config.update({item.key: json.loads(item.value_json) for item in run.config.update})
        runs.append({"run": run, "history": history, "config": config})
    return runs


def rows_on(history: list[dict], axis: str) -> dict[int, dict]:
    """The history rows logged on one x axis, by step."""
    out: dict[int, dict] = {}
    for row in history:
        if axis in row:
            assert row[axis] not in out, f"{axis} {row[axis]} logged twice"
            out[row[axis]] = row
    return out


# ---- a CBP run at the smoke scale, stopped after 2 of its 4 epochs and resumed, then analysed -------
@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    kinds = tuple(k for k in tracking.KINDS if HAVE[k])
    if not kinds:
        pytest.skip("neither tensorboard nor wandb is installed (pip install 'lop-jax[track]')")
    root = tmp_path_factory.mktemp("tracking")
    config = write_replacing_cbp_config(root)
    cfg = load_config(config, {"results_dir": str(root / "results")})
    mp = pytest.MonkeyPatch()
    mp.delenv("WANDB_MODE", raising=False)  # offline by default: no network, no login
    mp.setenv("WANDB_PROJECT", "lop-jax-tests")
    try:
        with pytest.raises(RunInterrupted):
            run_experiments(cfg, [0, 1], progress=False, stop_after_epoch=2, track=kinds)
        run_experiments(cfg, [0, 1], progress=False, track=kinds)
        from experiments.analyze import main as analyze

        assert analyze(["--results-dir", str(ExperimentDir.of(cfg).path), "--no-progress",
                        *(a for k in kinds for a in ("--log", k))]) == 0
    finally:
        mp.undo()
    return cfg, ExperimentDir.of(cfg)


@needs_tensorboard
@pytest.mark.parametrize("index", [0, 1])
def test_tensorboard_holds_every_epoch_once_and_equals_the_arrays(tracked, index):
    cfg, folder = tracked
    scalars = tensorboard_scalars(folder.tensorboard_path(index))
    epochs = list(range(1, cfg.num_epochs + 1))
    for tag, metric in tracking.EPOCH_TAGS.items():
        assert [s for s, _ in scalars[tag]] == epochs, tag  # the resumed run did not repeat epochs 1-2
        np.testing.assert_allclose([v for _, v in scalars[tag]], folder.load_metric(metric, index), rtol=1e-6)
    replaced = folder.load_metric("replaced_units_per_epoch", index)
    assert replaced.sum() > 0
    assert [v for _, v in scalars["method/replaced_units/sum"]] == list(replaced.sum(axis=1))
    layers = sorted(t for t in scalars if t.startswith("method/replaced_units/") and not t.endswith("/sum"))
    assert len(layers) == replaced.shape[1] == 17
    assert [v for _, v in scalars[layers[16]]] == list(replaced[:, 16])
    for tag, metric in tracking.SUMMARY_TAGS.items():
        expected = folder.load_metric(metric, index)
        assert [s for s, _ in scalars[tag]] == list(range(1, expected.size + 1)), tag
        np.testing.assert_allclose([v for _, v in scalars[tag]], expected, rtol=1e-6)


@needs_tensorboard
def test_tensorboard_holds_the_analysis_per_task(tracked):
    cfg, folder = tracked
    scalars = tensorboard_scalars(folder.tensorboard_path(1))
    for name in ANALYSIS_METRICS[:-1]:
        array = folder.load_metric(name, 1)
        first = 1 if name.startswith("previous_tasks_") else 0
        assert [s for s, _ in scalars[f"analysis/{name}"]] == list(range(first, cfg.num_tasks)), name
        np.testing.assert_allclose([v for _, v in scalars[f"analysis/{name}"]], array[first:cfg.num_tasks], rtol=1e-6)
    per_class = folder.load_metric("accuracy_per_class_in_order", 1)[:cfg.num_classes]
    final = scalars["analysis/final_accuracy_on_task"]
    assert [s for s, _ in final] == [1, 2]
    np.testing.assert_allclose([v for _, v in final], per_class.reshape(2, 5).mean(axis=1), rtol=1e-6)


@needs_wandb
def test_wandb_offline_runs_are_named_grouped_and_hold_the_arrays(tracked):
    cfg, folder = tracked
    for index in (0, 1):
        train_1, train_2, analysis = wandb_runs(folder, index)  # the stopped run, its resumption, the analysis
        for part in (train_1, train_2, analysis):
            assert part["run"].display_name == f"cbp_smoke/index-{index}"
            assert part["run"].run_group == "cbp_smoke" and part["run"].project == "lop-jax-tests"
            assert part["run"].run_id == f"cbp_smoke-index-{index}"
        assert [p["run"].job_type for p in (train_1, train_2, analysis)] == ["train", "train", "analysis"]
        assert train_1["config"]["replacement_rate"] == 0.05 and train_1["config"]["use_cbp"] is True
        epochs_1, epochs_2 = rows_on(train_1["history"], "epoch"), rows_on(train_2["history"], "epoch")
        assert sorted(epochs_1) == [1, 2] and sorted(epochs_2) == [3, 4]
        epochs = {**epochs_1, **epochs_2}
        for tag, metric in tracking.EPOCH_TAGS.items():
            np.testing.assert_allclose([epochs[e][tag] for e in range(1, 5)], folder.load_metric(metric, index),
                                       rtol=1e-6)
        replaced = folder.load_metric("replaced_units_per_epoch", index)
        assert [epochs[e]["method/replaced_units/sum"] for e in range(1, 5)] == list(replaced.sum(axis=1))
        summaries = {**rows_on(train_1["history"], "train/summary"), **rows_on(train_2["history"], "train/summary")}
        accuracy = folder.load_metric("train_accuracy_per_checkpoint", index)
        assert sorted(summaries) == list(range(1, accuracy.size + 1))
        np.testing.assert_allclose([summaries[s]["train/accuracy"] for s in sorted(summaries)], accuracy, rtol=1e-6)
        tasks = rows_on(analysis["history"], "tasks_done")
        assert sorted(tasks) == [0, 1, 2]
        np.testing.assert_allclose([tasks[t]["analysis/next_task_stable_rank_analysis"] for t in (0, 1)],
                                   folder.load_metric("next_task_stable_rank_analysis", index), rtol=1e-6)


# ---- without training -----------------------------------------------------------------------------
@needs_tensorboard
def test_task_boundary_metrics_of_any_method_are_logged_per_task(tmp_path):
    """A method that declares a task-boundary metric: Tracking logs its rows, whatever the method."""
    lm.register("probe_with_task_metric", lambda: lm.PlasticityMethod(
        name="probe_with_task_metric", task_metrics={"resets": lm.MetricSpec((3,), jnp.int32)}))
    try:
        cfg = load_config(REPO_ROOT / "configs" / "smoke.json", {
            "results_dir": str(tmp_path), "num_tasks": 3, "methods": [{"name": "probe_with_task_metric"}]})
        record = RunResults(cfg, 4, np.arange(20))
    finally:
        lm.unregister("probe_with_task_metric")
    folder = ExperimentDir.of(cfg)
    record.arrays["resets_per_task"][:] = [[1, 2, 3], [4, 5, 6]]
    tracked = tracking.Tracking.open(["tensorboard"], cfg, folder, [record])
    for task in (0, 1):
        tracked.task_boundary(task, [record])
    tracked.close()
    scalars = tensorboard_scalars(folder.tensorboard_path(4))
    assert scalars["task/resets/sum"] == [(1, 6.0), (2, 15.0)]
    assert scalars["task/resets/2"] == [(1, 3.0), (2, 6.0)]


def test_log_option_errors_are_one_line_exit_2(capsys, monkeypatch):
    from experiments.run import main as run

    assert run(["--config", str(REPO_ROOT / "configs" / "smoke.json"), "--log", "mlflow", "--dry-run"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert err == "error: --log: unknown tracker 'mlflow'; expected tensorboard or wandb (or both, comma-separated)"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert run(["--config", str(REPO_ROOT / "configs" / "smoke.json"), "--log", "wandb"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert err == ("error: --log wandb needs the wandb package, which is not installed: "
                   "pip install 'lop-jax[track]'")
    assert tracking.parse_kinds(["wandb", "tensorboard,wandb", ""]) == ("wandb", "tensorboard")
    assert tracking.parse_kinds(None) == ()


def test_dry_run_names_the_trackers_and_nothing_imports_them_unasked(capsys):
    import subprocess
    import sys

    from experiments.run import main as run

    if HAVE["tensorboard"]:
        assert run(["--config", str(REPO_ROOT / "configs" / "smoke.json"), "--log", "tensorboard", "--dry-run"]) == 0
        assert "  live tracking: tensorboard" in capsys.readouterr().out.splitlines()
    code = ("import sys, lop_jax.experiment, lop_jax.tracking, experiments.run, experiments.analyze; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorboard', 'wandb'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"


@needs_wandb
def test_a_restarted_run_is_a_new_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(REPO_ROOT / "configs" / "smoke.json", {"results_dir": str(tmp_path)})
    folder = ExperimentDir.of(cfg)
    (folder.path / "previous_runs" / "index-3-20250101-000000").mkdir(parents=True)
    first = tracking.WandbRun(folder, cfg, 2, "train")
    again = tracking.WandbRun(folder, cfg, 3, "train")
    try:
        assert (first.run.id, again.run.id) == ("smoke-index-2", "smoke-index-3-restart-1")
        assert again.run.name == "smoke/index-3" and again.run.group == "smoke"
    finally:
        first.close()
        again.close()
