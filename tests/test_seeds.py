"""Seeds as a batch axis (issue 6): vmapped indices against single runs, repeatability, sharding over
(fake) devices, and the bfloat16 switch, all on the smoke config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from lop_jax.config import load_config
from lop_jax.data import load_data
from lop_jax.experiment import run_experiments

SMOKE = REPO_ROOT / "configs" / "smoke.json"
# measured on the smoke config (2 tasks x 2 epochs, width 4): 0 on this project's CPU machine, where
# the conv vmap rule runs one convolution per seed; XLA may sum in another order elsewhere
VMAP_TOLERANCE = 1e-3
COMPARED = ("test_accuracy_per_epoch", "test_loss_per_epoch", "validation_accuracy_per_epoch",
            "validation_loss_per_epoch", "train_loss_per_checkpoint", "train_accuracy_per_checkpoint")


def _run(root, indices, **overrides):
    cfg = load_config(SMOKE, {"results_dir": str(root), "checkpoint_every_epochs": 0, **overrides})
    return {r.index: {m: np.array(r.arrays[m]) for m in COMPARED + ("class_order",)}
            for r in run_experiments(cfg, indices, data=load_data(cfg), progress=False, log=lambda m: None)}


def largest_difference(a, b):
    return max(float(np.max(np.abs(a[m] - b[m]))) for m in COMPARED)


@pytest.fixture(scope="module")
def together(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("together"), [0, 1])


def test_vmapped_indices_equal_single_runs_and_repeat_bit_for_bit(together, tmp_path):
    alone = {i: _run(tmp_path / f"alone{i}", [i])[i] for i in (0, 1)}
    for i in (0, 1):
        assert np.array_equal(together[i]["class_order"], alone[i]["class_order"])
        diff = largest_difference(together[i], alone[i])
        print(f"index {i}: largest |vmapped - single| over the smoke run's results = {diff:.3g}")
        assert diff <= VMAP_TOLERANCE
    again = _run(tmp_path / "again", [0, 1])
    for i in (0, 1):
        assert all(np.array_equal(again[i][m], together[i][m]) for m in COMPARED)
    assert not np.array_equal(together[0]["test_loss_per_epoch"], together[1]["test_loss_per_epoch"])


def test_seed_axis_sharded_over_two_fake_cpu_devices_gives_the_same_results(together, tmp_path):
    script = (
        "import json, sys, jax\n"
        "assert len(jax.devices()) == 2, jax.devices()\n"
        "from lop_jax.config import load_config\n"
        "from lop_jax.experiment import run_experiments, seed_sharding\n"
        "assert seed_sharding(2) is not None\n"
        f"cfg = load_config({str(SMOKE)!r}, {{'results_dir': sys.argv[1], 'checkpoint_every_epochs': 0}})\n"
        "out = run_experiments(cfg, [0, 1], progress=False, log=lambda m: None)\n"
        f"json.dump({{r.index: {{m: r.arrays[m].tolist() for m in {list(COMPARED)!r}}} for r in out}}, sys.stdout)\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = {int(k): {m: np.asarray(v, np.float32) for m, v in d.items()} for k, d in json.loads(proc.stdout).items()}
    for i in (0, 1):
        assert largest_difference(sharded[i], together[i]) <= VMAP_TOLERANCE


def test_bfloat16_runs_and_learns_on_the_smoke_config(tmp_path):
    cfg = load_config(SMOKE)
    run = _run(tmp_path, [0], precision="bfloat16")[0]
    acc = run["test_accuracy_per_epoch"].reshape(cfg.num_tasks, cfg.epochs_per_task)
    assert np.all(np.isfinite(run["test_loss_per_epoch"]))
    assert acc[0].max() > 1.5 / cfg.classes_per_task  # well above chance on the first task (5 classes)
    assert acc[1].max() > 1.5 / (2 * cfg.classes_per_task)  # and on the second (10 classes)
