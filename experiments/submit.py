"""Submit a sweep to SLURM through submitit: configs × run indices, several indices per job, one job array.

    python -m experiments.submit (--config C [--config C2 ...] | --config-dir D --systems a,b) --seeds 0-4
        [--seeds-per-job 5] [--set KEY=VALUE] [--data-dir D] [--results-dir R] [--log tensorboard] [--analyze]
        [--partition P] [--time 1440] [--gpus-per-job 1] [--cpus-per-job N] [--mem-gb G]
        [--array-parallelism N] [--account A] [--qos Q] [--constraint C] [--setup LINE] [--sbatch KEY=VALUE]
        [--cluster slurm|local|debug] [--folder F] [--wait] [--dry-run]

Each job trains the indices of one config together (vmapped; sharded over the job's GPUs when
their number divides the indices). A job signalled before its time limit is requeued by
submitit and resumes from its last checkpoint. Runs already finished are not submitted again, so
rerunning the same command submits what is left. ``--cluster local`` runs the jobs on this
machine (to try a sweep), ``debug`` in this process. Needs ``pip install 'lop-jax[cluster]'``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from lop_jax import cli, tracking
from lop_jax.config import ConfigError
from lop_jax.errors import CommandFailed, InputError


def parse_minutes(text: str) -> int:
    """A time limit as SLURM writes it, in whole minutes (seconds round up): ``240``, ``MM:SS``,
    ``H:MM:SS`` or ``D-HH:MM:SS``."""
    try:
        days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
        parts = [int(p) for p in clock.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) == 2:  # MM:SS
            minutes = parts[0] + (1 if parts[1] else 0)
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
        else:
            raise ValueError
        minutes += int(days) * 24 * 60
    except ValueError:
        raise ConfigError(f"--time: expected minutes, H:MM:SS or D-HH:MM:SS, got {text!r}") from None
    if minutes < 1:
        raise ConfigError(f"--time: expected at least one minute, got {text!r}")
    return minutes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m experiments.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--config", action="append", default=[], help="a config to sweep; repeatable")
    what.add_argument("--config-dir", help="folder with one <system>.json per system (with --systems)")
    what.add_argument("--systems", help="comma-separated config names in --config-dir (default: the paper's five)")
    what.add_argument("--seeds", default="0", help="run indices of every config: N, A-B or a comma list (default 0)")
    what.add_argument("--seeds-per-job", type=int, default=1,
                      help="indices trained together (vmapped) in one job (default 1)")
    what.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of every config (a JSON literal); repeatable")
    cli.add_data_dir(what)
    cli.add_results_dir(what)
    cli.add_log_option(what, what="every epoch of every job")
    what.add_argument("--analyze", action="store_true", help="each job analyses its runs once they finish")
    where = p.add_argument_group("what each job asks for")
    where.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                       help="slurm (default), local (jobs on this machine), debug (in this process)")
    where.add_argument("--partition", help="SLURM partition")
    where.add_argument("--time", default="24:00:00", help="time limit per job: minutes, H:MM:SS or D-HH:MM:SS "
                                                          "(default 24:00:00); a job that reaches it is requeued")
    where.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per job, on one node (default 1)")
    where.add_argument("--cpus-per-job", type=int, help="CPUs per job")
    where.add_argument("--mem-gb", type=float, help="memory per job, GB")
    where.add_argument("--array-parallelism", type=int, help="at most this many jobs of the array at once")
    where.add_argument("--account", help="SLURM account")
    where.add_argument("--qos", help="SLURM quality of service")
    where.add_argument("--constraint", help="SLURM node constraint (e.g. a GPU type)")
    where.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="a shell line run first in each job (module load, source a venv); repeatable")
    where.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, without the dashes (e.g. mail-type=END); repeatable")
    where.add_argument("--signal-delay", type=int, default=120,
                       help="seconds before the time limit at which the job is signalled to requeue (default 120)")
    where.add_argument("--max-resubmissions", type=int, default=3,
                       help="time-limit requeues allowed per job (default 3)")
    where.add_argument("--job-name", default="lop-jax", help="SLURM job name (default lop-jax)")
    where.add_argument("--folder", help="submitit's job files and logs; %%j is the job id "
                                        "(default <results-dir>/submitit/%%j)")
    p.add_argument("--wait", action="store_true",
                   help="wait for every job and report; exit 1 if one failed (always with --cluster debug)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and the scheduler options; submit nothing")
    return p.parse_args(argv)


def sbatch_options(pairs: Sequence[str]) -> dict[str, str]:
    """``--sbatch KEY=VALUE`` pairs as submitit's ``slurm_additional_parameters``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sbatch: expected KEY=VALUE, got {pair!r}")
        out[key.strip().lstrip("-").replace("-", "_")] = value.strip()
    return out


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Plan, check and submit the sweep (and with --wait, wait for it); exit codes as in ``lop_jax.errors``."""
    args = parse_args(argv)
    track = tracking.parse_kinds(args.log)
    tracking.check_available(track)
    if importlib.util.find_spec("submitit") is None:
        raise InputError("submitting needs the submitit package, which is not installed: "
                         "pip install 'lop-jax[cluster]'")
    from lop_jax import cluster
    from lop_jax.config import load_config
    from lop_jax.results import ExperimentDir
    from lop_jax.sweep import SYSTEMS, load_system_configs

    overrides = cli.config_overrides(args)
    if bool(args.config) == bool(args.config_dir):
        raise ConfigError("give --config (repeatable) or --config-dir with --systems, not both or neither")
    configs = [load_config(c, overrides) for c in args.config] if args.config else load_system_configs(
        args.config_dir, cli.split_names(args.systems or ",".join(SYSTEMS)), overrides)
    configs = [cluster.absolute_paths(c) for c in configs]
    seeds = cli.parse_indices(args.seeds, "--seeds")
    options = cluster.ClusterOptions(
        cluster=args.cluster, time_min=parse_minutes(args.time), partition=args.partition,
        gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job, mem_gb=args.mem_gb,
        array_parallelism=args.array_parallelism, account=args.account, qos=args.qos, constraint=args.constraint,
        setup=tuple(args.setup), signal_delay_s=args.signal_delay, max_resubmissions=args.max_resubmissions,
        job_name=args.job_name, extra=sbatch_options(args.sbatch))
    jobs, done = [], []
    for spec in cluster.plan_jobs(configs, seeds, args.seeds_per_job):
        folder = ExperimentDir.of(spec.cfg)
        diff = folder.config_diff(spec.cfg, "move it away or choose another experiment_name")
        if diff:
            raise ConfigError(f"{folder.path} holds runs of a different config (keys differ: {', '.join(diff)}); "
                              "use another experiment_name or results_dir")
        todo = tuple(i for i in spec.indices if not folder.is_finished(i))
        done += [f"{spec.cfg.experiment_name}/{i}" for i in spec.indices if i not in todo]
        if todo:
            jobs.append(cluster.JobSpec(spec.cfg, todo))
    if done:
        print(f"already finished, not submitted: {', '.join(done)}")
    if not jobs:
        raise CommandFailed("every run of the sweep is already finished; nothing submitted")
    job_folder = Path(args.folder) if args.folder else Path(configs[0].results_dir) / "submitit" / "%j"
    if args.dry_run:
        print(f"{len(jobs)} job(s), {options.cluster}, job files under {job_folder}:")
        for k, spec in enumerate(jobs):
            print(f"  [{k}] {spec.label} -> {ExperimentDir.of(spec.cfg).path}")
        print("scheduler options (submitit names): " + ", ".join(
            f"{k}={v}" for k, v in sorted(options.executor_parameters().items())))
        return 0
    executor = cluster.make_executor(job_folder, options)
    handles = cluster.submit(jobs, executor, track=track, analyze=args.analyze)
    for handle, spec in zip(handles, jobs, strict=True):
        print(f"submitted job {handle.job_id}: {spec.label}")
    print(f"job files and logs: {job_folder}; rerun this command to submit what is left unfinished")
    if not args.wait and options.cluster != "debug":  # the debug executor runs a job when it is waited for
        return 0
    failed = cluster.wait(handles, jobs)
    if failed:
        raise CommandFailed(f"{len(failed)} of {len(jobs)} job(s) did not finish: {'; '.join(failed)}")
    print(f"all {len(jobs)} job(s) finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
