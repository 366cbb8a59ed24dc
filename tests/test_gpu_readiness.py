"""What an accelerator needs from the training code, checked on the CPU (issue 14).

- A new task compiles no program that takes the network (the train step, the evaluation, the
  early-stopping copy, the task-boundary hook) in loop mode, and in scan mode exactly one epoch
  program per task: counted from JAX's compile log over the tasks of a tiny run.
- An epoch of training makes no implicit host-to-device or device-to-host transfer
  (``jax.transfer_guard("disallow")`` around it), in both epoch modes.
- CBP with ``decide_for_all_runs``, mapped over runs, decides its replacement branch once for all
  runs (a ``lax.cond``, not the select that runs the replacement every step), gives the step the
  bits of the select, and every run its own decisions and writes exactly.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT

from lop_jax import experiment
from lop_jax.cbp import accumulator_from_values, cbp_step, init_cbp_state
from lop_jax.config import load_config
from lop_jax.data import load_data
from lop_jax.model import ResNet18, feature_layers, init_model
from lop_jax.run_axis import stack_states
from lop_jax.train import class_order_for, init_state, make_train_epoch, task_data

SMOKE_SCALE = {k: v for k, v in json.loads((REPO_ROOT / "configs" / "scales" / "smoke.json").read_text()).items()
               if not k.startswith("_")}
# what a new task of the loop of steps may compile: its shuffle, masks and evaluation batches, the stacking and
# reduction of its step outputs
SHAPE_PROGRAMS = {"jit(epoch_plan)", "jit(active_masks)", "jit(eval_plan)", "jit(stack)", "jit(_reduce_sum)",
                  "jit(_mean)"}
COMPILING = re.compile(r"Compiling (\S+) with global shapes and types (.*)", re.S)


class Compiles(logging.Handler):
    """JAX's compile log as (program, whether it takes the network), split where ``cut`` is called."""

    def __init__(self, stem_kernel: str) -> None:
        super().__init__(logging.WARNING)
        self.stem_kernel = stem_kernel  # e.g. "float32[1,3,3,3,4]": the stacked stem kernel of one run
        self.segments: list[list[tuple[str, bool]]] = [[]]

    def emit(self, record: logging.LogRecord) -> None:
        match = COMPILING.match(record.getMessage())
        if match:
            self.segments[-1].append((match.group(1), self.stem_kernel in match.group(2)))

    def cut(self) -> None:
        self.segments.append([])


def _capture(stem_kernel: str) -> tuple[Compiles, logging.Logger]:
    handler = Compiles(stem_kernel)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    return handler, logger


def _guarded(make_epoch, trips: list[str]):
    """``make_train_epoch`` whose epochs run under a transfer guard; what trips it is recorded
    and the epoch is run again unguarded, so that the rest of the run is unchanged."""
    def make(cfg):
        epoch = make_epoch(cfg)

        def guarded(*args, **kwargs):
            try:
                with jax.transfer_guard("disallow"):
                    return jax.block_until_ready(epoch(*args, **kwargs))
            except Exception as err:  # the guard raises from the runtime; keep its message
                if "Disallowed" not in str(err):
                    raise
                trips.append(str(err).splitlines()[0])
                return epoch(*args, **kwargs)
        return guarded
    return make


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    """A CBP and head-resetting run of three tasks of one epoch at the smoke scale, loop mode,
    through the run loop itself: the compile log per epoch, what tripped the transfer guard."""
    root = tmp_path_factory.mktemp("loop_run")
    cfg = load_config(REPO_ROOT / "configs" / "continual_backpropagation.json",
                      {**SMOKE_SCALE, "num_tasks": 3, "epochs_per_task": 1, "network_width": 2,
                       "reset_head": True, "replacement_rate": 0.05,
                       "maturity_threshold": 2, "epoch_mode": "loop", "results_dir": str(root),
                       "experiment_name": "gpu_readiness"})
    trips: list[str] = []
    handler, logger = _capture(f"float32[1,3,3,3,{cfg.network_width}]")
    epochs = []

    def log(message: str) -> None:
        if message.lstrip().startswith("epoch "):
            epochs.append(message)
            handler.cut()

    mp = pytest.MonkeyPatch()
    mp.setattr(experiment, "make_train_epoch", _guarded(experiment.make_train_epoch, trips))
    try:
        with jax.log_compiles(True):
            (record,) = experiment.run_experiments(cfg, [0], progress=True, verbose=True, log=log)
    finally:
        mp.undo()
        logger.removeHandler(handler)
    return {"cfg": cfg, "segments": handler.segments, "epochs": epochs, "trips": trips, "record": record}


def test_loop_mode_a_new_task_compiles_no_network_program(loop_run):
    cfg, segments = loop_run["cfg"], loop_run["segments"]
    assert len(loop_run["epochs"]) == cfg.num_epochs == 3
    # segment e: what compiled between the record of epoch e - 1 and that of epoch e (its training and
    # evaluation, and before them the end of the previous task and the checkpoint); the last, after the run
    network = [[name for name, takes in seg if takes] for seg in segments]
    assert "jit(run_step)" in network[0] and "jit(batch_metrics)" in network[0], segments[0]
    assert "jit(_boundary_reset)" in network[1], "the first task boundary compiles the hook once"
    for e in (2, 3):
        assert network[e] == [], f"segment {e} compiled a network program again: {network[e]}"
    everything = [Counter(name for name, _ in seg) for seg in segments]
    # a new task compiles only small programs whose shapes follow its size (fewer where another test of the
    # session compiled the same shapes: these are module-level functions)
    assert set(everything[2]) <= SHAPE_PROGRAMS and sum(everything[2].values()) <= 8, everything[2]
    assert everything[3] == Counter(), everything[3]
    assert int(np.sum(loop_run["record"].arrays["replaced_units_per_epoch"])) > 0, "CBP never replaced"


def test_loop_mode_epoch_makes_no_implicit_transfer(loop_run):
    assert loop_run["trips"] == []
    assert len(loop_run["epochs"]) == 3  # every guarded epoch ran


def test_scan_mode_compiles_one_epoch_per_task_and_makes_no_implicit_transfer():
    cfg = load_config(REPO_ROOT / "configs" / "base_deep_learning_system.json",
                      {**SMOKE_SCALE, "network_width": 2, "epoch_mode": "scan"})
    data = load_data(cfg)
    state = stack_states([init_state(cfg, 0)])
    order = jnp.stack([class_order_for(0, data.num_classes)])
    images = jax.device_put(data.train)
    epoch_fn = make_train_epoch(cfg)
    handler, logger = _capture("float32[1,3,3,3,2]")
    try:
        with jax.log_compiles(True):
            for task, epoch in ((0, 0), (0, 1), (1, 2)):
                n_active = cfg.active_classes(task)
                inputs = (task_data(images, order, n_active), jax.device_put(np.float32(0.05)),
                          jax.device_put(np.int32(epoch)))
                handler.cut()
                with jax.transfer_guard("disallow"):
                    state, losses, _, _ = jax.block_until_ready(epoch_fn(state, *inputs, n_active=n_active))
    finally:
        logger.removeHandler(handler)
    epochs = [[name for name, _ in seg] for seg in handler.segments[1:]]
    assert epochs == [["jit(scan_epoch)"], [], ["jit(scan_epoch)"]]
    assert all(takes for seg in handler.segments[1:] for _, takes in seg)
    assert np.all(np.isfinite(jax.device_get(losses)))


# ---- CBP mapped over runs ------------------------------------------------------------------------

WIDTH = 2
RATE = 0.02  # rate·channels = 0.04, 0.08, 0.16, 0.32 for 2, 4, 8, 16 channels


def _cbp_runs():
    """Three runs' CBP inputs at width 2: run 0 mature with accumulators at 0.9 (its 8- and
    16-channel layers replace), run 1 immature (nothing eligible), run 2 mature with empty
    accumulators (eligible, nothing due)."""
    model = ResNet18(width=WIDTH)
    layers = feature_layers(WIDTH)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.trace(decay=0.9))
    runs = []
    for r, (age, acc) in enumerate(((5, 0.9), (0, 0.9), (5, 0.0))):
        params, bs = init_model(model, jax.random.PRNGKey(r))
        opt = tx.init(params)
        opt = (opt[0], opt[1]._replace(trace=jax.tree_util.tree_map(lambda p: 0.1 * p, params)))
        st = init_cbp_state(WIDTH)
        st = st._replace(age=tuple(jnp.full_like(a, age) for a in st.age),
                         mean_feature_mag=tuple(jnp.full_like(m, 0.01) for m in st.mean_feature_mag),
                         accumulator=accumulator_from_values([acc] * len(layers)))
        keys = jax.random.split(jax.random.PRNGKey(100 + r), len(layers))
        feats = [jnp.abs(jax.random.normal(k, (3, 2, 2, layer.channels)))
                 for k, layer in zip(keys, layers, strict=True)]
        runs.append((params, bs, opt, st, feats, jax.random.PRNGKey(7 + r)))
    return runs


def _stack(runs):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *runs)


def _equal(a, b) -> bool:
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


@pytest.mark.parametrize("variant", ["reference"])
def test_cbp_decided_for_all_runs_is_a_cond_and_gives_each_run_its_own_result(variant):
    options = dict(width=WIDTH, replacement_rate=RATE, utility_function="contribution", maturity_threshold=2,
                   decay_rate=0.99, variant=variant)
    step = partial(cbp_step, **options, decide_for_all_runs=True)
    per_run = partial(cbp_step, **options)  # the default: under vmap, each cond on a per-run predicate is a select
    runs = _cbp_runs()
    alone = [jax.jit(step)(*run) for run in runs]
    replaced = [int(np.sum(out[-1])) for out in alone]
    assert replaced[0] > 0 and replaced[1] == replaced[2] == 0, replaced
    groups = {"one run replaces": [0, 1, 2], "none replaces": [1, 2, 1]}
    mapped = jax.jit(jax.vmap(step))
    as_select = jax.jit(jax.vmap(per_run))
    selected = {name: as_select(*_stack([runs[i] for i in group])) for name, group in groups.items()}
    for name, group in groups.items():
        together = mapped(*_stack([runs[i] for i in group]))
        assert _equal(together, selected[name]), f"{variant}, {name}: not the bits of the select"
        for k, i in enumerate(group):
            mine = jax.tree_util.tree_map(lambda x, k=k: x[k], together)
            own = alone[i]
            params, batch_stats, opt_state, state, units = mine
            assert _equal((params, batch_stats, opt_state, state.age, state.accumulator, units),
                          (own[0], own[1], own[2], own[3].age, own[3].accumulator, own[4])), (variant, name, k)
            # the running averages are batched means, which XLA may sum in another order under vmap
            for x, y in zip((*state.utility, *state.mean_feature_mag), (*own[3].utility, *own[3].mean_feature_mag),
                            strict=True):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=0)
    # mapped over runs, both conds of the step stay conditionals; by default vmap makes them selects
    assert str(jax.make_jaxpr(jax.vmap(step))(*_stack(runs))).count("cond[") >= 2
    assert str(jax.make_jaxpr(jax.vmap(per_run))(*_stack(runs))).count("cond[") == 0
