"""Which kernels XLA's CPU backend runs a config's programs with (the config's ``cpu_kernels``).

``default`` is XLA's own choice (in jax 0.10.2 it hands convolutions, matrix products and
reductions to its YNNPACK library) with lop-jax's tap-sum kernel gradients (``lop_jax.conv``):
the bits every committed record and golden file was made with. ``eigen`` leaves the convolutions
out of the YNNPACK fusions, one compiler option per program, so that XLA runs them on its Eigen
path, which keeps both cores busy where YNNPACK runs the narrow layers on one; the gradients are
the ``eigen`` mode of ``lop_jax.conv``. ``eigen_fused`` is ``eigen`` with XLA's multi-output
fusion too, which stops XLA from recomputing batch norm, ReLU and the residual sums inside the
transposes the kernel gradients read; that option has no per-program form, it is a process-wide
``XLA_FLAGS`` entry, so :func:`prepare_process` sets it before JAX starts or refuses the run.
Both ``eigen`` variants give other bits than ``default`` (float32 rounding, step by step) and are
deterministic like it. On accelerators they change nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from lop_jax.config import Config, ConfigError

# the YNNPACK fusions kept under "eigen": matrix products and reductions (XLA's own reductions are
# several times slower there), not convolutions
EIGEN_YNN_FUSIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
MULTI_OUTPUT_FUSION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


def uses_eigen(cfg: Config) -> bool:
    """Whether the config's programs take the Eigen CPU kernels (CPU backend only). Every model and
    program built for a config asks this first, so this is also where ``eigen_fused`` makes sure
    of its process flag (:func:`prepare_process`, before this call starts JAX's backends): no
    program compiles with other kernels than its config names."""
    if cfg.cpu_kernels not in ("eigen", "eigen_fused"):
        return False
    prepare_process(cfg)
    import jax

    return jax.default_backend() == "cpu"


def compiler_options(cfg: Config) -> dict[str, str] | None:
    """The per-program XLA options of the config's jitted functions: under the ``eigen`` kernels on
    the CPU, convolutions left out of XLA's YNNPACK fusions; otherwise none."""
    return {"xla_cpu_experimental_ynn_fusion_type": EIGEN_YNN_FUSIONS} if uses_eigen(cfg) else None


def has_multi_output_fusion(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether ``XLA_FLAGS`` turns XLA's CPU multi-output fusion on."""
    return MULTI_OUTPUT_FUSION in environ.get("XLA_FLAGS", "").split()


def prepare_process(cfg: Config, environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Give the process what ``cfg.cpu_kernels`` needs before JAX starts its backends: for
    ``eigen_fused``, XLA's multi-output fusion in ``XLA_FLAGS``. Returns a line saying what was
    set, or None when nothing was needed; a CPU backend already started without it is a
    ``ConfigError`` (the run would silently take other kernels than its config names)."""
    if cfg.cpu_kernels != "eigen_fused" or has_multi_output_fusion(environ):
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        import jax

        if jax.default_backend() != "cpu":
            return None
        raise ConfigError(f"config key 'cpu_kernels': 'eigen_fused' needs XLA_FLAGS={MULTI_OUTPUT_FUSION} "
                          "before JAX starts, and JAX has started without it: set it in the environment "
                          "(or restart the kernel), or use 'eigen'")
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {MULTI_OUTPUT_FUSION}".strip()
    return f"cpu_kernels 'eigen_fused': set XLA_FLAGS={environ['XLA_FLAGS']}"
