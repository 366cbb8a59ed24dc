"""The commands' shared layer (lop_jax.cli, lop_jax.errors): one exit code per kind of error for every
command, one stderr line, the reference's option spellings, and no entry point importing another."""

from __future__ import annotations

import argparse
import ast
import json

import pytest
from conftest import REPO_ROOT

from experiments import analyze, benchmark, plot, run, scaled_sweep
from lop_jax import cli
from lop_jax.config import read_config_values
from lop_jax.errors import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    CommandFailed,
    InputError,
    Interrupted,
    LopJaxError,
)

SMOKE = REPO_ROOT / "configs" / "smoke.json"
COMMANDS = {"run": run, "analyze": analyze, "plot": plot, "scaled_sweep": scaled_sweep, "benchmark": benchmark}


def _one_error_line(capsys, label: str = "error") -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{label}: "), err
    return err


# ---- the error classes ------------------------------------------------------------------------
def test_every_user_facing_error_has_its_code_and_keeps_its_old_base():
    from lop_jax.analysis import AnalysisError
    from lop_jax.checkpoint import CheckpointMismatch
    from lop_jax.config import ConfigError
    from lop_jax.data import DataError
    from lop_jax.experiment import RunError, RunInterrupted
    from lop_jax.plots import PlotError

    expected = {ConfigError: (2, ValueError), DataError: (2, RuntimeError), AnalysisError: (2, RuntimeError),
                PlotError: (2, ValueError), CheckpointMismatch: (2, ValueError), RunError: (1, RuntimeError),
                RunInterrupted: (130, RuntimeError)}
    for cls, (code, old_base) in expected.items():
        assert issubclass(cls, LopJaxError) and issubclass(cls, old_base), cls
        assert cls("x").exit_code == code, cls
    assert (InputError.exit_code, CommandFailed.exit_code, Interrupted.exit_code) == (2, 1, 130)


def test_entry_point_turns_errors_into_one_line_and_their_code(capsys):
    def command(raised):
        @cli.entry_point
        def main(argv=None):
            if isinstance(raised, int) or raised is None:
                return raised
            raise raised
        return main

    assert command(InputError("bad\n  config key 'x'"))([]) == EXIT_INPUT
    assert _one_error_line(capsys) == "error: bad config key 'x'"
    assert command(CommandFailed("the run failed"))([]) == EXIT_FAILED
    assert _one_error_line(capsys) == "error: the run failed"
    assert command(Interrupted("stopped after epoch 3; run the same command to resume"))([]) == EXIT_INTERRUPTED
    assert "run the same command" in _one_error_line(capsys, "interrupted")
    assert command(KeyboardInterrupt())([]) == EXIT_INTERRUPTED
    _one_error_line(capsys, "interrupted")
    assert command(None)([]) == 0 and command(1)([]) == 1
    assert not capsys.readouterr().err


# ---- shared options ---------------------------------------------------------------------------
def test_parse_indices_forms_and_errors_name_the_option():
    assert cli.parse_indices("3") == [3]
    assert cli.parse_indices("0-4") == [0, 1, 2, 3, 4]
    assert cli.parse_indices("0,2,5") == [0, 2, 5]
    assert cli.parse_indices(" 0-1, 5 ") == [0, 1, 5]
    for bad in ("x", "", "1,1", "0-2,2", "-1", "3-1"):
        with pytest.raises(InputError, match="--seeds"):
            cli.parse_indices(bad, "--seeds")


def test_config_overrides_apply_set_then_the_folders():
    p = argparse.ArgumentParser()
    cli.add_config_options(p)
    cli.add_data_dir(p)
    cli.add_results_dir(p)
    args = p.parse_args(["--config", str(SMOKE), "--set", "network_width=2", "--set", "data_path=a",
                         "--data_path", "b", "--results-dir", "r"])
    assert cli.config_overrides(args) == {"network_width": 2, "data_path": "b", "results_dir": "r"}
    cfg = cli.config_from_args(args)
    assert (cfg.network_width, cfg.data_path, cfg.results_dir) == (2, "b", "r")
    with pytest.raises(InputError, match="key=value"):
        cli.config_overrides(p.parse_args(["--config", str(SMOKE), "--set", "no_equals_sign"]))


# ---- the reference's spellings ----------------------------------------------------------------
def test_reference_spellings_parse_like_the_lop_jax_ones():
    # the reference README's commands, script name swapped
    ref = run.build_parser().parse_args(["--config", "./cfg/base_deep_learning_system.json", "--verbose",
                                         "--experiment-index", "0"])
    assert (ref.config, ref.verbose, ref.experiment_index) == ("./cfg/base_deep_learning_system.json", True, "0")
    assert analyze.parse_args(["--results_dir", "./results/base_deep_learning_system/"]).results_dir \
        == "./results/base_deep_learning_system/"
    base_cbp = "base_deep_learning_system,continual_backpropagation"
    for metric, algorithms in (("relative_accuracy_per_epoch", base_cbp + ",retrained_network"),
                               ("next_task_dormant_units_analysis", base_cbp),
                               ("next_task_stable_rank_analysis", base_cbp),
                               ("test_accuracy_per_epoch", base_cbp + ",retrained_network")):
        ref = plot.parse_args(["--results_dir", "./results/", "--algorithms", algorithms, "--metric", metric])
        ours = plot.parse_args(["--results-dir", "./results/", "--algorithms", algorithms, "--metric", metric])
        assert ref == ours
    # every option the reference's analysis script has, against ours
    assert analyze.parse_args(["--results_dir", "r", "--data_path", "d", "--dormant_unit_threshold", "0.02"]) \
        == analyze.parse_args(["--results-dir", "r", "--data-dir", "d", "--dormant-unit-threshold", "0.02"])
    # the reference plot script's metric choices are all accepted
    for metric in ("next_task_dormant_units_analysis", "next_task_effective_rank_analysis",
                   "next_task_stable_rank_analysis", "previous_tasks_dormant_units_analysis",
                   "previous_tasks_effective_rank_analysis", "previous_tasks_stable_rank_analysis",
                   "test_accuracy_per_epoch", "test_loss_per_epoch", "weight_magnitude_analysis"):
        assert metric in plot.METRIC_CHOICES
    # the folder options have both spellings in every command that has them
    assert run.build_parser().parse_args(["--config", "c", "--results_dir", "r", "--data_path", "d"]) \
        == run.build_parser().parse_args(["--config", "c", "--results-dir", "r", "--data-dir", "d"])
    assert scaled_sweep.parse_args(["--results_dir", "r", "--data_path", "d"]) \
        == scaled_sweep.parse_args(["--results-dir", "r", "--data-dir", "d"])


# ---- entry points -----------------------------------------------------------------------------
def test_no_entry_point_imports_another():
    for path in sorted((REPO_ROOT / "experiments").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "experiments" or n.startswith("experiments.") for n in names), \
                f"{path.name} imports {names}"
        assert "cli.entry_point" in path.read_text() or path.name == "__init__.py", f"{path.name}: no entry_point"


@pytest.mark.parametrize("command, argv", [
    ("run", ["--config", "{tmp}/nope.json"]),
    ("run", ["--config", str(SMOKE), "--experiment-index", "x", "--dry-run"]),
    ("run", ["--config", str(SMOKE), "--set", "network_width=wide", "--dry-run"]),
    ("analyze", ["--results-dir", "{tmp}/nowhere"]),
    ("analyze", ["--results_dir", "{tmp}", "--dormant_unit_threshold", "2"]),
    ("plot", ["--results-dir", "{tmp}/nowhere", "--algorithms", "base_deep_learning_system", "--table"]),
    ("plot", ["--results_dir", "{tmp}", "--algorithms", " , ", "--table"]),
    ("scaled_sweep", ["--seeds", "0-x", "--config-dir", "{tmp}", "--export-dir", "{tmp}/e"]),
    ("scaled_sweep", ["--check", "--export-dir", "{tmp}"]),
    ("benchmark", ["--config", "{tmp}/nope.json", "--synthetic"]),
    ("benchmark", ["--config", str(SMOKE), "--experiment-index", "1,1", "--synthetic"]),
])
def test_bad_input_exits_2_with_one_line(command, argv, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert COMMANDS[command].main(argv) == EXIT_INPUT
    _one_error_line(capsys)


def test_analysis_with_nothing_finished_exits_1(tmp_path, capsys):
    from lop_jax.config import load_config

    exp_dir = tmp_path / "smoke"
    (exp_dir / "run_status").mkdir(parents=True)
    (exp_dir / "config.json").write_text(json.dumps(load_config(SMOKE).to_dict()))
    assert analyze.main(["--results-dir", str(exp_dir), "--no-progress"]) == EXIT_FAILED
    assert "no finished run" in _one_error_line(capsys)


def test_a_failed_run_exits_1_and_an_interrupted_one_130(monkeypatch, tmp_path, capsys):
    import lop_jax.experiment as experiment_module

    def failing(*args, **kwargs):
        raise experiment_module.RunError("non-finite training loss at epoch 1, step 3;\nthe results are kept")

    monkeypatch.setattr(experiment_module, "run_experiments", failing)
    assert run.main(["--config", str(SMOKE), "--results-dir", str(tmp_path)]) == EXIT_FAILED
    assert _one_error_line(capsys) == "error: non-finite training loss at epoch 1, step 3; the results are kept"

    def stopped(*args, **kwargs):
        raise experiment_module.RunInterrupted("index 0 stopped after epoch 1; run the same command to resume")

    monkeypatch.setattr(experiment_module, "run_experiments", stopped)
    assert run.main(["--config", str(SMOKE), "--results-dir", str(tmp_path)]) == EXIT_INTERRUPTED
    assert "after epoch 1" in _one_error_line(capsys, "interrupted")


def test_an_unwritable_results_folder_exits_1_and_a_checkpoint_of_another_config_2(monkeypatch, tmp_path, capsys):
    import lop_jax.experiment as experiment_module
    from lop_jax.checkpoint import CheckpointMismatch

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "smoke" / "x.npy"))

    monkeypatch.setattr(experiment_module, "run_experiments", unwritable)
    assert run.main(["--config", str(SMOKE), "--results-dir", str(tmp_path)]) == EXIT_FAILED
    line = _one_error_line(capsys)
    assert "cannot write the results" in line and "Permission denied" in line and "x.npy" in line

    def mismatch(*args, **kwargs):
        raise CheckpointMismatch("checkpoint c was written by a different config (keys differ: stepsize); "
                                 "use --restart or another experiment_name")

    monkeypatch.setattr(experiment_module, "run_experiments", mismatch)
    assert run.main(["--config", str(SMOKE), "--results-dir", str(tmp_path)]) == EXIT_INPUT
    assert "use --restart" in _one_error_line(capsys)


def test_an_interrupted_sweep_exits_130_with_the_resume_hint(monkeypatch, tmp_path, capsys):
    import lop_jax.experiment as experiment_module
    import lop_jax.sweep as sweep_module

    # the smoke config resolved (its extends are relative to configs/), as a one-system config folder
    (tmp_path / "base_deep_learning_system.json").write_text(json.dumps(read_config_values(SMOKE)))

    def stopped(*args, **kwargs):
        raise experiment_module.RunInterrupted("index 0 stopped after epoch 1; run the same command to resume")

    monkeypatch.setattr(sweep_module, "run_sweep", stopped)
    rc = scaled_sweep.main(["--config-dir", str(tmp_path), "--systems", "base_deep_learning_system", "--seeds", "0",
                            "--export-dir", str(tmp_path / "e"), "--results-dir", str(tmp_path / "r")])
    assert rc == EXIT_INTERRUPTED
    assert _one_error_line(capsys, "interrupted").endswith("rerun the same command to resume the sweep")
