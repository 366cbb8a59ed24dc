"""The GPU readiness check: one command that measures, within about ten minutes on a machine with
a GPU, what the GPU goals need (one full paper run within 45 min on one H100, five vmapped seeds
within 2 h), and writes one JSON file.

    scripts/gpu_check.sh [--out FILE] [--config configs/continual_backpropagation.json]
        [--budget-seconds 570] [--cpu-dry-run]

Stages, in order of importance, each stopped when the budget runs out. On a GPU each runs in a
fresh process (so that one that fails or runs out of memory leaves the others, and the
determinism stage alone gets its XLA flags); the dry run runs them all in this process, with the
determinism flag set for all (it only concerns GPU kernels), unless ``--fresh-processes``:

    float32_1_seed      the paper config, one seed: throughput, projected run, compilations and
                        compile time per task (experiments.benchmark, synthetic images)
    float32_5_seeds     the same, five seeds vmapped (two in the dry run)
    determinism         XLA_FLAGS=--xla_gpu_deterministic_ops=true: CBP's scatter writes still
                        land (a unit reset with known masks), and two identical short CBP runs
                        give identical bits in every results array, with units replaced
    checkpoint_cost     scripts/checkpoint_cost.py at the paper's width (seconds per saved epoch)
    bfloat16_1_seed     the paper config in bfloat16, one seed
    cbp_overhead        the mapped CBP step against the base step and against CBP's former select
    cost_analysis       XLA's cost and memory analysis of the step and a roofline projection

The file names the device, and its ``verdict`` adds the measured parts into projected run times:
training and evaluation, one compilation of the epoch and evaluation per task (scan mode), and a
checkpoint every epoch. ``--cpu-dry-run`` runs the same stages at the smoke scale on the CPU (the
tests run it); its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
GOAL_ONE_RUN_MINUTES = 45.0
GOAL_FIVE_SEEDS_HOURS = 2.0
# stage → (seconds it may take at most on a GPU, at the smoke scale on the CPU)
STAGES: dict[str, tuple[int, int]] = {
    "float32_1_seed": (180, 300), "float32_5_seeds": (150, 300), "determinism": (150, 300),
    "checkpoint_cost": (150, 300), "bfloat16_1_seed": (120, 300), "cbp_overhead": (120, 300),
    "cost_analysis": (150, 300),
}
BUDGET_SECONDS = (570.0, 1500.0)  # on a GPU, in the dry run


def _smoke_scale() -> dict[str, Any]:
    scale = json.loads((REPO_ROOT / "configs" / "scales" / "smoke.json").read_text())
    return {k: v for k, v in scale.items() if not k.startswith("_") and k not in ("data_path", "results_dir")}


def _scale(dry_run: bool) -> dict[str, Any]:
    """The sizes laid over the config: the paper's own (none), or the smoke scale's."""
    return _smoke_scale() if dry_run else {}


def _seeds(dry_run: bool) -> list[int]:
    """The run indices of the several-seed stages: five, or two in the dry run (on the CPU a
    mapped step compiles one convolution per run, so five would only make the dry run slower)."""
    return [0, 1] if dry_run else [0, 1, 2, 3, 4]


# ---- the stages (run in a child process) --------------------------------------------------------


def _config(path: str, overrides: dict[str, Any]):
    from lop_jax.config import load_config

    return load_config(path, overrides)


def stage_benchmark(config: str, dry_run: bool, indices: list[int], precision: str, new_task: bool) -> dict:
    """Throughput, projection and compilations of the config at one precision (synthetic images)."""
    from experiments.benchmark import benchmark, synthetic_data

    cfg = _config(config, {**_scale(dry_run), "precision": precision})
    # the paper's mean task has 262 steps per epoch: time task 10 (250); the smoke scale's first task
    out = benchmark(cfg, indices, synthetic_data(cfg), steps=4 if dry_run else 250, new_task=new_task)
    out["projected_full_run_hours"] = out["projected_full_run_seconds"] / 3600
    return out


def _scatter_check(width: int) -> dict:
    """CBP's unit reset with known masks: every chosen unit's incoming kernel redrawn, its
    outgoing weights zeroed, its bias and BatchNorm reset; every other unit untouched."""
    import jax
    import numpy as np

    from lop_jax.cbp import reset_units
    from lop_jax.model import ResNet18, feature_layers, init_model

    layers = feature_layers(width)
    params, batch_stats = init_model(ResNet18(width=width), jax.random.PRNGKey(0))
    # the stem's units and the last layer's (whose outgoing weights are the head's): no other layer's
    # writes overlap theirs, so every expectation below is exact
    checked = (0, len(layers) - 1)
    masks = [(np.arange(layer.channels) % 3 == 1) & (i in checked) for i, layer in enumerate(layers)]
    new_p, new_bs = jax.device_get(jax.jit(lambda p, b, m: reset_units(p, b, m, jax.random.PRNGKey(1), width=width))(
        params, batch_stats, masks))
    params = jax.device_get(params)
    failures = []

    def get(tree, path):
        for name in path:
            tree = tree[name]
        return np.asarray(tree)

    for i in checked:
        layer, mask = layers[i], masks[i]
        old_k, new_k = get(params, layer.producer + ("kernel",)), get(new_p, layer.producer + ("kernel",))
        nxt = get(new_p, layer.next_layer + ("kernel",))
        old_nxt = get(params, layer.next_layer + ("kernel",))
        axis = nxt.ndim - 2
        checks = {
            "chosen kernels redrawn": bool(np.all(np.any((new_k != old_k).reshape(-1, layer.channels), axis=0)[mask])),
            "other kernels kept": bool(np.array_equal(new_k[..., ~mask], old_k[..., ~mask])),
            "outgoing weights zeroed": bool(np.all(np.take(nxt, np.flatnonzero(mask), axis=axis) == 0)),
            "other outgoing weights kept": bool(np.array_equal(
                np.take(nxt, np.flatnonzero(~mask), axis=axis), np.take(old_nxt, np.flatnonzero(~mask), axis=axis))),
            "BatchNorm reset": bool(np.all(get(new_p, layer.bn + ("scale",))[mask] == 1)
                                    and np.all(get(new_bs, layer.bn + ("var",))[mask] == 1)),
        }
        failures += [f"layer {i}: {name}" for name, ok in checks.items() if not ok]
    return {"layers_checked": len(checked), "units_reset": int(sum(m.sum() for m in masks)), "failures": failures,
            "ok": not failures}


def stage_determinism(config: str, dry_run: bool) -> dict:
    """Under the XLA flags this process got: the scatter check, then two identical short CBP runs
    (units replaced from the third step on) compared bit for bit in every results array."""
    import numpy as np

    from experiments.benchmark import device_name, synthetic_data
    from lop_jax.experiment import run_experiments

    overrides = {**_scale(dry_run), "num_tasks": 1, "epochs_per_task": 2, "replacement_rate": 0.05,
                 "maturity_threshold": 2, "checkpoint_every_epochs": 0, "experiment_name": "determinism"}
    arrays = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as root:
            cfg = _config(config, {**overrides, "results_dir": root})
            (record,) = run_experiments(cfg, [0], data=synthetic_data(cfg), progress=False, log=lambda m: None)
            arrays.append({k: np.asarray(v) for k, v in record.arrays.items() if not k.endswith("_runtime")})
    differing = sorted(k for k in arrays[0] if not np.array_equal(arrays[0][k], arrays[1].get(k), equal_nan=True))
    differing += sorted(set(arrays[0]) ^ set(arrays[1]))
    replaced = int(np.sum(arrays[0].get("replaced_units_per_epoch", 0)))
    return {"device": device_name(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "scatter": _scatter_check(cfg.network_width), "arrays_compared": len(arrays[0]),
            "differing_arrays": differing, "identical": not differing, "replaced_units": replaced,
            "cbp_replaces": replaced > 0}


def stage_checkpoint_cost(config: str, dry_run: bool) -> dict:
    """scripts/checkpoint_cost.py at the paper's width (smoke config for the dry run), its printed
    figures parsed."""
    width = _smoke_scale()["network_width"] if dry_run else _config(config, {}).network_width
    base = "configs/smoke.json" if dry_run else "configs/quick.json"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "checkpoint_cost.py"), "--config", base,
           "--epochs", "2" if dry_run else "8", "--pairs", "1", "--set", f"network_width={width}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"checkpoint_cost.py exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    text = proc.stdout
    wall = re.search(r"takes ([\d.]+) s; saving every epoch costs (-?[\d.]+) s of wall time per epoch "
                     r"\(([-+\d.]+) %\)", text)
    cpu = re.search(r"saving costs (-?[\d.]+) CPU-s per epoch", text)
    if not wall or not cpu:
        raise RuntimeError(f"could not read checkpoint_cost.py's figures from: {text.strip()[-500:]}")
    return {"config": base, "network_width": width, "epoch_seconds": float(wall.group(1)),
            "wall_seconds_per_saved_epoch": float(wall.group(2)), "wall_percent": float(wall.group(3)),
            "cpu_seconds_per_saved_epoch": float(cpu.group(1)), "output": text.strip().splitlines()}


def stage_cbp_overhead(config: str, dry_run: bool) -> dict:
    from experiments.benchmark import cbp_overhead, synthetic_data

    cfg = _config(config, _scale(dry_run))
    if not cfg.use_cbp:
        return {"skipped": "the config does not use CBP"}
    return cbp_overhead(cfg, _seeds(dry_run), synthetic_data(cfg), rounds=4 if dry_run else 9)


def stage_cost_analysis(config: str, dry_run: bool) -> dict:
    from experiments.benchmark import cost_analysis

    return cost_analysis(_config(config, _scale(dry_run)), [1, 5])


def run_stage(name: str, config: str, dry_run: bool) -> dict:
    """One stage in this process."""
    if name == "float32_1_seed":
        return stage_benchmark(config, dry_run, [0], "float32", new_task=True)
    if name == "float32_5_seeds":
        return stage_benchmark(config, dry_run, _seeds(dry_run), "float32", new_task=False)
    if name == "bfloat16_1_seed":
        return stage_benchmark(config, dry_run, [0], "bfloat16", new_task=False)
    if name == "determinism":
        return stage_determinism(config, dry_run)
    if name == "checkpoint_cost":
        return stage_checkpoint_cost(config, dry_run)
    if name == "cbp_overhead":
        return stage_cbp_overhead(config, dry_run)
    if name == "cost_analysis":
        return stage_cost_analysis(config, dry_run)
    raise ValueError(f"no stage named {name!r} (stages: {', '.join(STAGES)})")


# ---- the driver ----------------------------------------------------------------------------------


def _child_env(name: str, dry_run: bool, cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    # one compilation cache for every stage, every program in it: a program that several stages or
    # several runs of one stage (checkpoint_cost, determinism) share compiles once
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    flags = env.get("XLA_FLAGS", "").replace(DETERMINISTIC_FLAG, "").strip()
    env["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip() if name == "determinism" else flags
    return env


def _verdict(results: dict[str, Any], num_epochs: int, num_tasks: int, dry_run: bool) -> dict:
    """The measured parts added into projected run times, against the goals."""
    ckpt = results.get("checkpoint_cost") or {}
    save = max(float(ckpt.get("wall_seconds_per_saved_epoch", 0.0)), 0.0)
    out: dict[str, Any] = {"scale": "smoke (CPU dry run): not the goals' figures" if dry_run else "paper",
                           "checkpoint_seconds_per_epoch": save}
    for name, goal_key, goal in (("float32_1_seed", "one_run_minutes", GOAL_ONE_RUN_MINUTES * 60),
                                 ("float32_5_seeds", "five_seeds_hours", GOAL_FIVE_SEEDS_HOURS * 3600)):
        bench = results.get(name)
        if not bench:
            continue
        seeds = len(bench["indices"])
        # what a new task compiles (scan mode: the epoch and the evaluation); measured with one seed
        own = (bench.get("compilations") or {}).get("new_task", {}).get("seconds")
        per_task = own if own is not None else results.get("float32_1_seed", {}).get(
            "compilations", {}).get("new_task", {}).get("seconds", 0.0)
        total = bench["projected_full_run_seconds"] + num_tasks * per_task + seeds * num_epochs * save
        scale = 60 if goal_key == "one_run_minutes" else 3600
        out[goal_key] = total / scale
        out[f"{goal_key}_parts"] = {"train_and_evaluation_seconds": bench["projected_full_run_seconds"],
                                    "compile_seconds": num_tasks * per_task,
                                    "checkpoint_seconds": seeds * num_epochs * save}
        out[f"{goal_key}_meets_goal"] = total <= goal
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/continual_backpropagation.json", help="the paper config measured")
    p.add_argument("--out", default="results/gpu_check.json", help="the JSON file written")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help=f"stop starting stages after this many seconds (default {BUDGET_SECONDS[0]:.0f}, "
                        f"dry run {BUDGET_SECONDS[1]:.0f})")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same stages at the smoke scale on the CPU")
    p.add_argument("--stages", default=",".join(STAGES), help="a comma list of stages (default: all)")
    p.add_argument("--fresh-processes", action="store_true",
                   help="with --cpu-dry-run: each stage in its own process, as on a GPU")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage, write --stage-json
    p.add_argument("--stage-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    config = str(Path(args.config).resolve()) if Path(args.config).exists() else args.config
    if not Path(config).is_file():
        print(f"gpu_check: no config file {args.config}", file=sys.stderr)
        return 2
    if args.stage:
        out = run_stage(args.stage, config, args.cpu_dry_run)
        Path(args.stage_json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        print(f"gpu_check: unknown stages {unknown} (stages: {', '.join(STAGES)})", file=sys.stderr)
        return 2
    cfg = json.loads(json.dumps(_config(config, _scale(args.cpu_dry_run)).to_dict()))
    report: dict[str, Any] = {"schema": 1, "mode": "cpu-dry-run" if args.cpu_dry_run else "gpu",
                              "config": args.config, "config_resolved": cfg,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "goals": {"one_run_minutes": GOAL_ONE_RUN_MINUTES,
                                        "five_seeds_hours": GOAL_FIVE_SEEDS_HOURS},
                              "results": {}, "stage_seconds": {}, "errors": {}}
    budget = args.budget_seconds if args.budget_seconds is not None else BUDGET_SECONDS[int(args.cpu_dry_run)]
    t_start = time.perf_counter()
    in_process = args.cpu_dry_run and not args.fresh_processes
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if in_process:  # before the first stage imports JAX
            os.environ.update(_child_env("determinism", True, str(Path(tmp) / "xla")))
            sys.path.insert(0, str(REPO_ROOT))
        for name in stages:
            left = budget - (time.perf_counter() - t_start)
            limit = min(STAGES[name][1 if args.cpu_dry_run else 0], left)
            if limit < 20:
                report["errors"][name] = f"skipped: {left:.0f} s of the budget left"
                continue
            if in_process:
                t0 = time.perf_counter()
                print(f"gpu_check: {name}", flush=True)
                try:
                    report["results"][name] = json.loads(json.dumps(run_stage(name, config, True), default=str))
                except Exception as err:  # a failed stage is reported and the others still run
                    report["errors"][name] = f"{type(err).__name__}: " + " | ".join(str(err).splitlines()[-6:])
                report["stage_seconds"][name] = round(time.perf_counter() - t0, 1)
                continue
            stage_json = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--stage-json", str(stage_json),
                   "--config", config] + (["--cpu-dry-run"] if args.cpu_dry_run else [])
            t0 = time.perf_counter()
            print(f"gpu_check: {name} (at most {limit:.0f} s)", flush=True)
            try:
                env = _child_env(name, args.cpu_dry_run, str(Path(tmp) / "xla"))
                proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=limit,
                                      check=False)
                if proc.returncode:
                    report["errors"][name] = f"exit {proc.returncode}: " + " | ".join(
                        proc.stderr.strip().splitlines()[-6:])
                else:
                    report["results"][name] = json.loads(stage_json.read_text())
            except subprocess.TimeoutExpired:
                report["errors"][name] = f"stopped after {limit:.0f} s"
            report["stage_seconds"][name] = round(time.perf_counter() - t0, 1)
    results = report["results"]
    report["device"] = next((r["device"] for r in results.values() if isinstance(r, dict) and "device" in r),
                            "unknown (no stage finished)")
    report["verdict"] = _verdict(results, cfg["num_tasks"] * cfg["epochs_per_task"], cfg["num_tasks"],
                                 args.cpu_dry_run)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    v = report["verdict"]
    print(f"gpu_check: {report['device']}, {report['total_seconds']:.0f} s; wrote {out}")
    for key in ("one_run_minutes", "five_seeds_hours"):
        if key in v:
            print(f"  projected {key.replace('_', ' ')}: {v[key]:.2f} (goal {report['goals'][key]}, "
                  f"{'met' if v[f'{key}_meets_goal'] else 'NOT met'})")
    for name, err in report["errors"].items():
        print(f"  {name}: {err}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
