"""The results folder of one experiment (semantics §8): its layout, and the only code that reads or
writes it.

    <results_dir>/<experiment_name>/            an experiment directory: ``ExperimentDir``
        config.json                             the resolved config, one per directory
        <metric>/index-<N>.npy                  one array per metric and run index (analysis included)
        run_status/index-<N>.json               {"epochs_done": int, "finished": bool}
        model_parameters/index-<N>/epoch-<E>/   Orbax snapshot {params, batch_stats} at a task boundary
        checkpoints/index-<N>/                  the run's checkpoints (their format: lop_jax.checkpoint)
        previous_runs/index-<N>-<time>/         what ``--restart`` moved aside
        tensorboard/index-<N>/                  the run's TensorBoard event files (``--log tensorboard``)
        wandb/                                  the W&B run folders of every index (``--log wandb``)

Every file is written atomically (a temporary file, then a rename), so a kill never leaves half of
one. A results folder of the reference (metric arrays only) reads too: it has no config and no
run status.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lop_jax.config import OPERATIONAL_KEYS, Config, ConfigError, config_diff, make_config
from lop_jax.errors import InputError

# the names of the layout (the module docstring)
CONFIG_FILE, RUN_STATUS = "config.json", "run_status"
# folders of per-run files that are not small results: weights, checkpoints, runs moved aside
LARGE = SNAPSHOTS, CHECKPOINTS, PREVIOUS_RUNS = ("model_parameters", "checkpoints", "previous_runs")
# what the optional live tracking writes (lop_jax.tracking)
TENSORBOARD, WANDB = "tensorboard", "wandb"


class ResultsError(InputError, ValueError):
    """A file of a results folder is missing or unreadable; the message names it, in one line."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename, so a kill never half-writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    """Atomically save one array as ``.npy``."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _index_of(path: Path) -> int | None:
    """N of a per-run name (``index-<N>``, ``index-<N>.npy``, ``index-<N>.json``); None for others."""
    prefix, _, number = path.stem.partition("-")
    return int(number) if prefix == "index" and number.isdigit() else None


class ExperimentDir:
    """One experiment directory (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @classmethod
    def of(cls, cfg: Config) -> ExperimentDir:
        """``<results_dir>/<experiment_name>`` of a config (results_dir defaults to ./results)."""
        return cls(Path(cfg.results_dir or "results") / cfg.experiment_name)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"ExperimentDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.is_dir()

    # ---- config.json --------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> Config:
        """The stored config; ResultsError if it is missing, not JSON or not a valid config."""
        path = self.config_path
        if not path.is_file():
            raise ResultsError(f"no {CONFIG_FILE} in {self.path}")
        try:
            return make_config(json.loads(path.read_text()))
        except (OSError, ValueError) as err:  # ConfigError and JSONDecodeError are ValueErrors
            raise ResultsError(f"cannot read {path}: {err}") from None

    def config_diff(self, cfg: Config, remedy: str) -> list[str]:
        """Keys (operational ones aside) in which the stored config differs from ``cfg`` ([] without
        one); a stored file that is not JSON is a ConfigError that ends with ``remedy``."""
        if not self.has_config():
            return []
        try:
            old = json.loads(self.config_path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{self.config_path} is not valid JSON; {remedy}") from None
        return config_diff(old, cfg.to_dict(), ignore=OPERATIONAL_KEYS)

    def write_config(self, cfg: Config) -> None:
        """Store the resolved config; refuse to mix runs of a different config in one directory."""
        if self.has_config():
            diff = self.config_diff(cfg, "move it away or choose another experiment_name")
            if diff:
                raise ConfigError(f"{self.path} holds runs of a different config (keys differ: {', '.join(diff)}); "
                                  "use another experiment_name or results_dir")
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"results directory {self.path} is not writable: {err}") from None
        save_json(self.config_path, cfg.to_dict())

    # ---- run status ---------------------------------------------------------------------------
    def status_path(self, index: int) -> Path:
        return self.path / RUN_STATUS / f"index-{index}.json"

    def save_status(self, index: int, epochs_done: int, finished: bool) -> None:
        save_json(self.status_path(index), {"epochs_done": int(epochs_done), "finished": bool(finished)})

    def status(self, index: int) -> dict[str, Any] | None:
        """``{"epochs_done", "finished"}`` of run ``index``; None if it has none or it cannot be read."""
        try:
            status = json.loads(self.status_path(index).read_text())
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def is_finished(self, index: int) -> bool:
        status = self.status(index)
        return bool(status and status.get("finished"))

    def started_indices(self) -> list[int] | None:
        """Indices with a run status file (finished or not); None when there is no run_status folder."""
        folder = self.path / RUN_STATUS
        if not folder.is_dir():
            return None
        return sorted(i for i in map(_index_of, folder.glob("index-*.json")) if i is not None)

    def finished_indices(self) -> list[int] | None:
        """Indices whose status says finished; None when there is no run_status folder."""
        started = self.started_indices()
        return None if started is None else [i for i in started if self.is_finished(i)]

    # ---- metric arrays ------------------------------------------------------------------------
    def metric_path(self, metric: str, index: int) -> Path:
        return self.path / metric / f"index-{index}.npy"

    def has_metric(self, metric: str, index: int) -> bool:
        return self.metric_path(metric, index).is_file()

    def save_metric(self, metric: str, index: int, array: np.ndarray) -> None:
        save_npy(self.metric_path(metric, index), array)

    def load_metric(self, metric: str, index: int) -> np.ndarray:
        """One run's array of ``metric``; ResultsError if it is missing or unreadable."""
        path = self.metric_path(metric, index)
        if not path.is_file():
            raise ResultsError(f"missing {path} (index {index})")
        try:
            return np.load(path)
        except (OSError, ValueError) as err:
            raise ResultsError(f"cannot read {path}: {err}") from None

    def metric_indices(self, metric: str) -> list[int]:
        """Indices that have an array of ``metric``."""
        folder = self.path / metric
        found = map(_index_of, folder.glob("index-*.npy")) if folder.is_dir() else ()
        return sorted(i for i in found if i is not None)

    def metric_names(self, index: int) -> list[str]:
        """The metrics that run ``index`` has an array of, sorted."""
        return sorted(f.parent.name for f in self.run_files(index) if f.suffix == ".npy")

    def run_files(self, index: int) -> list[Path]:
        """The small files of run ``index``: every metric array and its status (no weights, no
        checkpoints), sorted."""
        if not self.exists():
            return []
        return sorted(f for folder in self.path.iterdir() if folder.is_dir() and folder.name not in LARGE
                      for f in folder.glob(f"index-{index}.*")
                      if f.is_file() and f.suffix in (".npy", ".json") and _index_of(f) == index)

    # ---- snapshots and checkpoints ------------------------------------------------------------
    def snapshot_path(self, index: int, epoch: int) -> Path:
        return (self.path / SNAPSHOTS / f"index-{index}" / f"epoch-{epoch}").absolute()

    def has_snapshot(self, index: int, epoch: int) -> bool:
        return self.snapshot_path(index, epoch).is_dir()

    def save_snapshot(self, index: int, epoch: int, params: Any, batch_stats: Any) -> None:
        """Save the network (params and BatchNorm statistics) with Orbax, after ``epoch`` epochs."""
        tree = {"params": jax.device_get(params), "batch_stats": jax.device_get(batch_stats)}
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(self.snapshot_path(index, epoch), tree, force=True)
            ckpt.wait_until_finished()

    def load_snapshot(self, index: int, epoch: int) -> tuple[Any, Any]:
        """(params, batch_stats) of a snapshot; ResultsError if it is missing."""
        path = self.snapshot_path(index, epoch)
        if not path.is_dir():
            raise ResultsError(f"missing network snapshot {path} (index {index}, epoch {epoch})")
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(path)
        return tree["params"], tree["batch_stats"]

    def checkpoint_path(self, index: int) -> Path:
        return (self.path / CHECKPOINTS / f"index-{index}").absolute()

    # ---- live tracking (lop_jax.tracking) -----------------------------------------------------
    def tensorboard_path(self, index: int) -> Path:
        """The folder of run ``index``'s TensorBoard event files (``--restart`` moves it aside too)."""
        return self.path / TENSORBOARD / f"index-{index}"

    @property
    def wandb_dir(self) -> Path:
        """The folder holding the W&B run folders (one per process that tracked an index)."""
        return self.path / WANDB

    @staticmethod
    def run_name(experiment_name: str, index: int) -> str:
        """A tracked run's name, ``<experiment_name>/index-<N>``: the seeds of a system share its prefix."""
        return f"{experiment_name}/index-{index}"

    def times_moved_aside(self, index: int) -> int:
        """How often ``--restart`` moved run ``index``'s files aside (its folders in ``previous_runs/``)."""
        folder = self.path / PREVIOUS_RUNS
        return sum(1 for p in folder.glob(f"index-{index}-*") if p.is_dir()) if folder.is_dir() else 0

    def move_run_aside(self, index: int) -> Path | None:
        """Move every file of run ``index`` to ``previous_runs/index-<N>-<time>/`` (for --restart).

        Nothing is deleted; returns the folder it went to, or None if there was nothing to move."""
        if not self.exists():
            return None
        dest = self.path / PREVIOUS_RUNS / f"index-{index}-{time.strftime('%Y%m%d-%H%M%S')}"
        moved = False
        for child in sorted(self.path.iterdir()):
            if not child.is_dir() or child.name == PREVIOUS_RUNS:
                continue
            for item in list(child.glob(f"index-{index}.*")) + list(child.glob(f"index-{index}")):
                (dest / child.name).mkdir(parents=True, exist_ok=True)
                shutil.move(str(item), str(dest / child.name / item.name))
                moved = True
        return dest if moved else None


def experiment_dirs(root: str | os.PathLike[str]) -> list[ExperimentDir]:
    """The experiment directories directly under ``root``, by name: folders with a config, a run
    status or a metric array (a results folder of the reference has only the arrays)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        folder = ExperimentDir(child)
        if folder.has_config() or folder.started_indices() is not None or any(
                _index_of(f) is not None for sub in child.iterdir() if sub.is_dir() for f in sub.glob("index-*.npy")):
            found.append(folder)
    return found


# Kept for code outside the package written against the earlier functions (notebooks, tests).
def save_status(exp_dir: str | os.PathLike[str], index: int, epochs_done: int, finished: bool) -> None:
    ExperimentDir(exp_dir).save_status(index, epochs_done, finished)


def load_snapshot(exp_dir: str | os.PathLike[str], index: int, epoch: int) -> tuple[Any, Any]:
    return ExperimentDir(exp_dir).load_snapshot(index, epoch)
