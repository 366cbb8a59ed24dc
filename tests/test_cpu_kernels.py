"""lop_jax.cpu_kernels: the config's cpu_kernels, the per-program option and the process flag."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO_ROOT

from lop_jax.config import ConfigError, make_config
from lop_jax.cpu_kernels import (
    EIGEN_YNN_FUSIONS,
    MULTI_OUTPUT_FUSION,
    compiler_options,
    has_multi_output_fusion,
    prepare_process,
)

# a child process: the config's kernels prepared, then how many fusions XLA makes of a batch norm-like
# chain read by both a transpose and a reduction (multi-output fusion makes one fewer)
CHILD = """
import os, sys
from lop_jax.config import make_config
from lop_jax.cpu_kernels import prepare_process
print(prepare_process(make_config({{"cpu_kernels": "{kernels}"}})))
import jax, jax.numpy as jnp
x = jax.ShapeDtypeStruct((90, 32, 32, 64), jnp.float32)
def chain(x):
    y = jnp.maximum(x * 2 + 1, 0)
    return jnp.transpose(y, (3, 1, 2, 0)), jnp.sum(y, axis=(0, 1, 2))
text = jax.jit(chain).lower(x).compile().as_text().split("ENTRY")[1]
print(sum(" fusion(" in line for line in text.splitlines()))
print("flags:" + os.environ.get("XLA_FLAGS", ""))
"""


def _child(kernels: str) -> list[str]:
    env = {"PATH": "", "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", CHILD.format(kernels=kernels)], capture_output=True, text=True,
                         env=env, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-3:]


def test_eigen_fused_sets_multi_output_fusion_before_jax_starts():
    said, fusions, flags = _child("eigen_fused")
    assert said.startswith("cpu_kernels 'eigen_fused': set XLA_FLAGS=") and flags == f"flags:{MULTI_OUTPUT_FUSION}"
    said_default, fusions_default, flags_default = _child("eigen")
    assert said_default == "None" and flags_default == "flags:"
    assert int(fusions) < int(fusions_default)  # the flag took effect in the process


def test_prepare_process_leaves_other_kernels_and_a_set_flag_alone():
    for kernels in ("default", "eigen"):
        environ = {}
        assert prepare_process(make_config({"cpu_kernels": kernels}), environ) is None and environ == {}
    environ = {"XLA_FLAGS": f"--xla_cpu_max_isa=AVX2 {MULTI_OUTPUT_FUSION}"}
    assert has_multi_output_fusion(environ)
    assert prepare_process(make_config({"cpu_kernels": "eigen_fused"}), environ) is None
    assert environ == {"XLA_FLAGS": f"--xla_cpu_max_isa=AVX2 {MULTI_OUTPUT_FUSION}"}


def test_eigen_fused_after_jax_started_without_the_flag_is_a_config_error():
    jnp.ones(2).block_until_ready()  # the backend has started in this process
    with pytest.raises(ConfigError, match="cpu_kernels.*XLA_FLAGS"):
        prepare_process(make_config({"cpu_kernels": "eigen_fused"}), {})


def test_a_run_refused_for_its_kernels_writes_nothing(tmp_path, monkeypatch):
    from lop_jax.experiment import run_experiments

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    jnp.ones(2).block_until_ready()
    cfg = make_config({"cpu_kernels": "eigen_fused", "data_source": "embedded", "results_dir": str(tmp_path),
                       "experiment_name": "refused"})
    with pytest.raises(ConfigError, match="cpu_kernels"):
        run_experiments(cfg, [0], progress=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_compiler_options_only_for_the_eigen_kernels_on_the_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert compiler_options(make_config({})) is None
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(ConfigError, match="cpu_kernels"):  # a program of eigen_fused without its flag
        compiler_options(make_config({"cpu_kernels": "eigen_fused"}))
    monkeypatch.setenv("XLA_FLAGS", MULTI_OUTPUT_FUSION)
    for kernels in ("eigen", "eigen_fused"):
        assert compiler_options(make_config({"cpu_kernels": kernels})) == {
            "xla_cpu_experimental_ynn_fusion_type": EIGEN_YNN_FUSIONS}
