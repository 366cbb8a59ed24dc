"""Deterministic Orbax checkpoints keyed by run index, for exact resume.

A checkpoint holds everything a run needs to continue bit-identically: the whole TrainState
(params, BatchNorm statistics, optimiser state, algorithm state, the early-stopping copy, the
root key), the partial results arrays, and the host-side counters (epochs done, the running
train-summary sums and position). It lives in the run's checkpoint folder of its experiment
directory (``lop_jax.results``: ``checkpoints/index-<N>/<epoch>/``);
Orbax writes each step to a temporary folder and renames it when complete, so a kill leaves
the previous complete checkpoint intact.

The state is stored packed: the bytes of all its leaves, in tree order, concatenated on the device
in one jitted call into a single uint8 buffer, and the host-side results arrays likewise into a
second one. Orbax's cost per saved array, not the bytes, is what made every-epoch checkpoints slow
(a state has hundreds of arrays; the measurement is in docs/performance_notes.md). The stored
layout (dtype and shape per leaf) is checked against a template state built from the same config
before the bytes are split back.

Each checkpoint also records a checksum per buffer (the state's computed on the device, so only
one integer leaves it before the copy). A restore recomputes them, so a checkpoint that Orbax
reads back without complaint but whose contents changed (a swapped or silently damaged file) is
treated like an unreadable one: set aside, previous one used.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lop_jax.config import Config, ConfigError, config_diff
from lop_jax.errors import InputError
from lop_jax.results import ExperimentDir

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _device_checksum(x: jax.Array) -> jax.Array:
    """A position-weighted uint32 sum of the array's bits; any single changed element changes it."""
    x = x.ravel()
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)  # odd: invertible mod 2^32
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksum_jit = jax.jit(_device_checksum)


def _host_checksum(x: np.ndarray) -> int:
    """The same sum as ``_device_checksum`` for a numpy array (8-byte elements count as two words)."""
    x = np.ascontiguousarray(x).ravel()
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    bits = x.view(np.uint32) if x.dtype.itemsize == 8 else x.view(f"u{x.dtype.itemsize}").astype(np.uint32)
    weights = np.arange(bits.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return int(np.sum(bits * weights, dtype=np.uint32))


def checksum(x: jax.Array | np.ndarray) -> int:
    """A checksum of the array's bits, computed where it lives; host and device copies agree."""
    return int(jax.device_get(_checksum_jit(x))) if isinstance(x, jax.Array) else _host_checksum(x)


_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lop-jax-checkpoint")

FORMAT = 2  # 1: one Orbax array per leaf; 2: one byte buffer for the state, one for the host arrays


def _as_bytes(x: jax.Array) -> jax.Array:
    """The array's bytes as a flat uint8 vector (bool as one byte per element)."""
    x = x.ravel()
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1)


@partial(jax.jit, static_argnums=1)
def _pack_device(leaves: list[jax.Array], run: int | None) -> tuple[jax.Array, jax.Array]:
    """Run ``run`` of (or, with None, all of) the leaves as one byte buffer, and its checksum."""
    parts = [_as_bytes(x if run is None else x[run]) for x in leaves]
    buf = jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.uint8)
    return buf, _device_checksum(buf)


def _pack_host(leaves: list[np.ndarray]) -> np.ndarray:
    """Host arrays as one byte buffer (a fresh copy)."""
    parts = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in leaves]
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


def _unpack(buf: np.ndarray, templates: list[Any]) -> list[np.ndarray]:
    """Split a byte buffer back into arrays shaped and typed like ``templates``."""
    out, pos = [], 0
    for t in templates:
        dtype, shape = np.dtype(t.dtype), tuple(t.shape)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out.append(np.frombuffer(buf[pos:pos + n].tobytes(), dtype=dtype).reshape(shape).copy())
        pos += n
    if pos != buf.size:
        raise ValueError(f"buffer holds {buf.size} bytes, the layout needs {pos}")
    return out


def _layout(leaves: list[Any], run: int | None = None) -> list[list[Any]]:
    """[dtype, shape] per leaf, stored with a checkpoint so that a restore can check it."""
    return [[np.dtype(x.dtype).name, list(x.shape[1:] if run is not None else x.shape)] for x in leaves]


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


class Checkpointer:
    """Saves (asynchronously) and restores the checkpoints of one run index."""

    def __init__(self, exp_dir: Path | ExperimentDir, index: int, cfg: Config, ignore_keys: tuple[str, ...] = ()):
        self.cfg = cfg
        self.ignore_keys = ignore_keys
        self.path = ExperimentDir(exp_dir).checkpoint_path(index)
        # Orbax's own asynchronous machinery is not used: its signals are process-global, and two
        # managers (several run indices in one process) saving at once time out waiting for each
        # other. Instead every write, whole and synchronous, runs on one process-wide worker thread
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoints_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.path, options=options)
        self._pending: Future | None = None

    def save(self, epochs_done: int, state: Any, arrays: dict[str, np.ndarray], running: np.ndarray,
             train_summary_pos: int, run: int | None = None) -> None:
        """Start saving the run after ``epochs_done`` epochs (returns before the write ends).

        ``state`` may hold several runs stacked on a leading axis; ``run`` then picks this one.
        The state is packed into one fresh byte buffer where it lives (so a donated buffer reused
        by the next epoch does not matter) and its checksum taken there; the write itself happens
        on a worker thread."""
        leaves = jax.tree_util.tree_leaves(state)
        device_buf, device_sum = _pack_device(leaves, run)
        host_leaves = [np.asarray(arrays[k]) for k in sorted(arrays)] + [np.asarray(running)]
        host_buf = _pack_host(host_leaves)
        meta = {"format": FORMAT, "epochs_done": epochs_done, "train_summary_pos": train_summary_pos,
                "config": self.cfg.to_dict(), "state_layout": _layout(leaves, run),
                "host_layout": _layout(host_leaves), "result_names": sorted(arrays)}
        device_buf, device_sum = jax.device_get((device_buf, device_sum))
        meta["checksums"] = [int(device_sum), checksum(host_buf)]
        tree = {"state": np.asarray(device_buf), "host": host_buf}
        self._collect()
        self._pending = _WRITER.submit(self._write, epochs_done, tree, meta)

    def _write(self, epochs_done: int, tree: Any, meta: dict[str, Any]) -> None:
        # Orbax cannot store a zero-size array; an empty buffer is left out and rebuilt on restore
        tree = {k: v for k, v in tree.items() if v.size}
        self.manager.save(epochs_done, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                              meta=ocp.args.JsonSave(meta)), force=True)

    def _collect(self) -> None:
        """Wait for this run's pending write; re-raise its error here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def wait(self) -> None:
        self._collect()

    def latest(self, target_state: Any, target_arrays: dict[str, np.ndarray], running: np.ndarray,
               warn: Callable[[str], None]) -> Restored | None:
        """Restore the newest readable checkpoint, falling back (with a warning) past broken ones.

        ``target_state`` (a freshly initialised state of the same config) gives the tree structure,
        shapes and dtypes the stored bytes are split into."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                return self.restore(step, target_state, target_arrays, running)
            except CheckpointMismatch:
                raise
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back
                nxt = f"falling back to epoch {steps[i + 1]}" if i + 1 < len(steps) else "starting over"
                kept = self._set_aside(step)
                warn(f"warning: the checkpoint after epoch {step} in {self.path} is unreadable "
                     f"({type(err).__name__}); {nxt} (the broken one was moved to {kept})")
        return None

    def restore(self, step: int, target_state: Any, target_arrays: dict[str, np.ndarray] | None = None,
                running: np.ndarray | None = None) -> Restored:
        """Restore the checkpoint written after epoch ``step``; raises if it is unreadable, changed
        since it was written (ChecksumMismatch) or of another config or layout (CheckpointMismatch).

        Without ``target_arrays`` and ``running`` the results arrays are rebuilt from the layout
        stored with the checkpoint."""
        leaves, treedef = jax.tree_util.tree_flatten(target_state)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if target_arrays is None or running is None:
            layout = meta.get("host_layout", [])
            target_arrays = {k: np.zeros(shape, dtype) for k, (dtype, shape) in zip(meta.get("result_names", []),
                                                                                   layout, strict=False)}
            running = np.zeros(layout[-1][1], layout[-1][0]) if layout else np.zeros(2, np.float32)
        names = sorted(target_arrays)
        host_templates = [target_arrays[k] for k in names] + [running]
        self._check_compatible(meta, leaves, host_templates, names)
        sizes = {"state": sum(x.size * np.dtype(x.dtype).itemsize for x in leaves),
                 "host": sum(x.size * x.dtype.itemsize for x in host_templates)}
        abstract = {k: jax.ShapeDtypeStruct((n,), jnp.uint8) for k, n in sizes.items() if n}
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        bufs = {k: np.asarray(got[k]) if k in got else np.zeros((0,), np.uint8) for k in sizes}
        if [checksum(jnp.asarray(bufs["state"])), checksum(bufs["host"])] != meta["checksums"]:
            raise ChecksumMismatch("contents differ from what was saved")
        state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in _unpack(bufs["state"], leaves)])
        host = _unpack(bufs["host"], host_templates)
        return Restored(state=state, arrays=dict(zip(names, host[:-1], strict=True)), running=host[-1],
                        epochs_done=int(meta["epochs_done"]), train_summary_pos=int(meta["train_summary_pos"]))

    def _check_compatible(self, meta: dict[str, Any], leaves: list[Any], host_templates: list[np.ndarray],
                          names: list[str]) -> None:
        """A checkpoint of another config or format is refused (one line), never set aside."""
        diff = config_diff(meta["config"], self.cfg.to_dict(), ignore=self.ignore_keys)
        if diff:
            raise CheckpointMismatch(f"checkpoint {self.path} was written by a different config "
                                     f"(keys differ: {', '.join(diff)}); use --restart or another "
                                     "experiment_name")
        if meta.get("format") != FORMAT:
            raise CheckpointMismatch(f"checkpoint {self.path} has format {meta.get('format', 1)} of an earlier "
                                     f"lop-jax (this one reads format {FORMAT}); use --restart (the old run "
                                     "is moved aside, not deleted)")
        if (meta["state_layout"] != _layout(leaves) or meta["host_layout"] != _layout(host_templates)
                or meta["result_names"] != names):
            raise CheckpointMismatch(f"checkpoint {self.path} holds arrays of other shapes than this "
                                     "config's state (an older lop-jax?); use --restart")

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
            self.manager.close()


class CheckpointMismatch(InputError, ValueError):
    """A checkpoint from a different config."""


def resume(checkpointers: Sequence[Checkpointer], states: list[Any], records: Sequence[Any],
           say: Callable[[str], None]) -> tuple[list[Any], int]:
    """Continue runs trained together from their newest readable checkpoints.

    ``states`` are the runs' freshly initialised states (the templates of the restore); each run's
    record (``lop_jax.records.RunResults``) gets its arrays and counters back. Returns the states
    and the epochs done, which must be the same for every run (0 when none has a checkpoint)."""
    states, starts = list(states), []
    for k, (ckpt, record) in enumerate(zip(checkpointers, records, strict=True)):
        restored = ckpt.latest(states[k], record.arrays, record.running, say)
        if restored is None:
            starts.append(0)
            continue
        states[k] = restored.state
        record.restore(restored.arrays, restored.running, restored.train_summary_pos)
        starts.append(restored.epochs_done)
        say(f"index {record.index}: resuming after epoch {restored.epochs_done} from {ckpt.path}")
    if len(set(starts)) > 1:
        indices = [r.index for r in records]
        raise ConfigError(f"indices {indices} stopped at different epochs {starts}; run them separately "
                          "(or --restart) to run them together")
    return states, starts[0]
