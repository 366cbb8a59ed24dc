"""Run the incremental CIFAR-100 experiment: ``python -m experiments.run --config C --experiment-index N``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from lop_jax.config import ConfigError, load_config, parse_override
from lop_jax.data import DataError, find_local_copy, load_data


def parse_indices(text: str) -> list[int]:
    """``"3"`` → [3]; ``"0-4"`` → [0, 1, 2, 3, 4]; ``"0,2,5"`` → [0, 2, 5] (ranges allowed in lists)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ConfigError(f"--experiment-index: expected N, A-B or a comma list of them, got {text!r}") from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise ConfigError(f"--experiment-index: expected distinct indices >= 0, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__)
    p.add_argument("--config", required=True, help="JSON config (the reference's files load unchanged)")
    p.add_argument("--experiment-index", default="0",
                   help="run index (it fixes every random draw), or several: 0-4 or 0,2,5 (vmapped in one process)")
    p.add_argument("--verbose", action="store_true", help="print per-epoch accuracies instead of a progress bar")
    p.add_argument("--data-dir", help="override the config's data_path")
    p.add_argument("--results-dir", help="override the config's results_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; the value is a JSON literal (true, 0.1, \"name\"); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate, find the data, print the plan, and exit")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a Python module first (one that registers a plasticity method named in "
                        "extra_methods); repeatable")
    p.add_argument("--restart", action="store_true",
                   help="start the index over; its old files are moved to <exp_dir>/previous_runs/, not deleted")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        if args.data_dir is not None:
            overrides["data_path"] = args.data_dir
        if args.results_dir is not None:
            overrides["results_dir"] = args.results_dir
        for module in args.imports:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ConfigError(f"--import {module}: {err}") from None
        cfg = load_config(args.config, overrides)
        indices = parse_indices(args.experiment_index)
        if "num_workers" in json.loads(open(args.config).read()):
            print("note: num_workers is accepted for compatibility and has no effect (the data lives on the device)")
        from lop_jax.algorithms import active_methods
        from lop_jax.checkpoint import CheckpointMismatch
        from lop_jax.experiment import RunError, RunInterrupted, experiment_dir, make_plan, run_experiments

        if args.dry_run:
            print("resolved configuration:")
            for k, v in cfg.to_dict().items():
                print(f"  {k}: {json.dumps(v)}")
            if cfg.data_source == "cifar100" and find_local_copy(cfg.data_path) is None:
                print(f"data: no local copy under '{cfg.data_path or 'data'}'; the run would download it there")
            else:
                print(f"data: {load_data(cfg).source}")
            print(f"results: {experiment_dir(cfg)} (indices {', '.join(map(str, indices))})")
            print("plan:")
            for line in make_plan(cfg).lines():
                print(f"  {line}")
            names = [m.name for m in active_methods(cfg)]
            print(f"  plasticity methods: {', '.join(names) if names else 'none (base deep-learning system)'}")
            return 0
        try:
            run_experiments(cfg, indices, verbose=args.verbose, restart=args.restart)
        except RunInterrupted as err:
            print(str(err), file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print("interrupted twice: the current epoch was abandoned; the last checkpoint stays, "
                  "run the same command to resume", file=sys.stderr)
            return 130
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            print(f"error: cannot write the results{where}: {err.strerror or err}; "
                  "nothing already written was removed", file=sys.stderr)
            return 1
        except (RunError, CheckpointMismatch) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
