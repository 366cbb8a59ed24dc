"""Sweeps on a cluster through submitit: any list of configs × run indices, as SLURM job arrays.

    python -m experiments.submit --config-dir configs --systems a,b --seeds 0-9 --seeds-per-job 5 \\
        --partition gpu --time 1440 --gpus-per-job 1

``plan_jobs`` cuts each config's indices into jobs of ``seeds_per_job`` indices; a job trains them
together in one process (``run_experiments`` vmaps them over a run axis, sharded over the job's
GPUs when their number divides the indices). ``submit`` sends every job of a sweep in one
submitit batch, which SLURM receives as one job array (``--array=0-<n-1>%<parallelism>``).

A job is a ``RunJob``, a ``submitit.helpers.Checkpointable``: submitit asks SLURM to signal the
job before its time limit (``--signal=USR2@<delay>``), calls ``RunJob.checkpoint`` and requeues
the job, at most ``max_resubmissions`` times. Nothing has to be saved there: the run checkpoints
every epoch and the requeued job, running the same config and indices, resumes from the newest
complete checkpoint by itself (``lop_jax.checkpoint``). A job whose runs are already finished
does nothing, so resubmitting a whole sweep only runs what is left.

This module needs the ``submitit`` package (``pip install 'lop-jax[cluster]'``);
``experiments.submit`` checks for it before importing it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from lop_jax.config import Config
from lop_jax.errors import InputError

CLUSTERS = ("slurm", "local", "debug")


class ClusterError(InputError, ValueError):
    """A sweep that cannot be submitted as asked (a missing package, an impossible option)."""


@dataclass(frozen=True)
class JobSpec:
    """One job: the run indices of one config, trained together in one process."""

    cfg: Config
    indices: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.cfg.experiment_name} index {','.join(map(str, self.indices))}"


def plan_jobs(configs: Sequence[Config], seeds: Sequence[int], seeds_per_job: int) -> list[JobSpec]:
    """Every config × the seeds, cut into jobs of at most ``seeds_per_job`` indices (in order);
    jobs are listed seed group by seed group, so a partly run array has every config at its first seeds."""
    if seeds_per_job < 1:
        raise ClusterError(f"--seeds-per-job: expected at least 1, got {seeds_per_job}")
    names = [c.experiment_name for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ClusterError(f"two configs share the experiment_name {repeated[0]!r} (one results folder each)")
    groups = [tuple(seeds[i:i + seeds_per_job]) for i in range(0, len(seeds), seeds_per_job)]
    return [JobSpec(cfg, group) for group in groups for cfg in configs]


def absolute_paths(cfg: Config) -> Config:
    """The config with its results and data folders made absolute (their defaults, ``results`` and
    ``data``, included), so that a job started in another working directory uses the same places."""
    data = {"data_path": str(Path(cfg.data_path or "data").resolve())} if cfg.data_source == "cifar100" else {}
    return dataclasses.replace(cfg, results_dir=str(Path(cfg.results_dir or "results").resolve()), **data)


@dataclass(frozen=True)
class ClusterOptions:
    """What each job asks the scheduler for (the SLURM meaning in brackets)."""

    cluster: str = "slurm"  # slurm, local (this machine, for trying a sweep), debug (in this process)
    time_min: int = 24 * 60  # wall-time limit per job, minutes [--time]
    partition: str | None = None  # [--partition]
    gpus_per_job: int = 1  # [--gpus-per-node; one node per job]
    cpus_per_job: int | None = None  # [--cpus-per-task]
    mem_gb: float | None = None  # [--mem]
    array_parallelism: int | None = None  # at most this many jobs of the array at once [--array=…%N]
    account: str | None = None  # [--account]
    qos: str | None = None  # [--qos]
    constraint: str | None = None  # [--constraint]
    setup: tuple[str, ...] = ()  # shell lines run first in the job script (module load, source a venv)
    signal_delay_s: int = 120  # the time-limit signal comes this long before the limit [--signal=USR2@N]
    max_resubmissions: int = 3  # time-limit requeues allowed per job
    job_name: str = "lop-jax"  # [--job-name]
    extra: Mapping[str, str] = field(default_factory=dict)  # any other sbatch option, name without "--"

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ClusterError(f"--cluster: expected one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        for name in ("time_min", "signal_delay_s"):
            if getattr(self, name) < 1:
                raise ClusterError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.gpus_per_job < 0 or self.max_resubmissions < 0:
            raise ClusterError("--gpus-per-job and --max-resubmissions cannot be negative")
        if self.signal_delay_s >= self.time_min * 60:
            raise ClusterError(f"--signal-delay {self.signal_delay_s} s does not fit in a time limit of "
                               f"{self.time_min} min")

    def executor_parameters(self) -> dict[str, Any]:
        """The options in the names of submitit's ``AutoExecutor.update_parameters``, for this cluster."""
        params: dict[str, Any] = {"timeout_min": self.time_min, "gpus_per_node": self.gpus_per_job,
                                  "nodes": 1, "tasks_per_node": 1, "name": self.job_name,
                                  "cpus_per_task": self.cpus_per_job, "mem_gb": self.mem_gb}
        own: dict[str, Any] = {"setup": list(self.setup) or None}  # local jobs get submitit's 30 s signal delay
        if self.cluster == "slurm":
            own.update(signal_delay_s=self.signal_delay_s, partition=self.partition,
                       array_parallelism=self.array_parallelism, account=self.account, qos=self.qos,
                       constraint=self.constraint, additional_parameters=dict(self.extra) or None)
        if self.cluster != "debug":
            params.update({f"{self.cluster}_{k}": v for k, v in own.items()})
        return {k: v for k, v in params.items() if v is not None}


class RunJob(submitit.helpers.Checkpointable):
    """One job of a sweep: train (and optionally analyse) the indices of one config in one process.

    ``checkpoint`` is what submitit calls when the job is signalled before its time limit (or
    preempted): it returns the same job to requeue, with its attempt counted; the requeued job
    resumes every run from its newest checkpoint because it asks for the same config and indices."""

    def __init__(self, cfg: Config, indices: Sequence[int], track: Sequence[str] = (), analyze: bool = False,
                 attempt: int = 1):
        self.cfg, self.indices, self.track, self.analyze = cfg, tuple(indices), tuple(track), analyze
        self.attempt = attempt

    def __call__(self) -> dict[str, Any]:
        """Run (resuming) and, with ``analyze``, analyse the finished runs; returns what was done."""
        from lop_jax.experiment import run_experiments
        from lop_jax.results import ExperimentDir
        from lop_jax.summary import end_of_run_text

        start = time.perf_counter()
        print(f"lop-jax job: {self.cfg.experiment_name}, index {','.join(map(str, self.indices))}, "
              f"attempt {self.attempt}", flush=True)
        run_experiments(self.cfg, list(self.indices), verbose=True, track=self.track)
        folder = ExperimentDir.of(self.cfg)
        finished = [i for i in self.indices if folder.is_finished(i)]
        print(end_of_run_text(folder, list(self.indices), time.perf_counter() - start), flush=True)
        if self.analyze and finished:
            from lop_jax.analysis import analyze_experiment
            from lop_jax.tracking import log_analysis

            results = analyze_experiment(folder.path, indices=finished, progress=False, log=print)
            if self.track and results:
                log_analysis(self.track, folder, self.cfg, results)
        return {"experiment": self.cfg.experiment_name, "indices": list(self.indices), "finished": finished,
                "attempts": self.attempt, "analysed": self.analyze and bool(finished)}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue the same job; it resumes from the runs' own checkpoints (nothing to save here)."""
        print(f"lop-jax job: {self.cfg.experiment_name}, index {','.join(map(str, self.indices))}: signalled "
              f"before the time limit in attempt {self.attempt}; requeued, it resumes from the last checkpoint",
              flush=True)
        return submitit.helpers.DelayedSubmission(
            RunJob(self.cfg, self.indices, self.track, self.analyze, self.attempt + 1))


def make_executor(folder: str | Path, options: ClusterOptions) -> Any:
    """A ``submitit.AutoExecutor`` for ``options``, writing its job files and logs under ``folder``
    (``%j`` in it becomes the job id)."""
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster,
                                         slurm_max_num_timeout=options.max_resubmissions,
                                         local_max_num_timeout=options.max_resubmissions)
        executor.update_parameters(**options.executor_parameters())
    except (ValueError, RuntimeError, NameError) as err:  # e.g. no srun on this machine for --cluster slurm
        raise ClusterError(f"--cluster {options.cluster}: {' '.join(str(err).split())}") from None
    return executor


def submit(jobs: Sequence[JobSpec], executor: Any, track: Sequence[str] = (), analyze: bool = False) -> list[Any]:
    """Submit every job in one batch (one SLURM job array); returns submitit's job handles."""
    with executor.batch():
        handles = [executor.submit(RunJob(spec.cfg, spec.indices, tuple(track), analyze)) for spec in jobs]
    return handles


def wait(handles: Sequence[Any], jobs: Sequence[JobSpec], say: Callable[[str], None] = print) -> list[str]:
    """Wait for every job; returns one line per job that failed (empty: all finished), and says
    each job's outcome as it ends."""
    failed = []
    pending = list(zip(handles, jobs, strict=True))
    while pending:
        for handle, spec in list(pending):
            if not handle.done():
                continue
            pending.remove((handle, spec))
            try:
                outcome = handle.result()
            except Exception as err:  # submitit re-raises the job's error, with its traceback, as one exception
                failed.append(f"{spec.label} (job {handle.job_id}): {' '.join(str(err).split()[-12:])}")
                say(f"job {handle.job_id}: {spec.label} failed; its log: {handle.paths.stderr}")
                continue
            say(f"job {handle.job_id}: {spec.label}: finished {outcome['finished']} of {list(spec.indices)}"
                f" after {outcome['attempts']} attempt(s)")
            if sorted(outcome["finished"]) != sorted(spec.indices):
                failed.append(f"{spec.label} (job {handle.job_id}): unfinished runs")
        if pending:
            time.sleep(2.0)
    return failed
