"""What a run records (semantics §8), in the reference's layout, written atomically.

    <exp_dir>/config.json                         the resolved config
    <exp_dir>/<metric>/index-<N>.npy              one array per metric and run index
    <exp_dir>/run_status/index-<N>.json           {"finished": bool, "epochs_done": int}
    <exp_dir>/model_parameters/index-<N>/epoch-<E>/   Orbax snapshot {params, batch_stats}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lop_jax.config import Config

EPOCH_METRICS = ("test_loss_per_epoch", "test_accuracy_per_epoch", "test_evaluation_runtime",
                 "validation_loss_per_epoch", "validation_accuracy_per_epoch", "validation_evaluation_runtime",
                 "epoch_runtime")
STEP_METRICS = ("train_loss_per_checkpoint", "train_accuracy_per_checkpoint")


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
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def metric_path(exp_dir: Path, metric: str, index: int) -> Path:
    return Path(exp_dir) / metric / f"index-{index}.npy"


class RunResults:
    """Per-run result arrays, preallocated at full length like the reference's."""

    def __init__(self, cfg: Config, index: int, class_order: np.ndarray, extra: dict[str, tuple] | None = None):
        self.index = index
        self.arrays: dict[str, np.ndarray] = {m: np.zeros(cfg.num_epochs, np.float32) for m in EPOCH_METRICS}
        self.arrays.update({m: np.zeros(cfg.train_summaries, np.float32) for m in STEP_METRICS})
        for name, shape in (extra or {}).items():
            self.arrays[name] = np.zeros(shape, np.int64)
        self.arrays["class_order"] = np.asarray(class_order, np.int64)
        self.train_summary_pos = 0

    def save(self, exp_dir: Path) -> None:
        for name, arr in self.arrays.items():
            save_npy(metric_path(exp_dir, name, self.index), arr)


def save_status(exp_dir: Path, index: int, epochs_done: int, finished: bool) -> None:
    save_json(Path(exp_dir) / "run_status" / f"index-{index}.json",
              {"epochs_done": int(epochs_done), "finished": bool(finished)})


def load_status(exp_dir: Path, index: int) -> dict[str, Any] | None:
    p = Path(exp_dir) / "run_status" / f"index-{index}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def snapshot_path(exp_dir: Path, index: int, epoch: int) -> Path:
    return (Path(exp_dir) / "model_parameters" / f"index-{index}" / f"epoch-{epoch}").absolute()


def save_snapshot(exp_dir: Path, index: int, epoch: int, params: Any, batch_stats: Any) -> None:
    """Save the network (params and BatchNorm statistics) at a task boundary with Orbax."""
    path = snapshot_path(exp_dir, index, epoch)
    tree = {"params": jax.device_get(params), "batch_stats": jax.device_get(batch_stats)}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree, force=True)
        ckpt.wait_until_finished()


def load_snapshot(exp_dir: Path, index: int, epoch: int) -> tuple[Any, Any]:
    """(params, batch_stats) of a task-boundary snapshot; a clear error if it is missing."""
    path = snapshot_path(exp_dir, index, epoch)
    if not path.is_dir():
        raise FileNotFoundError(f"missing network snapshot {path} (index {index}, epoch {epoch})")
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(path)
    return tree["params"], tree["batch_stats"]
