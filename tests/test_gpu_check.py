"""scripts/gpu_check.sh: the GPU readiness check's dry run on the CPU writes one JSON file with
every stage's figures, and bad input is a one-line error."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"
STAGES = ("float32_1_seed", "float32_5_seeds", "determinism", "checkpoint_cost", "bfloat16_1_seed", "cbp_overhead",
          "cost_analysis")


def _run(*args: str, timeout: float = 1600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc = _run("--cpu-dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_dry_run_writes_every_stage_and_names_the_device(dry_run):
    report, stdout = dry_run
    assert report["mode"] == "cpu-dry-run" and report["device"].startswith("cpu")
    assert report["errors"] == {}
    assert sorted(report["results"]) == sorted(STAGES)
    assert report["config_resolved"]["network_width"] == 4  # the smoke scale laid over the paper config
    assert report["goals"] == {"one_run_minutes": 45.0, "five_seeds_hours": 2.0}
    assert "wrote" in stdout and report["total_seconds"] > 0


def test_dry_run_throughput_and_compilations_are_sane(dry_run):
    results = dry_run[0]["results"]
    one, several, bf16 = results["float32_1_seed"], results["float32_5_seeds"], results["bfloat16_1_seed"]
    assert (one["indices"], several["indices"], bf16["indices"]) == ([0], [0, 1], [0])
    assert (one["precision"], several["precision"], bf16["precision"]) == ("float32", "float32", "bfloat16")
    for bench in (one, several, bf16):
        assert _positive(bench["train_images_per_second"]) and _positive(bench["eval_images_per_second"])
        assert _positive(bench["projected_full_run_seconds"]) and _positive(bench["compile_seconds"])
        assert bench["compilations"]["same_task_epochs"]["count"] == 0
        assert bench["device"].startswith("cpu")
    compiles = one["compilations"]
    assert "jit(run_step)" in compiles["first_epoch"]["programs"]
    new_task = compiles["new_task"]["programs"]
    assert new_task and not {"jit(run_step)", "jit(batch_metrics)", "jit(_boundary_reset)"} & set(new_task)


def test_dry_run_determinism_checkpoint_and_cbp_figures_are_sane(dry_run):
    results = dry_run[0]["results"]
    det = results["determinism"]
    assert "--xla_gpu_deterministic_ops=true" in det["xla_flags"]
    assert det["identical"] and det["differing_arrays"] == [] and det["arrays_compared"] >= 5
    assert det["cbp_replaces"] and det["replaced_units"] > 0
    assert det["scatter"]["ok"] and det["scatter"]["failures"] == [] and det["scatter"]["units_reset"] > 0
    ckpt = results["checkpoint_cost"]
    assert ckpt["network_width"] == 4 and _positive(ckpt["epoch_seconds"])
    assert math.isfinite(ckpt["wall_seconds_per_saved_epoch"]) and math.isfinite(ckpt["cpu_seconds_per_saved_epoch"])
    cbp = results["cbp_overhead"]
    assert cbp["indices"] == [0, 1] and cbp["replacement_rate"] == 1e-5
    for key in ("base_step_seconds", "cbp_step_seconds", "cbp_decided_once_step_seconds", "cbp_over_base",
                "cbp_decided_once_over_base"):
        assert _positive(cbp[key]), key


def test_dry_run_cost_analysis_and_verdict_are_sane(dry_run):
    report = dry_run[0]
    cost = report["results"]["cost_analysis"]
    one, five = cost["seeds"]["1"]["programs"], cost["seeds"]["5"]["programs"]
    for programs in (one, five):
        for name in ("train_step", "test_batch", "val_batch"):
            assert _positive(programs[name]["flops"]) and _positive(programs[name]["bytes_accessed"]), name
            assert _positive(programs[name]["peak_bytes"]), name
    assert 4 <= five["train_step"]["flops"] / one["train_step"]["flops"] <= 6  # five seeds' work in one program
    for gpu in ("A100 SXM4 80 GB", "H100 SXM5 80 GB"):
        proj = cost["seeds"]["1"]["projection"][gpu]
        assert 0 < proj["tensor_core_hours"] <= proj["fp32_cuda_core_hours"]
    verdict = report["verdict"]
    assert "dry run" in verdict["scale"]
    assert _positive(verdict["one_run_minutes"]) and _positive(verdict["five_seeds_hours"])
    assert isinstance(verdict["one_run_minutes_meets_goal"], bool)


def test_a_stage_in_its_own_process_as_on_a_gpu_writes_its_figures(tmp_path):
    """The GPU path (one fresh process per stage, the determinism flag for that stage alone),
    on the CPU at the smoke scale, with one stage."""
    out = tmp_path / "fresh.json"
    proc = _run("--cpu-dry-run", "--fresh-processes", "--stages", "determinism", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and list(report["results"]) == ["determinism"]
    det = report["results"]["determinism"]
    assert "--xla_gpu_deterministic_ops=true" in det["xla_flags"] and det["identical"] and det["cbp_replaces"]


@pytest.mark.parametrize(("args", "message"), [
    (["--cpu-dry-run", "--stages", "nope"], "unknown stages"),
    (["--cpu-dry-run", "--config", "no/such.json"], "no config file"),
])
def test_bad_input_is_a_one_line_error(args, message, tmp_path):
    proc = _run(*args, "--out", str(tmp_path / "x.json"), timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
