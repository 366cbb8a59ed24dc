"""The signature check (issue 13, item 5) on small synthetic exports written here: known values,
a known pass, known fails, and the CLI's exit codes and lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.scaled_sweep import main
from lop_jax import signature as S
from lop_jax.config import make_config

TASKS, EPOCHS, WIDTH, SEEDS = 4, 2, 8, (0, 1, 2)  # representation width 8·8 = 64

# per system: next-task dormant proportion and stable rank per snapshot, best test accuracy per task
PASSING = {
    "base_deep_learning_system": ([0.0, 0.10, 0.20, 0.30], [60, 58, 52, 46], [0.82, 0.78, 0.73, 0.70]),
    "retrained_network": ([0.0, 0.01, 0.01, 0.01], [60, 59, 59, 59], [0.80, 0.78, 0.76, 0.75]),
    "continual_backpropagation": ([0.0, 0.01, 0.015, 0.02], [60, 58, 58, 57], [0.82, 0.79, 0.77, 0.76]),
    "shrink_and_perturb": ([0.0, 0.03, 0.05, 0.07], [60, 58, 55, 54], [0.82, 0.78, 0.75, 0.74]),
    "head_resetting": ([0.0, 0.10, 0.20, 0.25], [60, 58, 55, 55], [0.82, 0.78, 0.74, 0.73]),
}


def write_export(root: Path, systems: dict = PASSING, seeds: tuple[int, ...] = SEEDS,
                 seconds: float = 600.0) -> Path:
    """An export as the sweep writes it: <root>/results/<system>/{config.json, run_status, arrays}
    and <root>/sweep_timing.json. Seed s shifts every value a little (so the spread is not 0)."""
    timing = {}
    for name, (dormant, rank, best) in systems.items():
        dest = root / "results" / name
        cfg = make_config({"experiment_name": name, "num_tasks": TASKS, "classes_per_task": 5,
                           "epochs_per_task": EPOCHS, "network_width": WIDTH, "data_source": "embedded"})
        dest.mkdir(parents=True)
        (dest / "config.json").write_text(json.dumps(cfg.to_dict()))
        for s in seeds:
            jitter = 0.002 * (s - 1)
            arrays = {
                "next_task_dormant_units_analysis": np.clip(np.asarray(dormant) + jitter, 0, 1),
                "next_task_stable_rank_analysis": np.asarray(rank, np.float64) + (s - 1),
                # each task: a worse first epoch, then its best
                "test_accuracy_per_epoch": np.repeat(np.asarray(best) + jitter, EPOCHS) - np.tile([0.05, 0.0], TASKS),
                "class_order": np.arange(5 * TASKS),
            }
            for metric, a in arrays.items():
                (dest / metric).mkdir(exist_ok=True)
                np.save(dest / metric / f"index-{s}.npy", np.asarray(a, np.float32))
            (dest / "run_status").mkdir(exist_ok=True)
            (dest / "run_status" / f"index-{s}.json").write_text(json.dumps({"epochs_done": TASKS * EPOCHS,
                                                                             "finished": True}))
            timing[f"{name}/index-{s}"] = {"seconds": seconds, "finished": True}
    (root / S.TIMING_FILE).write_text(json.dumps(timing))
    return root


def _by_name(criteria: list[S.Criterion]) -> dict[str, S.Criterion]:
    return {c.name: c for c in criteria}


def test_a_known_export_gives_the_known_numbers_and_passes(tmp_path):
    criteria = S.check_signature(write_export(tmp_path) / "results")
    assert len(criteria) == 9 and all(c.passed for c in criteria), [S.format_criterion(c) for c in criteria]
    c = _by_name(criteria)
    last = c["base dormant units at the last snapshot"]
    assert last.value == pytest.approx(30.0, abs=1e-4) and last.n == 3
    assert last.spread == pytest.approx(0.2 / np.sqrt(3), rel=1e-3)  # jitter −0.2, 0, +0.2 points
    assert c["base dormant units rising over tasks (slope, snapshots 1..last)"].value == pytest.approx(10.0, abs=1e-4)
    assert c["CBP dormant units at the last snapshot"].value == pytest.approx(2.0, abs=1e-4)
    assert c["base stable rank drop, first task to last snapshot"].value == pytest.approx(100 * 12 / 64)
    assert c["CBP stable rank change, first task to last snapshot"].value == pytest.approx(
        np.mean([100 * -1 / (58 + s - 1) for s in SEEDS]))
    assert c["base minus retrained best accuracy falling over tasks (slope)"].value == pytest.approx(-2.4, abs=1e-4)
    assert c["base minus retrained best accuracy at the last task"].value == pytest.approx(-5.0, abs=1e-4)
    assert c["CBP minus retrained best accuracy at the last task"].value == pytest.approx(1.0, abs=1e-4)
    assert c["every run's wall time (the slowest run)"].value == pytest.approx(10.0)

    rows, orders = S.compare_with_paper(tmp_path / "results")
    head = {r.system: r for r in rows}["head_resetting"]
    assert head.dormant[0] == pytest.approx(25.0, abs=1e-4)
    assert head.stable_rank[0] == pytest.approx(100 * 55 / 64)
    assert head.accuracy_minus_retrained[0] == pytest.approx(-2.0, abs=1e-4)
    assert all(o.matches for o in orders)


def test_the_cli_passes_a_passing_export(tmp_path, capsys):
    assert main(["--check", "--export-dir", str(write_export(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS  ") == 9 and "FAIL" not in out
    assert "shrink_and_perturb (n=3)" in out and "head_resetting (n=3)" in out
    assert "order of dormant units (%)" in out and out.strip().endswith("all 9 criteria pass")


def test_base_dormant_at_10_percent_fails_that_criterion(tmp_path, capsys):
    systems = {**PASSING, "base_deep_learning_system": ([0.0, 0.05, 0.08, 0.10],) + PASSING[
        "base_deep_learning_system"][1:]}
    assert main(["--check", "--export-dir", str(write_export(tmp_path, systems))]) == 1
    lines = capsys.readouterr().out.splitlines()
    failed = [ln for ln in lines if ln.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL  base dormant units at the last snapshot: 10.00")
    assert "needs >= 20" in failed[0]
    assert lines[-1].startswith("signature: 1 of 9 criteria fail: base dormant units at the last snapshot")
    # the paper's dormant order (CBP < S&P < head < base) no longer holds: head 25 % > base 10 %
    assert any(ln.startswith("  order of dormant units (%)") and "differs from" in ln for ln in lines)


def test_too_few_seeds_and_a_run_without_timing_fail_saying_why(tmp_path, capsys):
    root = write_export(tmp_path)
    cbp = root / "results" / "continual_backpropagation"
    (cbp / "run_status" / "index-2.json").write_text(json.dumps({"finished": False}))  # an unfinished run
    timing = json.loads((root / S.TIMING_FILE).read_text())
    del timing["head_resetting/index-1"]
    timing["base_deep_learning_system/index-0"]["seconds"] = 16 * 60
    (root / S.TIMING_FILE).write_text(json.dumps(timing))
    assert main(["--check", "--export-dir", str(root)]) == 1
    failed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FAIL")]
    cbp_lines = [ln for ln in failed if ln.startswith("FAIL  CBP")]
    assert len(cbp_lines) == 3 and all("n=2 seeds, 3 needed" in ln for ln in cbp_lines)
    wall = [ln for ln in failed if "wall time" in ln]
    assert len(wall) == 1 and "head_resetting/index-1" in wall[0]
    assert "base_deep_learning_system/index-0 16.0 min" in wall[0]


@pytest.mark.parametrize("case", ["empty", "no results", "no finished run", "no CBP"])
def test_an_export_that_cannot_be_judged_is_a_one_line_error(tmp_path, capsys, case):
    root = tmp_path / "export"
    if case == "empty":
        root.mkdir()
    elif case == "no results":
        pass
    elif case == "no finished run":
        write_export(root)
        for p in (root / "results").glob("*/run_status/*.json"):
            p.write_text(json.dumps({"finished": False}))
    else:
        write_export(root, {k: v for k, v in PASSING.items() if k != "continual_backpropagation"})
    assert main(["--check", "--export-dir", str(root)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and not captured.out
    assert ("continual_backpropagation" in err) if case == "no CBP" else ("no finished runs" in err)


def test_slope_and_mean_se():
    assert S.slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert S.mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / np.sqrt(3)))
    assert S.mean_se([4.0]) == (4.0, None)
