"""Getting a notebook's kernel ready to use a lop-jax checkout (the notebooks' first cell).

The notebooks need the whole repository, not only the package: their settings are its configs/.
Their first cell finds or fetches a checkout as ``LOP_JAX_SOURCE`` says (``auto``, a git URL or a
folder; the README's Colab section), puts it first on ``sys.path`` and calls ``install``. This
module imports only the standard library, so that cell can import it from the checkout before
lop-jax or its dependencies are installed.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

CHECKOUT_MARKERS = ("pyproject.toml", "lop_jax", "configs")
DISTRIBUTION = "lop-jax"

Runner = Callable[..., Any]


class SetupError(RuntimeError):
    """The kernel cannot be made ready (no checkout there, or lop-jax missing outside Colab); one line."""


def is_checkout(folder: str | Path) -> bool:
    """Whether ``folder`` is a lop-jax checkout (its pyproject.toml, package and configs)."""
    return all((Path(folder) / name).exists() for name in CHECKOUT_MARKERS)


def _installed_version() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def gpu_present() -> bool:
    """Whether the runtime has an NVIDIA GPU (``nvidia-smi`` on the PATH, as on Colab's GPU runtimes)."""
    return shutil.which("nvidia-smi") is not None


def install(checkout: str | Path, allow_pip: bool, gpu: bool | None = None, run: Runner = subprocess.run) -> list[str]:
    """Make ``checkout`` usable in this kernel and return what was done, a line each.

    With ``allow_pip`` (on Colab) lop-jax is installed from the checkout (``pip install -e``) unless
    it already is, and on a GPU runtime JAX with CUDA at the version lop-jax pins. Without it
    nothing is installed: lop-jax must already be (``pip install -e .``), else ``SetupError``.
    ``gpu`` defaults to ``gpu_present()``; ``run`` runs a command (``subprocess.run``'s signature)."""
    checkout = Path(checkout).resolve()
    if not is_checkout(checkout):
        raise SetupError(f"{checkout} is not a lop-jax checkout (it needs {', '.join(CHECKOUT_MARKERS)})")
    version = _installed_version()
    lines = []
    if version is None and not allow_pip:
        raise SetupError(f"lop-jax is not installed in this kernel: run `pip install -e .` in {checkout}")
    if version is None:
        run([sys.executable, "-m", "pip", "install", "-q", "-e", str(checkout)], check=True)
        importlib.invalidate_caches()  # the new distribution's metadata, in this same kernel
        version = _installed_version() or "?"
        lines.append(f"installed lop-jax {version} from {checkout} with pip")
    else:
        lines.append(f"lop-jax {version} is installed; this notebook uses the checkout {checkout}")
    if allow_pip and (gpu_present() if gpu is None else gpu):
        jax = metadata.version("jax")
        run([sys.executable, "-m", "pip", "install", "-q", f"jax[cuda12]=={jax}"], check=True)
        lines.append(f"GPU runtime: installed jax[cuda12]=={jax}")
    elif allow_pip:
        lines.append("no GPU on this runtime: JAX runs on the CPU")
    return lines
