"""The five paper systems end to end at smoke size: run (two indices vmapped) → analyse → plot.

Each system is its paper config with the smoke protocol's sizes laid over it, so the selection of
the algorithm comes from the reference's keys exactly as in a real run.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO_ROOT

from lop_jax import plots
from lop_jax.analysis import ANALYSIS_METRICS, analyze_experiment
from lop_jax.checkpoint import Checkpointer
from lop_jax.config import OPERATIONAL_KEYS, load_config
from lop_jax.experiment import RunInterrupted, run_experiments
from lop_jax.model import feature_layers
from lop_jax.results import ExperimentDir
from lop_jax.train import init_state

SYSTEMS = ("base_deep_learning_system", "continual_backpropagation", "shrink_and_perturb", "head_resetting",
           "retrained_network")
SCALE = REPO_ROOT / "configs" / "scales" / "systems_test.json"
# CBP at smoke scale: mature after 2 steps, rate·channels 0.1–0.8 per step, so every layer replaces
CBP = {"maturity_threshold": 2, "replacement_rate": 0.0125}
INDICES = [0]


def smoke_config(system: str, results_dir, **extra):
    overrides = {**(CBP if system == "continual_backpropagation" else {}), **extra, "results_dir": str(results_dir),
                 "experiment_name": system}
    return load_config([REPO_ROOT / "configs" / f"{system}.json", SCALE], overrides)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("systems")
    cfgs = {}
    for system in SYSTEMS:
        cfg = smoke_config(system, root)
        if system in ("head_resetting", "retrained_network"):  # stop right after the first task boundary
            with pytest.raises(RunInterrupted):
                run_experiments(cfg, INDICES, progress=False, stop_after_epoch=cfg.epochs_per_task)
        run_experiments(cfg, INDICES, progress=False)
        analyze_experiment(root / system, progress=False)
        cfgs[system] = cfg
    return root, cfgs


def _metric(root, system, metric, index=0):
    return np.load(root / system / metric / f"index-{index}.npy")


def test_cbp_replaces_units_in_every_feature_layer_and_still_learns(sweep):
    root, cfgs = sweep
    cfg = cfgs["continual_backpropagation"]
    for index in INDICES:
        replaced = _metric(root, "continual_backpropagation", "replaced_units_per_epoch", index)
        assert replaced.shape == (cfg.num_epochs, len(feature_layers(cfg.network_width)))
        assert np.all(replaced.sum(axis=0) > 0), replaced
        test_acc = _metric(root, "continual_backpropagation", "test_accuracy_per_epoch", index)
        loss = _metric(root, "continual_backpropagation", "train_loss_per_checkpoint", index)
        # task 1 has 5 classes (chance 0.2, loss ln 5 ≈ 1.61 at the start): the network learns them
        # while units are being replaced
        assert test_acc[:cfg.epochs_per_task].max() > 0.3, test_acc
        per_task1 = cfg.steps_per_epoch(0) // cfg.running_avg_window * cfg.epochs_per_task
        assert loss[per_task1 - 1] < loss[0], loss
    for system in SYSTEMS:
        if system != "continual_backpropagation":
            assert not (root / system / "replaced_units_per_epoch").exists()


def _checkpoint_params(root, system, index, epoch, cfg):
    ckpt = Checkpointer(root / system, index, cfg, ignore_keys=OPERATIONAL_KEYS)
    try:
        state = ckpt.restore(epoch, init_state(cfg, index)).state
    finally:
        ckpt.close()
    return state.params, state.batch_stats


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("system", ["head_resetting", "retrained_network"])
def test_task_boundary_resets_run_after_the_restore_and_the_snapshot(sweep, system):
    """The snapshot at the boundary is the restored network before the reset; the checkpoint right
    after it holds the network after the reset: the Linear layer (head resetting) or every weight
    (retrained network) fresh, the BatchNorm running statistics kept."""
    root, cfgs = sweep
    epoch = cfgs[system].epochs_per_task
    for index in INDICES:
        snap_params, snap_stats = ExperimentDir(root / system).load_snapshot(index, epoch)
        params, stats = _checkpoint_params(root, system, index, epoch, cfgs[system])
        assert not _same(params["fc"]["kernel"], snap_params["fc"]["kernel"])
        assert np.all(np.asarray(params["fc"]["bias"]) == 0)
        conv_kept = _same(params["block3"]["conv1"]["kernel"], snap_params["block3"]["conv1"]["kernel"])
        assert conv_kept == (system == "head_resetting")
        bn_scale = np.asarray(params["block3"]["bn1"]["scale"])
        assert np.all(bn_scale == 1) == (system == "retrained_network")
        assert _same(stats["block3"]["bn1"]["mean"], snap_stats["block3"]["bn1"]["mean"])
        assert _same(stats["stem_bn"]["var"], snap_stats["stem_bn"]["var"])


def test_analysis_of_every_system_has_one_value_per_task(sweep):
    root, cfgs = sweep
    for system in SYSTEMS:
        for index in INDICES:
            for metric in ANALYSIS_METRICS:
                values = _metric(root, system, metric, index)
                # per-class accuracy covers every class of the run's class order (20 in the embedded subset)
                n = (_metric(root, system, "class_order", index).size if metric == "accuracy_per_class_in_order"
                     else cfgs[system].num_tasks)
                assert values.shape == (n,), (system, metric)
                assert np.all(np.isfinite(values)), (system, metric)
            dormant = _metric(root, system, "next_task_dormant_units_analysis", index)
            assert np.all((dormant >= 0) & (dormant <= 1))


def test_plots_and_table_from_real_runs(sweep, tmp_path):
    root, _ = sweep
    written = plots.plot_all(root, list(SYSTEMS), tmp_path / "figures", log=lambda m: None)
    names = {p.name for p in written}
    for stem in ("relative_accuracy_per_epoch", "test_accuracy_per_epoch", "next_task_dormant_units_analysis",
                 "next_task_stable_rank_analysis", "summary"):
        assert f"{stem}.png" in names and f"{stem}.svg" in names, names
    assert all(p.stat().st_size > 1000 for p in written)
    rows = plots.summary_table(root, list(SYSTEMS))
    assert [r["algorithm"] for r in rows] == list(SYSTEMS)
    assert all(r["n"] == len(INDICES) and r["n_analysed"] == len(INDICES) for r in rows)
    baseline = next(r for r in rows if r["algorithm"] == "retrained_network")
    assert baseline["relative_accuracy"] is None
    assert all(r["relative_accuracy"] is not None for r in rows if r is not baseline)
