"""The methods comparison (issue 16, item 3) on small synthetic exports: known values, the
'keeps plasticity' verdict, refusals, and the committed table being what the committed arrays give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_signature import PASSING, write_export

from experiments.compare_methods import MARKER_NAME, main
from lop_jax import comparison
from lop_jax.doc_markers import document_markers
from lop_jax.signature import SignatureError

REPO_ROOT = Path(__file__).resolve().parents[1]

METHODS = {
    # dormant proportion and stable rank per snapshot, best test accuracy per task (as PASSING)
    "keeper": ([0.0, 0.01, 0.02, 0.03], [60, 59, 59, 59], [0.80, 0.79, 0.78, 0.77]),
    "loser": ([0.0, 0.10, 0.20, 0.30], [60, 58, 50, 40], [0.80, 0.76, 0.72, 0.70]),
}


@pytest.fixture
def exports(tmp_path):
    return write_export(tmp_path / "paper"), write_export(tmp_path / "methods", METHODS)


def test_rows_give_the_known_values_and_verdicts(exports):
    paper, methods = exports
    comp = comparison.load_comparison(paper / "results", methods / "results")
    rows = {r.name: r for r in comparison.rows(comp)}
    assert list(rows) == ["base_deep_learning_system", "head_resetting", "shrink_and_perturb",
                          "continual_backpropagation", "retrained_network", "keeper", "loser"]
    keeper, loser = rows["keeper"], rows["loser"]
    assert keeper.source == "method" and keeper.n == 3
    assert keeper.dormant[0] == pytest.approx(3.0, abs=1e-4)
    assert keeper.stable_rank_change[0] == pytest.approx(0.0, abs=1e-6)
    # seed by seed: 77 − 75 at the last task (the jitter is the same in both exports)
    assert keeper.minus_retrained[0] == pytest.approx(2.0, abs=1e-4)
    assert keeper.keeps_plasticity
    assert loser.dormant[0] == pytest.approx(30.0, abs=1e-4)
    # seed s adds s − 1 to every rank: the mean over seeds of −18 / (58 + s − 1)
    assert loser.stable_rank_change[0] == pytest.approx(sum(-1800 / (57 + s) for s in range(3)) / 3, abs=1e-6)
    assert loser.minus_retrained[0] == pytest.approx(-5.0, abs=1e-4) and loser.minus_retrained_slope[0] < 0
    assert not loser.keeps_plasticity
    assert rows["retrained_network"].minus_retrained is None


def test_fewer_than_three_seeds_never_keep_plasticity(tmp_path):
    paper = write_export(tmp_path / "paper")
    methods = write_export(tmp_path / "methods", {"keeper": METHODS["keeper"]}, seeds=(0, 1))
    (row,) = [r for r in comparison.rows(comparison.load_comparison(paper / "results", methods / "results"))
              if r.name == "keeper"]
    assert row.n == 2 and row.dormant[0] < 5 and not row.keeps_plasticity


def test_a_methods_export_of_another_protocol_or_without_runs_is_refused(tmp_path, exports):
    paper, methods = exports
    cfg_path = methods / "results" / "loser" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["network_width"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(SignatureError, match="loser .*was not run at the protocol"):
        comparison.load_comparison(paper / "results", methods / "results")
    (tmp_path / "empty" / "results").mkdir(parents=True)
    with pytest.raises(SignatureError, match="no finished run of a method"):
        comparison.load_comparison(paper / "results", tmp_path / "empty" / "results")
    clash = write_export(tmp_path / "clash", {"continual_backpropagation": PASSING["continual_backpropagation"]})
    with pytest.raises(SignatureError, match="name of one of the paper's systems"):
        comparison.load_comparison(paper / "results", clash / "results", ["continual_backpropagation"])


def test_the_command_updates_the_block_draws_the_figure_and_refuses_a_document_without_it(tmp_path, exports, capsys):
    paper, methods = exports
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n<!-- report: {MARKER_NAME} -->\nstale\n<!-- /report -->\nend\n")
    figures = tmp_path / "figures"
    args = ["--paper", str(paper), "--methods", str(methods), "--figures-dir", str(figures)]
    assert main([*args, "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "stale" not in text and "| **keeper** | 3 | 3.0 ± 0.1 |" in text
    assert (figures / "comparison.png").stat().st_size > 0
    doc.write_text("<!-- report: other -->\nold\n<!-- /report -->\n")
    capsys.readouterr()
    assert main([*args, "--update", str(doc)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report: other" in err[0]
    assert "old" in doc.read_text()


def test_the_committed_comparison_is_the_one_the_committed_arrays_give(tmp_path, capsys):
    """docs/methods_comparison/README.md's table is printed from the committed arrays of both
    exports; it must have the block, and regenerating it changes nothing."""
    committed = (REPO_ROOT / "docs" / "methods_comparison" / "README.md").read_text()
    assert MARKER_NAME in document_markers(committed), "docs/methods_comparison/README.md has no report block"
    doc = tmp_path / "README.md"
    shutil.copy(REPO_ROOT / "docs" / "methods_comparison" / "README.md", doc)
    rc = main(["--paper", str(REPO_ROOT / "docs" / "scaled_protocol"),
               "--methods", str(REPO_ROOT / "docs" / "methods_comparison"),
               "--figures-dir", str(tmp_path / "figures"), "--update", str(doc)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert doc.read_text() == committed
