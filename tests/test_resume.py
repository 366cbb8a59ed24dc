"""Reproducibility and exact resume (issue 4): same index → same bits, any stop → the uninterrupted run.

Every run is the smoke config (2 tasks × 2 epochs, width 4) with its results in a temporary folder.
The uninterrupted reference of each algorithm runs once per module; a run stopped after epoch 3 (in
the middle of task 2, after a task boundary) is copied before each test resumes or damages it.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT

from experiments.run import main
from lop_jax import results as res
from lop_jax.config import Config, ConfigError, load_config
from lop_jax.data import load_data
from lop_jax.experiment import RunError, RunInterrupted, run_experiment
from lop_jax.results import ExperimentDir

SMOKE = REPO_ROOT / "configs" / "smoke.json"
STOP = 3  # epochs done when the in-process runs stop: task 2, epoch 1 of 2
ALGOS = {
    "base": {},
    "cbp": {"use_cbp": True, "replacement_rate": 0.05, "maturity_threshold": 2},
    "shrink_and_perturb": {"noise_std": 1e-3},
}
WAIT_S = 120  # the longest a test waits for a subprocess (to start checkpointing, or to end)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _cfg(root, algo="base", **overrides):
    return load_config(SMOKE, {"results_dir": str(root), **ALGOS[algo], **overrides})


def _exp_dir(root):
    return root / "smoke"


def _results(exp_dir, index=0):
    """Every results array of ``index`` on disk except the wall-clock ones, by metric."""
    out = {p.parent.name: np.load(p) for p in sorted(exp_dir.glob(f"*/index-{index}.npy"))
           if not p.parent.name.endswith("_runtime")}
    assert "test_accuracy_per_epoch" in out and "class_order" in out, sorted(out)
    return out


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _snapshots(exp_dir, cfg, index=0):
    """(params, batch_stats) leaves of every task-boundary snapshot, the final one last."""
    return {e: _leaves(ExperimentDir(exp_dir).load_snapshot(index, e))
            for e in range(0, cfg.num_epochs + 1, cfg.epochs_per_task)}


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_identical_runs(exp_a, exp_b, cfg, index=0):
    """Results arrays (all but *_runtime), every snapshot and the run status: bit for bit."""
    ra, rb = _results(exp_a, index), _results(exp_b, index)
    assert sorted(ra) == sorted(rb)
    differ = [m for m in ra if not _same_bits(ra[m], rb[m])]
    assert not differ, f"results differ: {differ}"
    sa, sb = _snapshots(exp_a, cfg, index), _snapshots(exp_b, cfg, index)
    for epoch in sa:
        assert len(sa[epoch]) == len(sb[epoch]) > 0
        bad = [i for i, (x, y) in enumerate(zip(sa[epoch], sb[epoch], strict=True)) if not _same_bits(x, y)]
        assert not bad, f"snapshot after epoch {epoch}: leaves {bad} differ"
    for exp in (exp_a, exp_b):
        assert ExperimentDir(exp).status(index) == {"epochs_done": cfg.num_epochs, "finished": True}


def _checkpoint_steps(exp_dir, index=0):
    """Epochs of the complete checkpoints (Orbax writes a temporary folder and renames it when done)."""
    folder = exp_dir / "checkpoints" / f"index-{index}"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _file_bytes(folder):
    """Every file under ``folder`` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Runs:
    """Module-wide runs: the uninterrupted references and the stopped runs, each computed once."""

    def __init__(self, base, data):
        self.base, self.data = base, data
        self._done = {}

    def run(self, root, algo="base", index=0, **kwargs):
        """One in-process run; returns (cfg, exp_dir, log lines). ``verbose`` sends every message (resuming,
        falling back) to ``log`` without a progress bar."""
        cfg = _cfg(root, algo)
        lines = []
        run_experiment(cfg, index, data=self.data, verbose=True, log=lines.append, **kwargs)
        return cfg, _exp_dir(root), lines

    def ref(self, algo="base", index=0):
        """The uninterrupted run (cfg, exp_dir)."""
        key = ("ref", algo, index)
        if key not in self._done:
            cfg, exp_dir, _ = self.run(self.base / f"ref-{algo}-{index}", algo, index)
            self._done[key] = (cfg, exp_dir)
        return self._done[key]

    def stopped(self, algo, dest):
        """A copy, at ``dest``, of the run of index 0 stopped after epoch ``STOP``; returns (cfg, exp_dir)."""
        key = ("stopped", algo)
        if key not in self._done:
            root = self.base / f"stopped-{algo}"
            with pytest.raises(RunInterrupted, match=f"after epoch {STOP}"):
                self.run(root, algo, stop_after_epoch=STOP)
            self._done[key] = root
        shutil.copytree(self._done[key], dest)
        return _cfg(dest, algo), _exp_dir(dest)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    return Runs(base, load_data(_cfg(base)))


# ---- same index, different index -------------------------------------------------------------------------------
def test_same_index_twice_is_bit_identical(runs, tmp_path):
    cfg, ref = runs.ref()
    _, again, _ = runs.run(tmp_path)
    assert_identical_runs(ref, again, cfg)


def test_two_indices_differ(runs):
    cfg, exp0 = runs.ref(index=0)
    _, exp1 = runs.ref(index=1)
    r0, r1 = _results(exp0, 0), _results(exp1, 1)
    o0, o1 = r0.pop("class_order"), r1.pop("class_order")
    assert sorted(o0.tolist()) == sorted(o1.tolist()) and not np.array_equal(o0, o1)
    # the first task's classes differ, not just their order
    assert set(o0[:cfg.classes_per_task].tolist()) != set(o1[:cfg.classes_per_task].tolist())
    same = [m for m in r0 if np.array_equal(r0[m], r1[m])]
    assert not same, f"identical across indices: {same}"
    p0, p1 = _snapshots(exp0, cfg, 0)[cfg.num_epochs], _snapshots(exp1, cfg, 1)[cfg.num_epochs]
    assert not any(np.array_equal(a, b) for a, b in zip(p0, p1, strict=True) if a.size > 1)


# ---- in-process stop and resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_stop_mid_task_and_resume_is_bit_identical(runs, algo, tmp_path):
    cfg, ref = runs.ref(algo)
    assert STOP % cfg.epochs_per_task != 0 and STOP < cfg.num_epochs  # the stop is in the middle of a task
    cfg, exp = runs.stopped(algo, tmp_path / "run")
    assert _checkpoint_steps(exp)[-1] == STOP
    assert ExperimentDir(exp).status(0) == {"epochs_done": STOP, "finished": False}
    assert np.all(np.load(exp / "test_accuracy_per_epoch" / "index-0.npy")[STOP:] == 0)
    _, _, lines = runs.run(tmp_path / "run", algo)
    assert any(f"resuming after epoch {STOP}" in s for s in lines), lines
    assert_identical_runs(ref, exp, cfg)
    if algo == "cbp":
        replaced = np.load(ref / "replaced_units_per_epoch" / "index-0.npy")
        assert replaced.shape == (cfg.num_epochs, 17)
        assert replaced[:STOP].sum() > 0 and replaced[STOP:].sum() > 0, replaced  # CBP acts before and after
    if algo == "shrink_and_perturb":
        _, base = runs.ref("base")
        a, b = _results(base), _results(ref)
        assert not np.array_equal(a["test_loss_per_epoch"], b["test_loss_per_epoch"])  # the noise is applied


def test_resuming_a_finished_run_changes_nothing(runs, tmp_path):
    cfg, ref = runs.ref()
    shutil.copytree(ref.parent, tmp_path / "run")
    exp = _exp_dir(tmp_path / "run")
    before = _results(exp)
    _, _, lines = runs.run(tmp_path / "run")
    assert any("already finished" in s for s in lines), lines
    after = _results(exp)
    assert all(_same_bits(before[m], after[m]) for m in before)
    assert_identical_runs(ref, exp, cfg)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path):
    cfg, ref = runs.ref()
    cfg, exp = runs.stopped("base", tmp_path / "run")
    steps = _checkpoint_steps(exp)
    assert steps[-2:] == [STOP - 1, STOP]
    newest = exp / "checkpoints" / "index-0" / str(STOP)
    damaged = 0
    for p in (newest / "state").rglob("*"):
        if p.is_file():
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 2)
            damaged += 1
    assert damaged > 0
    _, _, lines = runs.run(tmp_path / "run")
    warnings = [s for s in lines if "unreadable" in s]
    assert len(warnings) == 1 and f"after epoch {STOP} " in warnings[0], lines
    assert f"falling back to epoch {STOP - 1}" in warnings[0]
    assert any(f"resuming after epoch {STOP - 1}" in s for s in lines), lines
    assert_identical_runs(ref, exp, cfg)


def test_silently_changed_checkpoint_is_detected_by_its_checksums(runs, tmp_path):
    """A checkpoint that Orbax reads without error but whose arrays are not the ones saved (here the
    state of the epoch before, swapped in) is set aside like an unreadable one."""
    cfg, ref = runs.ref()
    cfg, exp = runs.stopped("base", tmp_path / "run")
    folder = exp / "checkpoints" / "index-0"
    newest, previous = folder / str(STOP) / "state", folder / str(STOP - 1) / "state"
    shutil.rmtree(newest)
    shutil.copytree(previous, newest)
    _, _, lines = runs.run(tmp_path / "run")
    warnings = [s for s in lines if "unreadable" in s]
    assert len(warnings) == 1 and "ChecksumMismatch" in warnings[0], lines
    assert f"falling back to epoch {STOP - 1}" in warnings[0]
    assert_identical_runs(ref, exp, cfg)


def test_checksums_match_across_host_and_device_and_catch_one_changed_element():
    from lop_jax.checkpoint import checksum

    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(4, 6)).astype(np.float32), "n": rng.integers(0, 9, 5).astype(np.int32),
              "flag": np.array([True, False]), "h": rng.normal(size=3).astype(np.float16),
              "bytes": rng.integers(0, 255, 40).astype(np.uint8)}
    for name, x in arrays.items():
        assert checksum(jax.numpy.asarray(x)) == checksum(x), name
    w = arrays["w"].copy()
    w[2, 3] = np.nextafter(w[2, 3], np.float32(np.inf))  # one bit of one element
    assert checksum(w) != checksum(arrays["w"])
    n = arrays["n"]
    assert n[0] != n[1] and checksum(n[[1, 0, 2, 3, 4]]) != checksum(n)  # same values, other places


def _tiny_cfg():
    return load_config(SMOKE)


def test_a_stacked_state_saves_the_chosen_run_and_restores_bit_for_bit(tmp_path):
    """Several runs vmapped together are saved one checkpoint per run, straight from the stacked
    state; the restore gives back that run's leaves exactly (dtypes, shapes, bits)."""
    from lop_jax.checkpoint import Checkpointer

    rng = np.random.default_rng(1)
    stacked = {"w": jax.numpy.asarray(rng.normal(size=(3, 4, 5)).astype(np.float32)),
               "key": jax.numpy.asarray(rng.integers(0, 2**31, (3, 2)).astype(np.uint32)),
               "flag": jax.numpy.asarray(np.array([True, False, True])),
               "count": jax.numpy.asarray(np.array([7, 8, 9], np.int32))}
    arrays = {"acc": np.array([0.5, 0.25, 0.125], np.float32), "order": np.arange(5, dtype=np.int64)[::-1].copy()}
    running = np.array([1.5, -2.0], np.float32)
    ckpt = Checkpointer(tmp_path, 4, _tiny_cfg())
    ckpt.save(6, stacked, arrays, running, 3, run=1)
    ckpt.wait()
    template = jax.tree_util.tree_map(lambda x: jax.numpy.zeros_like(x[0]), stacked)
    got = ckpt.latest(template, {k: np.zeros_like(v) for k, v in arrays.items()}, np.zeros(2, np.float32), print)
    ckpt.close()
    assert got.epochs_done == 6 and got.train_summary_pos == 3
    for name, x in stacked.items():
        want = np.asarray(x[1])
        assert got.state[name].dtype == want.dtype and _same_bits(np.asarray(got.state[name]), want), name
    assert all(got.arrays[k].dtype == v.dtype and np.array_equal(got.arrays[k], v) for k, v in arrays.items())
    assert _same_bits(got.running, running)


def test_a_checkpoint_of_another_layout_is_refused_not_set_aside(tmp_path):
    """A checkpoint whose stored arrays do not fit this config's state (an older lop-jax, or a
    hand-edited config) is a one-line error; the checkpoint stays where it is."""
    from lop_jax.checkpoint import Checkpointer, CheckpointMismatch

    cfg = _tiny_cfg()
    ckpt = Checkpointer(tmp_path, 0, cfg)
    ckpt.save(2, {"p": jax.numpy.arange(6.0)}, {"acc": np.zeros(2, np.float32)}, np.zeros(2, np.float32), 0)
    ckpt.wait()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointMismatch, match="other shapes") as err:
        ckpt.latest({"p": jax.numpy.arange(7.0)}, {"acc": np.zeros(2, np.float32)}, np.zeros(2, np.float32), print)
    ckpt.close()
    assert "\n" not in str(err.value) and "--restart" in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_zero_size_results_arrays_survive_a_checkpoint(tmp_path):
    """No train summary at all (every epoch shorter than running_avg_window) gives empty arrays, which
    Orbax cannot store: they are left out and come back empty."""
    from lop_jax.checkpoint import Checkpointer

    cfg = load_config(SMOKE)
    state = {"p": jax.numpy.arange(6.0), "k": jax.random.PRNGKey(3)}
    arrays = {"empty": np.zeros((0,), np.float32), "acc": np.array([0.5, 0.25], np.float32)}
    ckpt = Checkpointer(tmp_path, 0, cfg)
    ckpt.save(2, state, arrays, np.zeros(2, np.float32), 0)
    ckpt.wait()
    got = ckpt.latest(state, {k: np.zeros_like(v) for k, v in arrays.items()}, np.zeros(2, np.float32), print)
    ckpt.close()
    assert got.epochs_done == 2 and got.arrays["empty"].shape == (0,)
    assert np.array_equal(got.arrays["acc"], arrays["acc"]) and np.array_equal(got.state["p"], state["p"])


# ---- config mismatch, --restart --------------------------------------------------------------------------------
def test_mismatched_config_is_refused_and_the_old_run_is_untouched(runs, tmp_path):
    cfg, ref = runs.ref()
    shutil.copytree(ref.parent, tmp_path / "run")
    exp = _exp_dir(tmp_path / "run")
    before = _file_bytes(exp)
    other = load_config(SMOKE, {"results_dir": str(tmp_path / "run"), "stepsize": cfg.stepsize / 2})
    with pytest.raises(ConfigError, match="stepsize") as err:
        run_experiment(other, 0, data=runs.data, progress=False, log=lambda s: None)
    assert "\n" not in str(err.value)
    assert main(["--config", str(SMOKE), "--results-dir", str(tmp_path / "run"), "--set", "stepsize=0.05"]) == 2
    assert _file_bytes(exp) == before  # config.json, results, checkpoints, snapshots: byte for byte
    assert json.loads((exp / "config.json").read_text())["stepsize"] == cfg.stepsize


def test_restart_moves_the_old_run_aside_and_starts_over(runs, tmp_path):
    cfg, ref = runs.ref()
    cfg, exp = runs.stopped("base", tmp_path / "run")
    old = {k: v for k, v in _file_bytes(exp).items() if k != "config.json"}
    assert any(k.startswith("checkpoints/") for k in old) and any(k.startswith("model_parameters/") for k in old)
    _, _, lines = runs.run(tmp_path / "run", restart=True)
    assert not any("resuming" in s for s in lines), lines
    moved_to = [s for s in lines if "--restart" in s and "moved to" in s]
    assert len(moved_to) == 1, lines
    previous = list((exp / "previous_runs").iterdir())
    assert len(previous) == 1 and previous[0].name.startswith("index-0-") and str(previous[0]) in moved_to[0]
    assert _file_bytes(previous[0]) == old  # every old file kept, byte for byte
    assert_identical_runs(ref, exp, cfg)  # the new run started from scratch
    assert _checkpoint_steps(exp)[-1] == cfg.num_epochs


# ---- non-finite loss -------------------------------------------------------------------------------------------
def test_non_finite_loss_from_the_start_names_epoch_and_step(runs, tmp_path):
    cfg = load_config(SMOKE, {"results_dir": str(tmp_path), "stepsize": 1e30})
    with pytest.raises(RunError, match=r"non-finite.*epoch 1, step \d+") as err:
        run_experiment(cfg, 0, data=runs.data, progress=False, log=lambda s: None)
    assert "\n" not in str(err.value)
    assert _checkpoint_steps(_exp_dir(tmp_path)) == []
    assert ExperimentDir(_exp_dir(tmp_path)).status(0) == {"epochs_done": 0, "finished": False}


def test_non_finite_loss_keeps_the_last_good_checkpoint(runs, tmp_path, monkeypatch):
    cfg, ref = runs.ref()
    bad_epoch = 2  # 0-based: the run diverges in its third epoch, after two good checkpoints
    normal = Config.stepsize_at
    monkeypatch.setattr(Config, "stepsize_at", lambda self, e: 1e30 if e >= bad_epoch else normal(self, e))
    with pytest.raises(RunError, match=rf"epoch {bad_epoch + 1}, step \d+.*after epoch {bad_epoch}"):
        runs.run(tmp_path)
    monkeypatch.undo()
    exp = _exp_dir(tmp_path)
    assert _checkpoint_steps(exp) == list(range(1, bad_epoch + 1))
    results = _results(exp)
    assert all(np.all(np.isfinite(v)) for v in results.values())
    # the last good checkpoint restores: the rerun continues from it and ends as if nothing happened
    _, _, lines = runs.run(tmp_path)
    assert any(f"resuming after epoch {bad_epoch}" in s for s in lines), lines
    assert_identical_runs(ref, exp, cfg)


# ---- atomic results files --------------------------------------------------------------------------------------
def test_no_temporary_files_are_left_after_a_run(runs):
    cfg, ref = runs.ref()
    for folder in ref.iterdir():
        if folder.is_dir() and folder.name not in ("checkpoints", "model_parameters"):
            assert [p.name for p in folder.iterdir()] == [("index-0.json" if folder.name == "run_status"
                                                           else "index-0.npy")], folder
    leftovers = [p for p in ref.rglob("*") if "tmp" in p.name.lower()]
    assert not leftovers


def test_save_npy_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "metric" / "index-0.npy"
    res.save_npy(path, np.arange(5, dtype=np.float32))
    old = path.read_bytes()

    def crash(src, dst):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        res.save_npy(path, np.ones(1000, np.float32))
    monkeypatch.undo()
    assert path.read_bytes() == old and [p.name for p in path.parent.iterdir()] == ["index-0.npy"]
    res.save_npy(path, np.ones(3, np.float32))
    assert np.array_equal(np.load(path), np.ones(3, np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["index-0.npy"]


# ---- the command line: SIGKILL and SIGTERM ---------------------------------------------------------------------
def _command(root, algo="base"):
    sets = [a for k, v in ALGOS[algo].items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return [sys.executable, "-m", "experiments.run", "--config", str(SMOKE), "--results-dir", str(root), *sets]


def _env():
    """The test session's compilation cache (if any) for the subprocesses too, so they compile nothing."""
    env = dict(os.environ)
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(root, log, algo="base"):
    return subprocess.Popen(_command(root, algo), cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_checkpoint(proc, exp_dir, epoch=1):
    """Wait until a complete checkpoint after ``epoch`` or later exists (the process still running)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if any(s >= epoch for s in _checkpoint_steps(exp_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before writing a checkpoint")
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    pytest.fail(f"no checkpoint after {WAIT_S} s")


def _signal_after_checkpoint(root, exp_dir, log_path, sig, algo="base"):
    """Start a run, send ``sig`` once its first checkpoint exists (mid-run), and return its exit code."""
    with open(log_path, "w") as log:
        proc = _start(root, log, algo)
        try:
            _wait_for_checkpoint(proc, exp_dir)
            assert proc.poll() is None, "the run finished before the signal could be sent"
            proc.send_signal(sig)
            return proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _finish(root, log_path, algo="base"):
    """Rerun the command to its end; returns its output."""
    with open(log_path, "w") as log:
        proc = _start(root, log, algo)
        try:
            rc = proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the resumed run took more than {WAIT_S} s")
    out = log_path.read_text()
    assert rc == 0, out
    return out


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_sigkill_mid_run_then_rerun_is_bit_identical(runs, algo, tmp_path):
    """Killed at whatever point the run has reached once its first checkpoint exists; the CBP and
    shrink-and-perturb draws and CBP's utilities and ages must resume too."""
    cfg, ref = runs.ref(algo)
    exp = _exp_dir(tmp_path / "run")
    rc = _signal_after_checkpoint(tmp_path / "run", exp, tmp_path / "first.log", signal.SIGKILL, algo)
    assert rc == -signal.SIGKILL
    killed_at = ExperimentDir(exp).status(0)
    assert killed_at is not None and not killed_at["finished"]
    for p in exp.glob("*/index-0.npy"):  # whatever was on disk is whole
        np.load(p)
    out = _finish(tmp_path / "run", tmp_path / "second.log", algo)
    resumed = re.findall(r"resuming after epoch (\d+)", out)
    assert len(resumed) == 1 and 1 <= int(resumed[0]) < cfg.num_epochs, out
    assert_identical_runs(ref, exp, cfg)


def test_sigterm_stops_cleanly_with_130_and_the_rerun_is_bit_identical(runs, tmp_path):
    cfg, ref = runs.ref()
    exp = _exp_dir(tmp_path / "run")
    rc = _signal_after_checkpoint(tmp_path / "run", exp, tmp_path / "first.log", signal.SIGTERM)
    out = (tmp_path / "first.log").read_text()
    assert rc == 130, out
    assert "SIGTERM" in out
    stopped = re.findall(r"stopped after epoch (\d+)", out)
    assert len(stopped) == 1, out
    done = int(stopped[0])
    assert 1 <= done < cfg.num_epochs
    assert _checkpoint_steps(exp)[-1] == done
    assert ExperimentDir(exp).status(0) == {"epochs_done": done, "finished": False}
    out = _finish(tmp_path / "run", tmp_path / "second.log")
    assert f"resuming after epoch {done}" in out, out
    assert_identical_runs(ref, exp, cfg)


def test_a_checkpoint_of_an_earlier_format_is_refused_in_one_line(tmp_path, monkeypatch):
    from lop_jax import checkpoint
    from lop_jax.checkpoint import Checkpointer, CheckpointMismatch

    state, arrays, running = {"p": jax.numpy.arange(6.0)}, {"acc": np.zeros(2, np.float32)}, np.zeros(2, np.float32)
    ckpt = Checkpointer(tmp_path, 0, _tiny_cfg())
    monkeypatch.setattr(checkpoint, "FORMAT", 1)
    ckpt.save(2, state, arrays, running, 0)
    ckpt.wait()
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatch, match="format 1 of an earlier lop-jax") as err:
        ckpt.latest(state, arrays, running, print)
    ckpt.close()
    assert "\n" not in str(err.value) and (tmp_path / "checkpoints" / "index-0" / "2").is_dir()
