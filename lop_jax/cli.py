"""What every command in ``experiments/`` shares: its common options, run indices, and the one
layer that turns a ``LopJaxError`` into a line on stderr and an exit code (see ``lop_jax.errors``).

The options accept the reference's spellings too (``--results_dir``, ``--data_path``), as aliases
of the same argparse option, so the reference README's commands work with the script name swapped.
This module imports no JAX at import time (``enable_compilation_cache`` imports it when called): a
command's usage errors come back without loading it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lop_jax.config import Config, ConfigError, load_config, parse_override
from lop_jax.errors import EXIT_INTERRUPTED, EXIT_OK, LopJaxError

Argv = Sequence[str] | None


# ---- options ------------------------------------------------------------------------------------
def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (required) and the repeatable ``--set KEY=VALUE``."""
    parser.add_argument("--config", required=True, help="JSON config (the reference's files load unchanged)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; the value is a JSON literal (true, 0.1, \"name\"); repeatable")


def add_data_dir(parser: argparse.ArgumentParser, help: str = "override the config's data_path") -> None:
    """``--data-dir`` (alias ``--data_path``, the reference's spelling)."""
    parser.add_argument("--data-dir", "--data_path", dest="data_dir", default=None, help=help)


def add_results_dir(parser: argparse.ArgumentParser, help: str = "override the config's results_dir",
                    **kwargs: Any) -> None:
    """``--results-dir`` (alias ``--results_dir``, the reference's spelling); ``kwargs`` go to argparse
    (``required``, ``default``)."""
    kwargs.setdefault("default", None)
    parser.add_argument("--results-dir", "--results_dir", dest="results_dir", help=help, **kwargs)


def add_log_option(parser: argparse.ArgumentParser, what: str = "every epoch") -> None:
    """``--log tensorboard|wandb`` (repeatable or comma-separated): live tracking, off by default."""
    parser.add_argument("--log", action="append", default=[], metavar="TRACKER",
                        help=f"track {what} live in 'tensorboard' or 'wandb' (offline unless WANDB_MODE says "
                             "otherwise), or both: repeat the option or separate with a comma; needs "
                             "pip install 'lop-jax[track]'")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys a command line overrides: each ``--set`` in turn, then ``--data-dir`` as
    ``data_path`` and ``--results-dir`` as ``results_dir`` where the command has them and they are given."""
    overrides = dict(parse_override(s) for s in getattr(args, "set", []))
    for option, key in (("data_dir", "data_path"), ("results_dir", "results_dir")):
        value = getattr(args, option, None)
        if value is not None:
            overrides[key] = value
    return overrides


def config_from_args(args: argparse.Namespace) -> Config:
    """The config named by ``--config`` with the command line's overrides applied."""
    return load_config(args.config, config_overrides(args))


def parse_indices(text: str, option: str = "--experiment-index") -> list[int]:
    """Run indices: ``"3"`` → [3]; ``"0-4"`` → [0, 1, 2, 3, 4]; ``"0,2,5"`` → [0, 2, 5] (ranges may
    appear in lists). Anything else, a negative or a repeated index is a ``ConfigError`` naming ``option``."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ConfigError(f"{option}: expected N, A-B or a comma list of them, got {text!r}") from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise ConfigError(f"{option}: expected distinct indices >= 0, got {text!r}")
    return out


def split_names(text: str) -> list[str]:
    """A comma-separated list of names, blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


# ---- the persistent compilation cache -------------------------------------------------------------
COMPILATION_CACHE_ENV = "LOP_JAX_COMPILATION_CACHE"
COMPILATION_CACHE_OFF = ("", "0", "off", "false", "no")
COMPILATION_CACHE_MAX_BYTES = 2 << 30


def default_compilation_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/lop-jax/xla`` (``~/.cache/lop-jax/xla`` when XDG_CACHE_HOME is unset)."""
    root = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lop-jax" / "xla"


def compilation_cache_dir(configured: str | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where ``experiments.run`` keeps JAX's persistent compilation cache: a folder JAX is already
    configured with (``JAX_COMPILATION_CACHE_DIR``, or set in code) is kept; else
    ``LOP_JAX_COMPILATION_CACHE`` names the folder, or turns the cache off (``off``, ``0``, empty);
    unset, ``default_compilation_cache``. None: no cache."""
    if configured:
        return Path(configured)
    value = environ.get(COMPILATION_CACHE_ENV)
    if value is None:
        return default_compilation_cache(environ)
    if value.strip().lower() in COMPILATION_CACHE_OFF:
        return None
    return Path(value)


def enable_compilation_cache(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Turn on JAX's persistent compilation cache for this process (``compilation_cache_dir`` says
    where), for every program however short its compilation, at most 2 GiB (least recently used
    entries go first). Why: a run compiles the same programs as the previous run of its config
    (tens of seconds on a CPU, most of a short run's time); a cached executable is the same
    program, so results are the same bits. Returns the folder, or None when the cache is off or
    its folder cannot be created (the run then compiles as without it). Imports JAX."""
    import jax

    folder = compilation_cache_dir(jax.config.jax_compilation_cache_dir, environ)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return folder


# ---- the error layer ----------------------------------------------------------------------------
def report(err: LopJaxError) -> int:
    """Print ``<label>: <one line>`` on stderr; returns the error's exit code."""
    print(f"{err.label}: {err.one_line()}", file=sys.stderr)
    return err.exit_code


def entry_point(body: Callable[[Argv], int | None]) -> Callable[[Argv], int]:
    """Wrap a command's ``main(argv)``: a ``LopJaxError`` becomes one line on stderr and its exit code,
    a ``KeyboardInterrupt`` that reaches it exits 130, and a body that returns None exits 0."""

    @functools.wraps(body)
    def main(argv: Argv = None) -> int:
        try:
            code = body(argv)
        except LopJaxError as err:
            return report(err)
        except KeyboardInterrupt:
            print("interrupted: stopped before the command finished", file=sys.stderr)
            return EXIT_INTERRUPTED
        return EXIT_OK if code is None else code

    return main
