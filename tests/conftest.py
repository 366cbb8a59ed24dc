"""Shared fixtures: the repository root and the real CIFAR-100 (python version) next to it.

Real-data tests read ``../shared/data/cifar-100-python`` relative to the repository root. Where
it is absent they skip with a clear reason, except under CI (env var ``CI`` set), where the
folder must be there and its absence is a failure, never a silent skip.
"""

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

REPO_ROOT = Path(__file__).parents[1]
REAL_DATA_DIR = Path(__file__).parents[2] / "shared/data/cifar-100-python"


def pytest_configure(config):
    # Every run_experiment builds fresh jitted closures; a compilation cache private to this session lets the
    # repeated smoke runs reuse the executables of the first one (same programs, so same bits), which keeps the
    # suite fast on 2 CPU cores. A cache the user configured is left alone.
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    config.lop_jax_xla_cache = tempfile.mkdtemp(prefix="lop-jax-tests-xla-cache-")
    jax.config.update("jax_compilation_cache_dir", config.lop_jax_xla_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    cache = getattr(config, "lop_jax_xla_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


def require_real_data() -> Path:
    """The real CIFAR-100 folder; skip (locally) or fail (under CI) when it is missing."""
    if (REAL_DATA_DIR / "train").is_file() and (REAL_DATA_DIR / "test").is_file():
        return REAL_DATA_DIR
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the real CIFAR-100 is missing at {REAL_DATA_DIR}")
    pytest.skip(f"real CIFAR-100 (python version) not found at {REAL_DATA_DIR}")


@pytest.fixture(scope="session")
def real_data_dir():
    return require_real_data()


@pytest.fixture(scope="session")
def real_raw(real_data_dir):
    """The real files read independently of lop_jax: raw rows, NHWC uint8 images, labels, filenames, names."""
    out = {}
    for split in ("train", "test"):
        with open(real_data_dir / split, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        rows = np.asarray(d["data"], np.uint8)
        out[split + "_rows"] = rows
        out[split] = (rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d["fine_labels"]),
                      list(d["filenames"]))
    with open(real_data_dir / "meta", "rb") as f:
        out["names"] = tuple(pickle.load(f, encoding="latin1")["fine_label_names"])
    return out


def write_replacing_cbp_config(folder: Path) -> Path:
    """A config file for CBP at the smoke scale with a rate that replaces units within its few
    steps (rate 0.05, maturity 2), as a command-line run reads it: ``<folder>/cbp_smoke.json``."""
    import json

    path = folder / "cbp_smoke.json"
    path.write_text(json.dumps({"extends": [str(REPO_ROOT / "configs" / "continual_backpropagation.json"),
                                            str(REPO_ROOT / "configs" / "scales" / "smoke.json")],
                                "experiment_name": "cbp_smoke", "replacement_rate": 0.05, "maturity_threshold": 2}))
    return path
