"""Golden smoke results: a refactoring must not change a single bit of what a run records.

Each case is a paper config with the smoke protocol's sizes laid over it (as ``configs/smoke.json``
sets them), run on the CPU and analysed; every array it leaves in its experiment directory
(``<metric>/index-<N>.npy``, the analysis' included) must equal the one recorded in
``tests/data/golden_smoke/<cpu class>/<case>.npz``: same dtype, same shape, same bytes. The wall-clock arrays
(``*_runtime``) are recorded zeroed and only their dtype and shape are compared. A missing golden
file or array fails; nothing here is skipped except on an accelerator (the records are CPU ones).

The cases: the five paper systems (index 0), CBP at a replacement rate that replaces units at this
size (indices 0 and 1 vmapped together, so the run axis is exercised with two runs) and the base
system with the epoch as one ``lax.scan`` (the accelerators' mode) instead of the CPU's loop.

XLA compiles for the CPU it runs on, and its code for the element-wise work (exp, log, the fused
multiply-adds) changes with the instruction set: the same program gives other bits with and without
FMA, and with AVX-512. So the cases run in a child process whose XLA is capped at AVX2
(``PINNED_XLA_FLAGS``); a CPU without AVX2 and FMA fails with a message saying so. The cap is not
enough across vendors: under it an Intel Xeon and an AMD EPYC (both with AVX-512) still give other
bits for the same program, whatever is left choosing its kernels by the CPU at run time. So the
records are kept per CPU class, the vendor (``cpu_class``: ``amd``, ``intel``), each the same code's
bits, and a machine is compared with its class's records; a class without records fails, naming
the command that makes them. Each class's ``provenance.json`` names the versions, the flags and
the CPU its records were made on.

Re-record (this machine's class), only on a commit whose results are known good, or when a
change of results is intended and explained in the commit:

    python tests/test_golden.py --write
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

REPO_ROOT = Path(__file__).parents[1]
GOLDEN_DIR = REPO_ROOT / "tests" / "data" / "golden_smoke"
# the sizes of configs/smoke.json (written out, so that an edit of that file does not move the records)
SMOKE_SCALE = {"data_source": "embedded", "num_tasks": 2, "classes_per_task": 5, "epochs_per_task": 2,
               "train_images_per_class": 20, "val_images_per_class": 10, "test_images_per_class": 10,
               "network_width": 4, "train_batch_size": 25, "test_batch_size": 25, "val_batch_size": 25,
               "running_avg_window": 2, "epoch_mode": "loop"}
# case → (paper config, overrides, run indices)
CASES = {
    "base_deep_learning_system": ("base_deep_learning_system", {}, [0]),
    "continual_backpropagation": ("continual_backpropagation", {}, [0]),
    "shrink_and_perturb": ("shrink_and_perturb", {}, [0]),
    "head_resetting": ("head_resetting", {}, [0]),
    "retrained_network": ("retrained_network", {}, [0]),
    "cbp_high_rate": ("continual_backpropagation", {"replacement_rate": 0.05, "maturity_threshold": 2}, [0, 1]),
    "base_scan_epochs": ("base_deep_learning_system", {"epoch_mode": "scan"}, [0]),
}
NOT_ARRAYS = ("checkpoints", "model_parameters", "run_status", "previous_runs")
# the instruction set XLA may use: the records are this code's bits under it
PINNED_XLA_FLAGS = "--xla_cpu_max_isa=AVX2"
NEEDED_CPU_FLAGS = ("avx2", "fma")


def run_case(case: str, root: Path) -> dict[str, np.ndarray]:
    """Run and analyse one case under ``root``; every array it wrote, as ``<metric>/index-<N>``."""
    from lop_jax.analysis import analyze_experiment
    from lop_jax.config import load_config
    from lop_jax.experiment import run_experiments

    system, overrides, indices = CASES[case]
    cfg = load_config(REPO_ROOT / "configs" / f"{system}.json",
                      {**SMOKE_SCALE, **overrides, "experiment_name": case, "results_dir": str(root)})
    run_experiments(cfg, indices, progress=False, log=lambda m: None)
    exp_dir = root / case
    analyze_experiment(exp_dir, progress=False, log=lambda m: None)
    return {f"{p.parent.name}/{p.stem}": np.load(p) for p in sorted(exp_dir.glob("*/index-*.npy"))
            if p.parent.name not in NOT_ARRAYS}


def _recorded_form(name: str, array: np.ndarray) -> np.ndarray:
    return np.zeros_like(array) if name.split("/")[0].endswith("_runtime") else array


def _cpu() -> tuple[str, set[str]]:
    """This machine's CPU model and instruction-set flags (Linux's /proc/cpuinfo; elsewhere the
    platform's processor name and no flags)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return platform.processor() or platform.machine(), set()
    model, flags = platform.machine(), set()
    for line in info.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == platform.machine():
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


def cpu_class() -> str:
    """The class of this CPU whose golden records it is compared with: its vendor, as
    /proc/cpuinfo's ``vendor_id`` names it (``amd``, ``intel``; another vendor by its own id)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    vendor = next((v.strip() for k, _, v in (ln.partition(":") for ln in lines) if k.strip() == "vendor_id"),
                  platform.processor() or platform.machine())
    return VENDORS.get(vendor, vendor.lower() or "unknown")


def records_dir() -> Path:
    """This machine's class's records."""
    return GOLDEN_DIR / cpu_class()


def _provenance() -> dict[str, str]:
    model, flags = _cpu()
    return {"recorded_with": f"jax {jax.__version__}, numpy {np.__version__}, {jax.default_backend()}",
            "xla_flags": PINNED_XLA_FLAGS, "cpu": model,
            "cpu_isa_flags": " ".join(f for f in sorted(flags) if f.startswith(("avx", "fma", "sse")))}


def _write_cases(out: Path, cases: list[str]) -> None:
    """Run ``cases`` here and write each one's arrays (in their recorded form) to ``out/<case>.npz``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            arrays = run_case(case, Path(tmp))
            np.savez_compressed(out / f"{case}.npz", **{k: _recorded_form(k, v) for k, v in arrays.items()})
            print(f"{case}: {len(arrays)} arrays", flush=True)


def run_pinned(out: Path, cases: list[str]) -> None:
    """Run ``cases`` in a child process whose XLA is capped at ``PINNED_XLA_FLAGS`` (the flags are read
    when XLA starts, so this process, whose XLA may be running already, cannot change them)."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {PINNED_XLA_FLAGS}".strip(),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__, "--run", str(out), *cases], env=env,
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, f"the pinned run failed:\n{done.stdout}\n{done.stderr[-4000:]}"


def write_golden() -> None:
    out = records_dir()
    run_pinned(out, list(CASES))
    (out / "provenance.json").write_text(json.dumps(_provenance(), indent=2) + "\n")


@pytest.fixture(scope="module")
def pinned_results(tmp_path_factory) -> Path:
    """Every case run once, in one child process under the pinned instruction set."""
    if jax.default_backend() != "cpu":
        pytest.skip("the golden records are CPU results (an accelerator sums in other orders)")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the golden records are x86-64 AVX2 code; this is {platform.machine()}")
    model, flags = _cpu()
    missing = [f for f in NEEDED_CPU_FLAGS if f not in flags]
    assert not missing, f"the golden records are AVX2+FMA code; this CPU ({model}) lacks {', '.join(missing)}"
    out = tmp_path_factory.mktemp("golden_rerun")
    run_pinned(out, sorted(CASES))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_results_array_is_bit_identical_to_the_golden_record(case, pinned_results):
    folder = records_dir()
    assert folder.is_dir(), (f"no golden records for this CPU class ({cpu_class()}; recorded: "
                             f"{', '.join(sorted(_classes())) or 'none'}); on a commit known good, record them with: "
                             "python tests/test_golden.py --write")
    path = folder / f"{case}.npz"
    assert path.is_file(), f"missing golden record {path}; record it with: python tests/test_golden.py --write"
    with np.load(path) as f:
        golden = {k: f[k] for k in f.files}
    with np.load(pinned_results / f"{case}.npz") as f:
        got = {k: f[k] for k in f.files}
    recorded = json.loads((folder / "provenance.json").read_text())
    where = f"(recorded with {recorded}; this is {_provenance()})"
    assert sorted(got) == sorted(golden), f"other arrays than recorded {where}"
    for name, want in golden.items():
        have = got[name]
        assert (have.dtype, have.shape) == (want.dtype, want.shape), f"{name}: dtype or shape changed {where}"
        assert np.array_equal(have, want) and have.tobytes() == want.tobytes(), f"{name}: values changed {where}"


def _classes() -> list[str]:
    return sorted(p.name for p in GOLDEN_DIR.iterdir() if p.is_dir()) if GOLDEN_DIR.is_dir() else []


def test_the_records_cover_what_they_are_meant_to():
    """In every class's records: CBP at the high rate replaced units in every run; the paper rate
    replaced none at this size; every case has the analysis; the vmapped case has both indices;
    the classes record the same arrays, and the data that does not depend on the CPU (the class
    orders) is the same in all."""
    classes = _classes()
    assert classes, f"no golden records under {GOLDEN_DIR}"

    def load(cls, case):
        with np.load(GOLDEN_DIR / cls / f"{case}.npz") as f:
            return {k: f[k] for k in f.files}

    for cls in classes:
        assert (GOLDEN_DIR / cls / "provenance.json").is_file(), cls
        for case, (_, _, indices) in CASES.items():
            arrays = load(cls, case)
            assert sorted(arrays) == sorted(load(classes[0], case)), (cls, case)
            for i in indices:
                for metric in ("test_accuracy_per_epoch", "train_loss_per_checkpoint", "class_order",
                               "next_task_dormant_units_analysis", "accuracy_per_class_in_order"):
                    assert f"{metric}/index-{i}" in arrays, (cls, case, metric, i)
                order = f"class_order/index-{i}"
                assert np.array_equal(arrays[order], load(classes[0], case)[order]), (cls, case)
        high = load(cls, "cbp_high_rate")
        assert all(high[f"replaced_units_per_epoch/index-{i}"].sum() > 0 for i in (0, 1)), cls
        assert load(cls, "continual_backpropagation")["replaced_units_per_epoch/index-0"].sum() == 0, cls
        total = sum(p.stat().st_size for p in (GOLDEN_DIR / cls).iterdir())
        assert total < 1_000_000, (cls, total)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_golden()
    elif sys.argv[1:2] == ["--run"] and len(sys.argv) > 3:
        _write_cases(Path(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit("usage: python tests/test_golden.py --write")
