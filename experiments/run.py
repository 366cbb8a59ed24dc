"""Run the incremental CIFAR-100 experiment: ``python -m experiments.run --config C --experiment-index N``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from lop_jax import cli, tracking
from lop_jax.config import ConfigError, load_config, read_config_values
from lop_jax.cpu_kernels import prepare_process
from lop_jax.data import find_local_copy, load_data
from lop_jax.errors import CommandFailed, Interrupted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__)
    cli.add_config_options(p)
    p.add_argument("--experiment-index", default="0",
                   help="run index (it fixes every random draw), or several: 0-4 or 0,2,5 (vmapped in one process)")
    p.add_argument("--verbose", action="store_true", help="print per-epoch accuracies instead of a progress bar")
    cli.add_data_dir(p)
    cli.add_results_dir(p)
    p.add_argument("--dry-run", action="store_true", help="validate, find the data, print the plan, and exit")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a Python module first (one that registers a plasticity method named in "
                        "the config's methods); repeatable")
    p.add_argument("--restart", action="store_true",
                   help="start the index over; its old files are moved to <exp_dir>/previous_runs/, not deleted")
    cli.add_log_option(p)
    return p


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    """Run (or with --dry-run plan) the experiment; exit codes as in ``lop_jax.errors``."""
    args = build_parser().parse_args(argv)
    track = tracking.parse_kinds(args.log)
    tracking.check_available(track)
    overrides = cli.config_overrides(args)
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"--import {module}: {err}") from None
    cfg = load_config(args.config, overrides)
    set_flags = prepare_process(cfg)  # before anything starts JAX's backends
    if set_flags:
        print(set_flags)
    indices = cli.parse_indices(args.experiment_index)
    if read_config_values(args.config).get("num_workers"):
        print("note: num_workers is accepted for compatibility and has no effect (the data lives on the device)")
    from lop_jax.experiment import run_experiments
    from lop_jax.methods import from_config
    from lop_jax.plan import make_plan
    from lop_jax.results import ExperimentDir

    if args.dry_run:
        print("resolved configuration:")
        for k, v in cfg.to_dict().items():
            print(f"  {k}: {json.dumps(v)}")
        if cfg.data_source == "cifar100" and find_local_copy(cfg.data_path) is None:
            print(f"data: no local copy under '{cfg.data_path or 'data'}'; the run would download it there")
        else:
            print(f"data: {load_data(cfg).source}")
        print(f"results: {ExperimentDir.of(cfg).path} (indices {', '.join(map(str, indices))})")
        print("plan:")
        for line in make_plan(cfg).lines():
            print(f"  {line}")
        names = [m.name for m in from_config(cfg).methods]
        print(f"  plasticity methods: {', '.join(names) if names else 'none (base deep-learning system)'}")
        print(f"  live tracking: {', '.join(track) if track else 'none (--log tensorboard|wandb)'}")
        return 0
    start = time.perf_counter()
    cli.enable_compilation_cache()
    try:
        run_experiments(cfg, indices, verbose=args.verbose, restart=args.restart, track=track)
    except KeyboardInterrupt:
        raise Interrupted("interrupted twice: the current epoch was abandoned; the last checkpoint stays, "
                          "run the same command to resume") from None
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        raise CommandFailed(f"cannot write the results{where}: {err.strerror or err}; "
                            "nothing already written was removed") from None
    from lop_jax.summary import end_of_run_text

    print(end_of_run_text(ExperimentDir.of(cfg), indices, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
