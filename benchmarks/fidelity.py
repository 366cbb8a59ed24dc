"""Do lop-jax and the PyTorch twin learn alike? Both sides over several seeds, on the same classes.

    python -m benchmarks.fidelity [--config configs/bench/three_tasks.json] --data-dir D \
        [--experiment-index 0-3] [--json OUT]

For every index, lop-jax's run of the config (``lop_jax.experiment.run_experiments``) and the
twin's run of the same index given lop-jax's class order (``benchmarks.torch_twin.run``), so that
both learn the same classes in the same order; the rest (initial weights, batches, augmentation)
comes from each side's own random stream, so a pair is two samples of one experiment. Written: the
test accuracy at the last epoch of every task, per side and index. The speed benchmarks do not
pass the class order (the work is the same whichever classes), so their accuracies are not
comparable; these are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import timing


def final_per_task(accuracy_per_epoch: np.ndarray, epochs_per_task: int) -> list[float]:
    """The test accuracy at the last epoch of each task."""
    return [round(float(a), 4) for a in np.asarray(accuracy_per_epoch)[epochs_per_task - 1::epochs_per_task]]


def measure(config: str, data_dir: str, indices: list[int], work: Path) -> dict[str, Any]:
    """Run both sides for every index under ``work``; the final accuracies per task, by side and index."""
    from benchmarks import torch_twin
    from lop_jax.config import load_config
    from lop_jax.data import load_data
    from lop_jax.experiment import run_experiments
    from lop_jax.results import ExperimentDir

    cfg = load_config(config, {"data_path": data_dir, "results_dir": str(work / "lop_jax")})
    run_experiments(cfg, indices, progress=False, log=lambda m: None)
    runs = ExperimentDir(work / "lop_jax" / cfg.experiment_name)
    twin_cfg = load_config(config, {"data_path": data_dir, "results_dir": str(work / "torch")})
    data = load_data(twin_cfg)
    out: dict[str, Any] = {"lop_jax": {}, "torch": {}}
    for i in indices:
        order = runs.load_metric("class_order", i)
        out["lop_jax"][str(i)] = final_per_task(runs.load_metric("test_accuracy_per_epoch", i), cfg.epochs_per_task)
        twin = torch_twin.run(twin_cfg, i, data, class_order=order)
        out["torch"][str(i)] = final_per_task(twin["test_accuracy_per_epoch"], cfg.epochs_per_task)
    return {"benchmark": "fidelity", "config": config, "indices": indices, "epochs_per_task": cfg.epochs_per_task,
            "final_test_accuracy_per_task": out, "device": timing.device_description()}


def main(argv: list[str] | None = None) -> int:
    from lop_jax.cli import parse_indices
    from lop_jax.errors import LopJaxError

    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench/three_tasks.json")
    p.add_argument("--data-dir", required=True, help="the folder holding cifar-100-python")
    p.add_argument("--experiment-index", default="0-3", help="the seeds: '0-3', '0,2,5'")
    p.add_argument("--json", help="write the accuracies to this file")
    args = p.parse_args(argv)
    try:
        indices = parse_indices(args.experiment_index)
        with tempfile.TemporaryDirectory(prefix="lop-jax-fidelity-") as tmp:
            out = measure(args.config, str(Path(args.data_dir).absolute()), indices, Path(tmp))
    except (LopJaxError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for side in ("lop_jax", "torch"):
        for i, acc in out["final_test_accuracy_per_task"][side].items():
            print(f"{side:<8} index {i}: final test accuracy per task {acc}")
    timing.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
