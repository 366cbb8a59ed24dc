"""Cluster sweeps (experiments.submit, lop_jax.cluster) through submitit.

End to end with submitit's local executor on the smoke config: two jobs (indices 0-1 vmapped,
and index 2) in one batch; the first is sent the time-limit signal (SIGUSR2, what SLURM sends
before a job's time limit) once its first task is done, and must requeue itself, resume from its
checkpoint and finish; each job then analyses its runs. The SLURM job script is rendered by
submitit itself from our options."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lop_jax.analysis import ANALYSIS_METRICS
from lop_jax.config import load_config
from lop_jax.errors import EXIT_FAILED, EXIT_INPUT
from lop_jax.results import ExperimentDir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                reason="submitit is not installed (pip install 'lop-jax[cluster]')")
REPO_ROOT = Path(__file__).parents[1]
SMOKE = str(REPO_ROOT / "configs" / "smoke.json")
HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def job_processes(job_id: str) -> list[int]:
    """The pids of a local submitit job's task processes (the job id is its controller's pid)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in environ:
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's process through /proc")
def test_a_local_sweep_requeues_at_the_time_limit_resumes_and_finishes(tmp_path):
    results, jobs = tmp_path / "results", tmp_path / "jobs"
    argv = [sys.executable, "-m", "experiments.submit", "--config", SMOKE, "--seeds", "0-2", "--seeds-per-job", "2",
            "--results-dir", str(results), "--cluster", "local", "--gpus-per-job", "0", "--time", "5",
            "--folder", str(jobs / "%j"), "--wait", "--analyze",
            *(["--log", "tensorboard"] if HAVE_TENSORBOARD else [])]
    command = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(command.stdout), daemon=True)
    reader.start()
    folder = ExperimentDir(results / "smoke")
    submitted = r"submitted job (\d+): smoke index 0,1"
    deadline = time.monotonic() + 400
    while command.poll() is None and time.monotonic() < deadline and not (
            re.search(submitted, "".join(lines)) and (folder.status(0) or {}).get("epochs_done", 0) >= 2):
        time.sleep(0.5)
    assert command.poll() is None, "".join(lines)
    job_id = re.search(submitted, "".join(lines)).group(1)
    tasks = job_processes(job_id)
    assert len(tasks) == 1, tasks
    os.kill(tasks[0], signal.SIGUSR2)  # as SLURM does --signal-delay seconds before the time limit
    try:
        assert command.wait(timeout=600) == 0, "".join(lines)
    finally:
        command.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert re.search(r"job \d+: smoke index 0,1: finished \[0, 1\] of \[0, 1\] after 2 attempt\(s\)", out), out
    assert re.search(r"job \d+: smoke index 2: finished \[2\] of \[2\] after 1 attempt\(s\)", out), out
    assert "all 2 job(s) finished" in out
    log = (jobs / job_id / f"{job_id}_0_log.out").read_text()
    assert "signalled before the time limit in attempt 1; requeued" in log
    assert "Job has timed out" in log and "(2 remaining timeouts)" in log  # submitit's time-limit path, 3 allowed
    resumed = re.findall(r"index ([01]): resuming after epoch (\d+)", log)
    assert sorted(i for i, _ in resumed) == ["0", "1"] and all(int(e) >= 2 for _, e in resumed), log
    assert "attempt 2" in log
    for index in (0, 1, 2):
        assert folder.is_finished(index)
        assert np.all(folder.load_metric("test_accuracy_per_epoch", index) > 0)
        assert all(folder.has_metric(m, index) for m in ANALYSIS_METRICS)  # --analyze: each job analysed its runs
    if HAVE_TENSORBOARD:  # the tracked run went on over the requeue: every epoch there, the last value the saved one
        from test_tracking import tensorboard_scalars

        tracked = tensorboard_scalars(folder.tensorboard_path(0))
        last = dict(tracked["test/accuracy"])
        assert sorted(last) == [1, 2, 3, 4]
        np.testing.assert_allclose([last[s] for s in (1, 2, 3, 4)], folder.load_metric("test_accuracy_per_epoch", 0))
        assert [s for s, _ in tracked["analysis/next_task_stable_rank_analysis"]] == [0, 1]

    # the same command again: nothing left to run
    again = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == EXIT_FAILED
    assert "already finished, not submitted: smoke/0, smoke/1, smoke/2" in again.stdout
    assert again.stderr.strip() == "error: every run of the sweep is already finished; nothing submitted"


def test_the_slurm_job_script_submitit_writes_from_our_options(tmp_path, monkeypatch):
    """submitit's own sbatch text for a 3-job array (a stand-in ``srun`` on PATH: submitit looks for it)."""
    from lop_jax import cluster

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    options = cluster.ClusterOptions(time_min=240, partition="gpu", gpus_per_job=1, cpus_per_job=8, mem_gb=32,
                                     array_parallelism=2, account="plasticity", constraint="a100",
                                     setup=("source .venv/bin/activate",), extra={"mail_type": "END"})
    executor = cluster.make_executor(tmp_path / "jobs" / "%j", options)
    executor._executor.parameters["map_count"] = 3  # what submitit sets for a batch of 3 jobs
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit DIR", "uid")
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=240",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@120",
                 "#SBATCH --account=plasticity", "#SBATCH --constraint=a100", "#SBATCH --mail-type=END",
                 "#SBATCH --job-name=lop-jax", "source .venv/bin/activate"):
        assert line in script.splitlines(), (line, script)


def test_jobs_are_planned_seed_group_by_seed_group(tmp_path):
    from lop_jax import cluster

    base = load_config(SMOKE, {"results_dir": str(tmp_path)})
    other = load_config(SMOKE, {"results_dir": str(tmp_path), "experiment_name": "other"})
    jobs = cluster.plan_jobs([base, other], [0, 1, 2, 3, 4], 2)
    assert [j.label for j in jobs] == ["smoke index 0,1", "other index 0,1", "smoke index 2,3", "other index 2,3",
                                       "smoke index 4", "other index 4"]
    with pytest.raises(cluster.ClusterError, match="share the experiment_name 'smoke'"):
        cluster.plan_jobs([base, base], [0], 1)
    moved = cluster.absolute_paths(load_config(SMOKE, {"results_dir": "rel", "data_source": "cifar100"}))
    assert moved.results_dir == str(Path("rel").resolve()) and moved.data_path == str(Path("data").resolve())


def test_bad_input_is_one_line_exit_2_and_the_dry_run_lists_the_jobs(tmp_path, capsys):
    from experiments.submit import main as submit
    from experiments.submit import parse_minutes

    assert [parse_minutes(t) for t in ("90", "4:00:00", "1-00:00:00", "0:30:01", "10:30")] == [90, 240, 1440, 31, 11]
    common = ["--config", SMOKE, "--results-dir", str(tmp_path)]
    for argv, message in [
        (["--time", "4h"], "--time: expected minutes, H:MM:SS or D-HH:MM:SS, got '4h'"),
        (["--seeds-per-job", "0"], "--seeds-per-job: expected at least 1, got 0"),
        (["--sbatch", "mail-type"], "--sbatch: expected KEY=VALUE, got 'mail-type'"),
        (["--time", "1", "--signal-delay", "90"], "--signal-delay 90 s does not fit in a time limit of 1 min"),
        (["--log", "mlflow"], "--log: unknown tracker 'mlflow'; expected tensorboard or wandb "
                              "(or both, comma-separated)"),
    ]:
        assert submit(common + argv) == EXIT_INPUT, argv
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert submit(["--seeds", "0"]) == EXIT_INPUT
    assert "give --config (repeatable) or --config-dir" in capsys.readouterr().err
    assert submit(common + ["--seeds", "0-2", "--seeds-per-job", "2", "--partition", "gpu", "--time", "4:00:00",
                            "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"2 job(s), slurm, job files under {tmp_path.resolve() / 'submitit' / '%j'}:"
    assert out[1] == f"  [0] smoke index 0,1 -> {tmp_path.resolve() / 'smoke'}"
    assert out[2] == f"  [1] smoke index 2 -> {tmp_path.resolve() / 'smoke'}"
    assert "slurm_partition=gpu" in out[3] and "timeout_min=240" in out[3] and "gpus_per_node=1" in out[3]
    # a results folder of another config is refused before anything is submitted
    folder = tmp_path / "smoke"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**load_config(SMOKE).to_dict(), "stepsize": 0.5}))
    assert submit(common + ["--dry-run"]) == EXIT_INPUT
    assert "holds runs of a different config (keys differ: stepsize)" in capsys.readouterr().err


def test_without_submitit_the_command_names_the_extra(monkeypatch, capsys):
    from experiments.submit import main as submit

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    assert submit(["--config", SMOKE, "--dry-run"]) == EXIT_INPUT
    assert capsys.readouterr().err.strip() == ("error: submitting needs the submitit package, which is not installed: "
                                               "pip install 'lop-jax[cluster]'")
