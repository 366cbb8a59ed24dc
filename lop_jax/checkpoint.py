"""Deterministic Orbax checkpoints keyed by run index, for exact resume.

A checkpoint holds everything a run needs to continue bit-identically: the whole TrainState
(params, BatchNorm statistics, optimiser state, algorithm state, the early-stopping copy, the
root key), the partial results arrays, and the host-side counters (epochs done, the running
train-summary sums and position). It lives in ``<exp_dir>/checkpoints/index-<N>/<epoch>/``;
Orbax writes each step to a temporary folder and renames it when complete, so a kill leaves
the previous complete checkpoint intact.

Each checkpoint also records a checksum per array (computed before the write starts, on the
device for device arrays so that only a few integers leave it). A restore recomputes them, so a
checkpoint that Orbax reads back without complaint but whose contents changed (a swapped or
silently damaged file) is treated like an unreadable one: set aside, previous one used.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lop_jax.config import Config, config_diff

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _device_checksum(x: jax.Array) -> jax.Array:
    """A position-weighted uint32 sum of the array's bits; any single changed element changes it."""
    x = x.ravel()
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)  # odd: invertible mod 2^32
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_device_checksums = jax.jit(lambda leaves: [_device_checksum(x) for x in leaves])


def _host_checksum(x: np.ndarray) -> int:
    """The same sum as ``_device_checksum`` for a numpy array (8-byte elements count as two words)."""
    x = np.ascontiguousarray(x).ravel()
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    bits = x.view(np.uint32) if x.dtype.itemsize == 8 else x.view(f"u{x.dtype.itemsize}").astype(np.uint32)
    weights = np.arange(bits.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return int(np.sum(bits * weights, dtype=np.uint32))


def tree_checksums(tree: Any) -> list[int]:
    """One checksum per leaf, the same for a device array and its host copy (device ones computed there)."""
    leaves = jax.tree_util.tree_leaves(tree)
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    out = [_host_checksum(x) if not isinstance(x, jax.Array) else 0 for x in leaves]
    for i, c in zip(on_device, jax.device_get(_device_checksums([leaves[i] for i in on_device])), strict=True):
        out[i] = int(c)
    return out


class ChecksumMismatch(ValueError):
    """A checkpoint that was read without error but holds other values than were saved."""


@dataclass
class Restored:
    """What a checkpoint gives back."""

    state: Any
    arrays: dict[str, np.ndarray]
    running: np.ndarray
    epochs_done: int
    train_summary_pos: int


def checkpoint_dir(exp_dir: Path, index: int) -> Path:
    return (Path(exp_dir) / "checkpoints" / f"index-{index}").absolute()


class Checkpointer:
    """Saves (asynchronously) and restores the checkpoints of one run index."""

    def __init__(self, exp_dir: Path, index: int, cfg: Config, ignore_keys: tuple[str, ...] = ()):
        self.cfg = cfg
        self.ignore_keys = ignore_keys
        self.path = checkpoint_dir(exp_dir, index)
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoints_to_keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.path, options=options)
        # Orbax's own save call blocks for a few tenths of a second even for a tiny state (host
        # copies, folders, metadata); one worker thread takes that off the training loop
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"checkpoint-{index}")
        self._pending: Future | None = None

    def save(self, epochs_done: int, state: Any, arrays: dict[str, np.ndarray], running: np.ndarray,
             train_summary_pos: int) -> None:
        """Start saving the run after ``epochs_done`` epochs (returns before the write ends).

        The state is copied to the host first (a donated buffer may be reused by the next epoch),
        and its checksums are taken where it lives; the write itself happens on a worker thread."""
        # Orbax cannot save zero-size arrays (e.g. no train summary when every epoch has fewer steps
        # than running_avg_window); they are left out and rebuilt empty on restore
        tree = {"state": state, "results": {k: v for k, v in arrays.items() if v.size}, "running": running}
        meta = {"epochs_done": epochs_done, "train_summary_pos": train_summary_pos, "config": self.cfg.to_dict(),
                "checksums": tree_checksums(tree)}
        host = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))
        self._collect()
        self._pending = self._worker.submit(self._write, epochs_done, host, meta)

    def _write(self, epochs_done: int, tree: Any, meta: dict[str, Any]) -> None:
        self.manager.save(epochs_done, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                              meta=ocp.args.JsonSave(meta)), force=True)

    def _collect(self) -> None:
        """Wait for the pending save call (not its background write); re-raise its error here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def wait(self) -> None:
        self._collect()
        self.manager.wait_until_finished()

    def latest(self, target_state: Any, target_arrays: dict[str, np.ndarray], running: np.ndarray,
               warn: Callable[[str], None]) -> Restored | None:
        """Restore the newest readable checkpoint, falling back (with a warning) past broken ones."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        target = {"state": target_state, "results": {k: v for k, v in target_arrays.items() if v.size},
                  "running": running}
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for i, step in enumerate(steps):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                saved = out["meta"].get("checksums")
                if saved is not None and saved != tree_checksums(out["state"]):
                    raise ChecksumMismatch("contents differ from what was saved")
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back
                nxt = f"falling back to epoch {steps[i + 1]}" if i + 1 < len(steps) else "starting over"
                kept = self._set_aside(step)
                warn(f"warning: the checkpoint after epoch {step} in {self.path} is unreadable "
                     f"({type(err).__name__}); {nxt} (the broken one was moved to {kept})")
                continue
            meta = out["meta"]
            diff = config_diff(meta["config"], self.cfg.to_dict(), ignore=self.ignore_keys)
            if diff:
                raise CheckpointMismatch(f"checkpoint {self.path} was written by a different config "
                                         f"(keys differ: {', '.join(diff)}); use --restart or another "
                                         "experiment_name")
            tree = out["state"]
            arrays = {k: np.asarray(tree["results"][k]) if v.size else v.copy() for k, v in target_arrays.items()}
            return Restored(state=tree["state"], arrays=arrays,
                            running=np.asarray(tree["running"]), epochs_done=int(meta["epochs_done"]),
                            train_summary_pos=int(meta["train_summary_pos"]))
        return None

    def _set_aside(self, step: int) -> Path:
        """Move an unreadable step out of the manager's folder (never deleted), so that the
        resumed run can write that epoch again."""
        dest = self.path.parent / f"{self.path.name}.unreadable" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.path / str(step)), str(dest))
        self.manager.reload()
        return dest

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._worker.shutdown(wait=True)
            self.manager.close()


class CheckpointMismatch(ValueError):
    """A checkpoint from a different config."""


def move_run_aside(exp_dir: Path, index: int) -> Path | None:
    """Move every file of run ``index`` to ``<exp_dir>/previous_runs/index-<N>-<time>/`` (for --restart).

    Nothing is deleted; returns the folder it went to, or None if there was nothing to move."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return None
    dest = exp_dir / "previous_runs" / f"index-{index}-{time.strftime('%Y%m%d-%H%M%S')}"
    moved = False
    for child in sorted(exp_dir.iterdir()):
        if not child.is_dir() or child.name == "previous_runs":
            continue
        for item in list(child.glob(f"index-{index}.*")) + list(child.glob(f"index-{index}")):
            (dest / child.name).mkdir(parents=True, exist_ok=True)
            shutil.move(str(item), str(dest / child.name / item.name))
            moved = True
    return dest if moved else None
