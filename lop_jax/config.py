"""Experiment configuration: the reference's JSON keys plus keys for scale (semantics §1–7).

A config is a frozen dataclass, read from JSON with the reference's key names. Keys that
start with ``_`` are comments. Every other key must be known, of the right type and in
range; otherwise ``ConfigError`` names the key in one line and nothing runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lop_jax.errors import InputError

DATA_SOURCES = ("cifar100", "embedded", "tfds")
UTILITIES = ("weight", "contribution")
CBP_VARIANTS = ("reference", "textbook")
PRECISIONS = ("float32", "bfloat16")
EPOCH_MODES = ("auto", "scan", "loop")
CPU_KERNELS = ("default", "eigen", "eigen_fused")
# Keys that may differ between runs sharing one experiment directory, or between a checkpoint and the
# run resuming it: where the files are and how often they are written, never what is computed.
OPERATIONAL_KEYS = ("data_path", "results_dir", "num_workers", "checkpoint_every_epochs", "checkpoints_to_keep")


class ConfigError(InputError, ValueError):
    """A config problem, reported as one line that names the key."""


@dataclass(frozen=True)
class Config:
    """All settings of one experiment. Defaults are the paper's base deep-learning system."""

    # reference keys
    data_path: str = ""
    results_dir: str = ""
    experiment_name: str = "base_deep_learning_system"
    num_workers: int = 0
    stepsize: float = 0.1
    weight_decay: float = 0.0005
    momentum: float = 0.9
    noise_std: float = 0.0
    use_cbp: bool = False
    replacement_rate: float = 0.0
    utility_function: str = "weight"
    maturity_threshold: int = 0
    reset_head: bool = False
    reset_network: bool = False
    early_stopping: bool = False
    # scale (paper values by default)
    data_source: str = "cifar100"
    num_tasks: int = 20
    classes_per_task: int = 5
    epochs_per_task: int = 200
    train_images_per_class: int = 450
    val_images_per_class: int = 50
    test_images_per_class: int = 100
    network_width: int = 64
    train_batch_size: int = 90
    test_batch_size: int = 100
    val_batch_size: int = 50
    running_avg_window: int = 25
    # lop-jax options (reference behaviour by default)
    augment_test: bool = True
    cbp_decay_rate: float = 0.99
    cbp_variant: str = "reference"
    precision: str = "float32"
    activation: str = "relu"
    epoch_mode: str = "auto"
    cpu_kernels: str = "default"
    checkpoint_every_epochs: int = 1
    checkpoints_to_keep: int = 3
    # plasticity methods to run after those the reference keys select, in order, each
    # {"name": ..., **options} (see lop_jax.methods); stored as (name, ((option, value), ...)) pairs
    methods: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    _comments: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Classes seen by the end of the run."""
        return self.num_tasks * self.classes_per_task

    @property
    def num_epochs(self) -> int:
        return self.num_tasks * self.epochs_per_task

    def active_classes(self, task: int) -> int:
        """Number of active classes during task ``task`` (0-based)."""
        return (task + 1) * self.classes_per_task

    def steps_per_epoch(self, task: int) -> int:
        return self.active_classes(task) * self.train_images_per_class // self.train_batch_size

    def stepsize_at(self, epoch: int) -> float:
        """Step size for a (global, 0-based) epoch: milestones 60/120/160 of 200, scaled.

        The reference sets the step size in a chain of branches on the epoch within the task
        (``== 0`` → base, ``== 60`` → ×0.2, ``== 120`` → ×0.04, ``== 160`` → ×0.008) and keeps it
        until the next match. Scaled milestones may coincide when ``epochs_per_task`` is small:
        the same chain then decides (the first epoch of a task always gets the base step size).
        """
        e = epoch % self.epochs_per_task
        f = self.epochs_per_task / 200.0
        milestones = (math.floor(60 * f), math.floor(120 * f), math.floor(160 * f))
        k = 0
        for ep in range(1, e + 1):
            for j, m in enumerate(milestones):
                if ep == m:
                    k = j + 1
                    break
        return self.stepsize if k == 0 else round(self.stepsize * 0.2 ** k, 5)

    @property
    def train_summaries(self) -> int:
        """Length of the every-``running_avg_window``-steps train summary arrays."""
        return sum(self.steps_per_epoch(t) // self.running_avg_window * self.epochs_per_task
                   for t in range(self.num_tasks))

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as JSON-ready data (comments dropped)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_comments"}
        out["methods"] = self.method_specs()
        return out

    def method_specs(self) -> list[dict[str, Any]]:
        """The ``methods`` key as written: ``[{"name": ..., **options}, ...]``."""
        return [{"name": name, **dict(options)} for name, options in self.methods]


_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "_comments"}
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _check_type(key: str, value: Any) -> Any:
    if key == "methods":
        return _check_methods(value)
    want = _TYPES[_FIELDS[key].type]
    if want is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


# the seam before lop_jax.methods; stored configs of that time hold them empty, which is ignored
LEGACY_EMPTY_KEYS = {"extra_methods": [], "method_options": {}}


def _check_methods(value: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key 'methods': expected a list of {{\"name\": ..., options}} objects, got {value!r}")
    if not value:
        return ()
    from lop_jax.methods import MethodError, build, check_spec

    out, names = [], []
    for spec in value:
        try:
            name, options = check_spec(spec)
            build({"name": name, **options})
        except MethodError as err:
            raise ConfigError(f"config key 'methods': {err}") from None
        if name in names:
            raise ConfigError(f"config key 'methods': plasticity method {name!r} is named twice")
        names.append(name)
        out.append((name, tuple(options.items())))
    return tuple(out)


def drop_legacy_keys(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the old seam's keys when they are empty (a non-empty one is an error)."""
    out = dict(values)
    for key, empty in LEGACY_EMPTY_KEYS.items():
        if key in out:
            if out[key] != empty:
                raise ConfigError(f"config key '{key}' was replaced by 'methods': list each method as "
                                  '{"name": ..., option: value}')
            del out[key]
    return out


def _validate(cfg: Config) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}': {msg} (got {getattr(cfg, key)!r})")

    need(cfg.data_source in DATA_SOURCES, "data_source", f"must be one of {', '.join(DATA_SOURCES)}")
    need(cfg.utility_function in UTILITIES, "utility_function", "must be 'weight' or 'contribution'")
    need(cfg.cbp_variant in CBP_VARIANTS, "cbp_variant", "must be 'reference' or 'textbook'")
    need(cfg.precision in PRECISIONS, "precision", "must be 'float32' or 'bfloat16'")
    need(cfg.activation in ("relu", "crelu"), "activation", "must be 'relu' or 'crelu'")
    if cfg.activation == "crelu":
        need(cfg.network_width % 2 == 0, "network_width", "must be even with activation 'crelu'")
        unit_resets = (["continual_backprop"] if cfg.use_cbp else []) + [m for m, _ in cfg.methods if m == "redo"]
        need(not unit_resets, "activation",
             f"'crelu' cannot run with {', '.join(unit_resets)}: they re-initialise a unit's producing "
             "channel, which CReLU splits in two")
    need(cfg.checkpoint_every_epochs >= 0, "checkpoint_every_epochs", "must be >= 0 (0: task boundaries only)")
    need(cfg.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be >= 1")
    need(cfg.epoch_mode in EPOCH_MODES, "epoch_mode", "must be 'auto', 'scan' or 'loop'")
    need(cfg.cpu_kernels in CPU_KERNELS, "cpu_kernels", "must be 'default', 'eigen' or 'eigen_fused'")
    need(cfg.stepsize > 0, "stepsize", "must be > 0")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    need(cfg.noise_std >= 0, "noise_std", "must be >= 0")
    need(cfg.num_workers >= 0, "num_workers", "must be >= 0")
    if cfg.use_cbp:
        need(cfg.replacement_rate > 0, "replacement_rate", "must be > 0 when use_cbp is true")
        need(cfg.maturity_threshold >= 1, "maturity_threshold", "must be >= 1 when use_cbp is true")
    need(cfg.replacement_rate >= 0, "replacement_rate", "must be >= 0")
    need(0 <= cfg.cbp_decay_rate < 1, "cbp_decay_rate", "must be in [0, 1)")
    for key in ("num_tasks", "classes_per_task", "epochs_per_task", "train_images_per_class",
                "val_images_per_class", "test_images_per_class", "network_width",
                "train_batch_size", "test_batch_size", "val_batch_size", "running_avg_window"):
        need(getattr(cfg, key) >= 1, key, "must be >= 1")
    need(cfg.num_classes <= 100, "num_tasks",
         f"num_tasks × classes_per_task = {cfg.num_classes} is more than the 100 CIFAR-100 classes")
    need(cfg.train_images_per_class + cfg.val_images_per_class <= 500, "train_images_per_class",
         "train_images_per_class + val_images_per_class must be <= 500 (CIFAR-100 has 500 per class)")
    need(cfg.test_images_per_class <= 100, "test_images_per_class", "CIFAR-100 has 100 test images per class")
    need((cfg.classes_per_task * cfg.train_images_per_class) % cfg.train_batch_size == 0, "train_batch_size",
         "must divide classes_per_task × train_images_per_class (the reference uses full batches only)")


def make_config(values: dict[str, Any]) -> Config:
    """Build and validate a Config from a dict of reference/lop-jax keys."""
    comments = {}
    kwargs = {}
    for key, value in drop_legacy_keys(values).items():
        if key.startswith("_"):
            comments[key] = value
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown config key '{key}'")
        kwargs[key] = _check_type(key, value)
    cfg = Config(**kwargs, _comments=comments)
    _validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is a JSON literal (bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


EXTENDS_KEY = "extends"
MAX_EXTENDS_DEPTH = 8


def _read_json_object(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        values = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {p} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a JSON object")
    return values


def read_config_values(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The keys of a JSON config file with its ``extends`` resolved (comments included).

    ``"extends": "a.json"`` or ``["a.json", "b.json"]`` (paths relative to the file) loads those
    files first, in order, each overriding the one before; the file's own keys come last. This is
    how a scale (``configs/scaled/scale.json``) is written once and combined with each system's
    paper config. The reference's files have no ``extends`` and load unchanged.
    """
    p = Path(path)
    if p.resolve() in _chain:
        raise ConfigError(f"config file {p}: 'extends' forms a cycle")
    if len(_chain) >= MAX_EXTENDS_DEPTH:
        raise ConfigError(f"config file {p}: 'extends' nests more than {MAX_EXTENDS_DEPTH} files deep")
    own = _read_json_object(p)
    parents = own.pop(EXTENDS_KEY, [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise ConfigError(f"config file {p}: 'extends' must be a file name or a list of file names")
    values: dict[str, Any] = {}
    for parent in parents:
        values.update(read_config_values(p.parent / parent, _chain + (p.resolve(),)))
    values.update(own)
    return values


def load_config(path: str | Path | Sequence[str | Path] | None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read a JSON config (the reference's files load unchanged; ``extends`` composes files) and apply
    overrides. A list of files composes them in order, like an ``extends`` list (e.g. a system's
    paper config, then a scale). ``experiment_name`` defaults to the (first) file's name."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    values: dict[str, Any] = {}
    for p in paths:
        values.update(read_config_values(p))
    if paths:
        values.setdefault("experiment_name", Path(paths[0]).stem)
    values.update(overrides or {})
    return make_config(values)


def config_diff(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ between two resolved configs.

    A key missing from one of them (a config stored before the key existed) counts as its default,
    which is what a run of that time did: e.g. ``activation`` and ``methods`` came with the methods
    seam, and a run stored before them used ReLU and no extra method.
    """
    a, b = drop_legacy_keys(a), drop_legacy_keys(b)
    defaults = Config().to_dict()
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in ignore and a.get(k, defaults.get(k)) != b.get(k, defaults.get(k))]
