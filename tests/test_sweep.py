"""The scaled protocol's configs and the sweep driver (run → analyse → export → draw, resumable)."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from lop_jax import doc_markers
from lop_jax.analysis import ANALYSIS_METRICS
from lop_jax.config import ConfigError, load_config, read_config_values
from lop_jax.data import load_data
from lop_jax.scaling import STEP_SCALED_KEYS, scaled_step_values, step_ratio, steps_in_task, width_ratio
from lop_jax.sweep import SYSTEMS, TIMING_FILE, draw_sweep, load_system_configs, per_task_summary, run_sweep

SCALED = REPO_ROOT / "configs" / "scaled"
PAPER = REPO_ROOT / "configs"
SCALE_KEYS = {"num_tasks", "classes_per_task", "epochs_per_task", "train_images_per_class", "val_images_per_class",
              "test_images_per_class", "network_width", "train_batch_size", "test_batch_size", "val_batch_size",
              "running_avg_window", "checkpoint_every_epochs", "results_dir", "num_workers"}
CBP_STEP_KEYS = {"replacement_rate", "maturity_threshold"}
SEARCH_FOLDERS = sorted((REPO_ROOT / "configs" / "scaled_search").iterdir())


def _differing_keys(scaled, paper):
    return {k for k, v in scaled.to_dict().items() if paper.to_dict()[k] != v}


def _unexplained(cfg, keys):
    return [k for k in keys - {"results_dir", "num_workers"} if len(cfg._comments.get(f"_why_{k}_", "")) < 20]


@pytest.mark.parametrize("system", SYSTEMS)
def test_the_laptop_protocol_is_the_paper_config_with_the_scale_and_the_scaling_rule(system):
    """configs/scaled: the paper's config of each system, the scale's sizes, and every step-counted
    key equal to what the scaling rule derives from the paper's value and the step ratio."""
    scaled, paper = load_config(SCALED / f"{system}.json"), load_config(PAPER / f"{system}.json")
    assert scaled.experiment_name == system
    ratio = step_ratio(scaled, paper)
    assert width_ratio(scaled, paper) == 8
    expected = scaled_step_values(paper, ratio, width_ratio(scaled, paper))
    for key, value in expected.items():
        if key == "maturity_threshold":
            assert getattr(scaled, key) == value, key
        else:
            assert getattr(scaled, key) == pytest.approx(value, rel=0.01, abs=1e-12), key
    differ = _differing_keys(scaled, paper)
    assert differ <= SCALE_KEYS | set(STEP_SCALED_KEYS), differ - SCALE_KEYS - set(STEP_SCALED_KEYS)
    assert not _unexplained(scaled, differ), _unexplained(scaled, differ)
    assert scaled.weight_decay > paper.weight_decay  # the rule changes it: it is not left at the paper's value


def test_the_scaling_rules_arithmetic_for_each_key():
    """Hand-computed: a protocol with a quarter of the paper's steps in every task."""
    paper = load_config(PAPER / "continual_backpropagation.json", {"noise_std": 1e-5})
    scaled = load_config(PAPER / "continual_backpropagation.json",
                         {"epochs_per_task": 50, "num_tasks": 4})  # 50 of 200 epochs: 1/4 of the steps
    assert step_ratio(scaled, paper) == 0.25
    values = scaled_step_values(paper, 0.25)
    assert values["weight_decay"] == pytest.approx(0.0005 * 4)  # the same total shrink per task
    assert values["noise_std"] == pytest.approx(1e-5 * 2)  # the same noise variance per task: σ² × steps
    assert values["replacement_rate"] == pytest.approx(1e-5 * 4)  # the same replacements per unit per task
    assert values["maturity_threshold"] == 250  # the same protected share of a task
    narrow = scaled_step_values(paper, 0.25, widths=2.0)  # half the width: twice the rate per unit
    assert narrow["replacement_rate"] == pytest.approx(1e-5 * 4 * 2)  # the same units replaced per layer per task
    assert {k: v for k, v in narrow.items() if k != "replacement_rate"} == \
        {k: v for k, v in values.items() if k != "replacement_rate"}
    with pytest.raises(ValueError, match="width ratio"):
        scaled_step_values(paper, 0.25, widths=0)
    for task in range(4):  # task t has (t + 1) times the first task's steps in both protocols
        assert steps_in_task(scaled, task) == 0.25 * steps_in_task(paper, task)


SEARCH_CONFIGS = sorted(p for p in (REPO_ROOT / "configs" / "scaled_search").glob("*/*.json") if p.name != "scale.json")
# CBP at the step ratio alone: the candidates tried before the scaling rule, and p5 (the rule before its width factor)
RULE_SCALED_CBP = {"p1_batch90", "p2_unscaled_decay", "p3_90_images", "p4_120_epochs", "p5_cbp_step_ratio_only"}


@pytest.mark.parametrize("path", SEARCH_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_search_candidates_keep_the_papers_algorithm_and_explain_every_scaled_value(path):
    """configs/scaled_search/*: the scalings tried for the laptop protocol, kept as recorded candidates."""
    system = path.stem
    scaled, paper = load_config(path), load_config(PAPER / f"{system}.json")
    differ = _differing_keys(scaled, paper)
    allowed = SCALE_KEYS | set(STEP_SCALED_KEYS)
    assert differ <= allowed, differ - allowed
    assert scaled.experiment_name == system
    assert not _unexplained(scaled, differ), _unexplained(scaled, differ)
    if system != "continual_backpropagation":
        return
    ratio = step_ratio(scaled, paper)
    assert scaled.maturity_threshold == round(paper.maturity_threshold * ratio)
    # the step ratio alone (p5 and before), 4 and 8 x it (p6, p7: 8 is the width ratio that configs/scaled adopted)
    factor = 1 if path.parent.name in RULE_SCALED_CBP else {"p6_cbp_rate_x4": 4, "p7_cbp_rate_x8": 8}[path.parent.name]
    assert scaled.replacement_rate * ratio == pytest.approx(factor * paper.replacement_rate, rel=0.01)


def test_every_search_folder_holds_configs():
    assert {p.parent.name for p in SEARCH_CONFIGS} == {p.name for p in SEARCH_FOLDERS}
    assert len(SEARCH_FOLDERS) >= 5


def test_scaled_protocol_fits_the_real_data_and_names_the_systems():
    cfgs = load_system_configs(SCALED, SYSTEMS, {})
    assert {c.experiment_name for c in cfgs} == set(SYSTEMS)
    c = cfgs[0]
    assert c.data_source == "cifar100" and c.num_classes <= 100  # the real CIFAR-100, not the embedded subset
    assert c.val_images_per_class + c.train_images_per_class <= 500 and c.test_images_per_class <= 100
    assert all(c.steps_per_epoch(t) >= 1 and c.steps_per_epoch(t) >= c.running_avg_window for t in range(c.num_tasks))


def _tiny_configs(tmp_path):
    """The smoke config as two systems of a config folder (base and retrained)."""
    smoke = read_config_values(REPO_ROOT / "configs" / "smoke.json")
    folder = tmp_path / "configs"
    folder.mkdir()
    for name, extra in (("base_deep_learning_system", {}), ("retrained_network", {"reset_network": True})):
        (folder / f"{name}.json").write_text(json.dumps({**smoke, **extra, "experiment_name": name}))
    return folder, ["base_deep_learning_system", "retrained_network"]


def test_sweep_runs_analyses_exports_draws_and_then_skips_what_is_exported(tmp_path, monkeypatch):
    folder, systems = _tiny_configs(tmp_path)
    configs = load_system_configs(folder, systems, {})
    data = load_data(configs[0])
    results, export = tmp_path / "results", tmp_path / "export"
    timing = run_sweep(configs, [0], results, export, data=data, progress=False, log=lambda m: None)
    assert sorted(timing) == [f"{s}/index-0" for s in sorted(systems)]
    assert all(e["finished"] and e["seconds"] > 0 for e in timing.values())
    assert json.loads((export / TIMING_FILE).read_text()) == timing
    for s in systems:
        dest = export / "results" / s
        assert json.loads((dest / "run_status" / "index-0.json").read_text())["finished"]
        for m in ANALYSIS_METRICS + ("test_accuracy_per_epoch", "class_order"):
            np.testing.assert_array_equal(np.load(dest / m / "index-0.npy"), np.load(results / s / m / "index-0.npy"))
        assert not (dest / "checkpoints").exists() and not (dest / "model_parameters").exists()
    assert (results / systems[0] / "model_parameters").is_dir()  # the run had weights to leave out
    # the export holds small arrays and JSON only: no weights, no checkpoints, nothing git ignores
    exported = [f for f in (export / "results").rglob("*") if f.is_file()]
    assert exported and all(f.suffix in (".npy", ".json") for f in exported)
    assert not any(part in {"checkpoints", "model_parameters", "previous_runs"} for f in exported for part in f.parts)
    # the exported config is the run's, less the machine's locations (the run's own names them)
    stored = json.loads((results / systems[0] / "config.json").read_text())
    assert stored["results_dir"] == str(results)
    shown = json.loads((export / "results" / systems[0] / "config.json").read_text())
    assert shown == {**stored, "data_path": "", "results_dir": ""}

    written = draw_sweep(export / "results", systems, export / "figures", log=lambda m: None)
    names = {p.name for p in written}
    assert {"summary.png", "relative_accuracy_per_epoch.png", "summary_table.txt", "summary_table.csv"} <= names
    assert not list((export / "figures").glob("*.svg"))
    means = per_task_summary(export / "results", systems)
    assert len(means["base_deep_learning_system"]["next_task_dormant_units_analysis"]) == configs[0].num_tasks

    # a second sweep, even without the runs' folder (another machine), runs nothing
    import lop_jax.experiment as experiment_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("an exported run was run again")

    monkeypatch.setattr(experiment_module, "run_experiments", must_not_run)
    import shutil

    shutil.rmtree(results)
    assert run_sweep(configs, [0], results, export, data=data, progress=False, log=lambda m: None) == timing

    # exported runs of another config are neither skipped nor mixed with new ones
    import dataclasses

    changed = [dataclasses.replace(c, epochs_per_task=3) for c in configs]
    with pytest.raises(ConfigError, match="exported runs .* another config .*epochs_per_task"):
        run_sweep(changed, [0], results, export, data=data, progress=False, log=lambda m: None)


def test_no_committed_export_names_a_location_of_the_machine_that_made_it():
    configs = sorted(REPO_ROOT.glob("docs/**/results/*/config.json"))
    assert configs, "no exported config under docs/"
    for path in configs:
        cfg = json.loads(path.read_text())
        assert (cfg.get("data_path", ""), cfg.get("results_dir", "")) == ("", ""), path


def test_exported_arrays_under_docs_are_committable_and_runs_and_weights_are_ignored():
    """.gitignore ignores the top-level run folder, not every folder named results (issue 13, item 4)."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git work tree")

    def ignored(path: str) -> bool:
        rc = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO_ROOT).returncode
        assert rc in (0, 1), f"git check-ignore failed on {path}"
        return rc == 0

    assert not ignored("docs/scaled_protocol/results/base_deep_learning_system/test_accuracy_per_epoch/index-0.npy")
    assert not ignored("docs/scaled_protocol/search/p1/results/retrained_network/run_status/index-0.json")
    assert ignored("results/scaled/base_deep_learning_system/test_accuracy_per_epoch/index-0.npy")
    assert ignored("docs/scaled_protocol/results/base_deep_learning_system/model_parameters/index-0/epoch-0/x")
    assert ignored("docs/scaled_protocol/results/base_deep_learning_system/checkpoints/index-0/x")


def test_the_sweeps_analysis_draws_from_the_full_split_loaded_once_per_source(tmp_path, monkeypatch):
    """The runs train on their own split; the analysis gets the source's full split (the embedded
    subset: 60 training images per class, not the smoke config's 10 + 20), read once for both systems."""
    import lop_jax.data as data_module
    import lop_jax.experiment as experiment_module
    import lop_jax.sweep as sweep_module
    from lop_jax.results import save_status

    folder, systems = _tiny_configs(tmp_path)
    configs = load_system_configs(folder, systems, {})
    loads, trained_on, analysed_on = [], [], []
    real_load = data_module.load_full_split
    monkeypatch.setattr(data_module, "load_full_split", lambda c: loads.append(c) or real_load(c))

    def fake_runs(cfg, indices, data=None, **kwargs):
        trained_on.append(data)
        for i in indices:
            save_status(Path(cfg.results_dir) / cfg.experiment_name, i, cfg.num_epochs, True)

    monkeypatch.setattr(experiment_module, "run_experiments", fake_runs)
    monkeypatch.setattr(sweep_module, "analyze_runs", lambda exp_dir, todo, data, **kw: analysed_on.append(data))
    monkeypatch.setattr(sweep_module, "export_results", lambda *a, **kw: [])
    run_sweep(configs, [0], tmp_path / "r", tmp_path / "e", progress=False, log=lambda m: None)
    assert len(loads) == 1 and len(trained_on) == len(analysed_on) == 2
    assert all(d.train.shape[1] == 20 and d.val.shape[1] == 10 for d in trained_on)
    assert all(isinstance(d, data_module.FullSplit) and d.train.shape[1] == 60 and d.test.shape[1] == 20
               for d in analysed_on)


def test_cli_skip_runs_redraws_from_the_export_and_bad_system_is_one_line(tmp_path, capsys):
    from experiments.scaled_sweep import main

    folder, systems = _tiny_configs(tmp_path)
    rc = main(["--config-dir", str(folder), "--systems", "base_deep_learning_system,nope", "--skip-runs",
               "--export-dir", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nope.json" in err and len(err.splitlines()) == 1


def test_cli_with_a_system_subset_still_draws_every_exported_system(tmp_path, capsys):
    from experiments.scaled_sweep import main

    folder, systems = _tiny_configs(tmp_path)
    configs = load_system_configs(folder, systems, {})
    export = tmp_path / "e"
    run_sweep(configs, [0], tmp_path / "r", export, data=load_data(configs[0]), progress=False, log=lambda m: None)
    assert main(["--config-dir", str(folder), "--systems", "retrained_network", "--skip-runs",
                 "--export-dir", str(export)]) == 0
    table = (export / "figures" / "summary_table.txt").read_text()
    assert "base_deep_learning_system" in table and "retrained_network" in table


def _report_script():
    import importlib.util

    path = REPO_ROOT / "scripts" / "scaled_search_report.py"
    spec = importlib.util.spec_from_file_location("scaled_search_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_markers_are_replaced_and_a_marker_without_arrays_is_refused(tmp_path, capsys):
    report = _report_script()
    doc = tmp_path / "doc.md"
    text = "a\n<!-- report: x -->\nold\n<!-- /report -->\nb\n<!-- report: y -->\nkeep\n<!-- /report -->\n"
    doc.write_text(text)
    assert doc_markers.update_document(doc, {"x": "| new |", "y": "| other |"}) == ["x", "y"]
    assert doc.read_text() == text.replace("old", "| new |").replace("keep", "| other |")
    doc.write_text(text)
    with pytest.raises(doc_markers.MissingArrays, match="report: y"):
        doc_markers.update_document(doc, {"x": "| new |"})
    assert doc.read_text() == text  # nothing written

    # the report's main: a marker naming a folder without arrays is a one-line error (exit 2)
    root = tmp_path / "root"
    (root / "search" / "empty" / "results").mkdir(parents=True)
    doc.write_text("<!-- report: configs/scaled_search/empty -->\nold\n<!-- /report -->\n")
    assert report.main(["--root", str(root), "--update", str(doc)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "configs/scaled_search/empty" in err and "no result arrays" in err
    assert "old" in doc.read_text()


def test_report_update_regenerates_a_marker_that_has_arrays(tmp_path, capsys):
    from test_signature import write_export

    report = _report_script()
    root = write_export(tmp_path / "root")
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- report: configs/scaled -->\nstale\n<!-- /report -->\nend\n")
    assert report.main(["--root", str(root), "--update", str(doc)]) == 0
    assert capsys.readouterr().out.strip() == f"{doc}: updated configs/scaled"
    table = report.candidate_table(root / "results", json.loads((root / TIMING_FILE).read_text()))
    assert doc.read_text() == f"intro\n<!-- report: configs/scaled -->\n{table}\n<!-- /report -->\nend\n"
    assert "stale" not in table and "base_deep_learning_system (n=3): best test accuracy" in table


def test_the_committed_report_tables_are_the_ones_the_committed_arrays_give(tmp_path, capsys):
    """docs/scaled_protocol.md's tables are printed from the committed arrays, never edited by hand:
    every marker has committed arrays behind it, and regenerating the tables changes nothing."""
    report = _report_script()
    doc = tmp_path / "scaled_protocol.md"
    committed = (REPO_ROOT / "docs" / "scaled_protocol.md").read_text()
    markers = doc_markers.document_markers(committed)
    assert markers, "docs/scaled_protocol.md has no <!-- report: NAME --> marker"
    doc.write_text(committed)
    rc = report.main(["--root", str(REPO_ROOT / "docs" / "scaled_protocol"), "--update", str(doc)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip() == f"{doc}: updated {', '.join(markers)}"  # every marker regenerated
    assert doc.read_text() == committed
