"""The study report (lop_jax.report, python -m experiments.report): one self-contained HTML page on a
smoke results folder (its tables against the arrays, its configs against the stored ones, its images
decoded), the one-line refusals that write nothing, the committed laptop-protocol folder read
without a write, and the page as headless Chromium draws it."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from experiments import report as report_cli
from lop_jax import plots
from lop_jax.analysis import analyze_experiment
from lop_jax.config import load_config
from lop_jax.experiment import run_experiment
from lop_jax.results import ExperimentDir
from lop_jax.summary import format_duration, summarize, task_table

SMOKE_SCALE = REPO_ROOT / "configs" / "scales" / "smoke.json"
SYSTEMS = ("base_deep_learning_system", "retrained_network")
SCREENSHOT = REPO_ROOT / "scripts" / "report_screenshot.sh"


class Page(html.parser.HTMLParser):
    """The parts of the page the tests read: tables (rows of cell texts), <pre> texts, image sources,
    every tag's attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.pres: list[str] = []
        self.images: list[str] = []
        self.attrs: list[tuple[str, dict[str, str]]] = []
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.attrs.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._pre = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "pre":
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        for part in (self._cell, self._pre):
            if part is not None:
                part.append(data)

    def table_with(self, first_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and t[0][0] == first_header)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two smoke systems, index 0 each, the base system analysed and a started, unfinished index 3."""
    root = tmp_path_factory.mktemp("study") / "results"
    for name in SYSTEMS:
        cfg = load_config([REPO_ROOT / "configs" / f"{name}.json", SMOKE_SCALE],
                          {"results_dir": str(root), "experiment_name": name})
        run_experiment(cfg, 0, progress=False)
    analyze_experiment(root / SYSTEMS[0], progress=False)
    ExperimentDir(root / SYSTEMS[0]).save_status(3, 1, False)
    return root


@pytest.fixture(scope="module")
def page(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "study.html"
    assert report_cli.main(["--results-dir", str(study), "--out", str(out)]) == 0
    return out


def _png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_the_page_holds_the_tables_the_arrays_give(study, page):
    p = Page(page.read_text())
    summary = p.table_with("system")
    assert [row[0] for row in summary[1:]] == list(SYSTEMS)
    rows = {r["algorithm"]: r for r in plots.summary_table(study, SYSTEMS)}
    base = summary[1]
    best_last = 100 * ExperimentDir(study / SYSTEMS[0]).load_metric("test_accuracy_per_epoch", 0)[2:].max()
    assert base[:4] == [SYSTEMS[0], "10", "1", f"{best_last:.2f}"]
    assert base[5] == f"{rows[SYSTEMS[0]]['dormant_percent'][0]:.2f}" and base[-1] == "1"  # analysed
    assert summary[2][5] == "-" and summary[2][-1] == "0"  # the retrained network is not analysed
    # each system's per-task table, as lop_jax.summary gives it
    task_tables = [t for t in p.tables if t[0][0] == "task"]
    for table, name in zip(task_tables, SYSTEMS, strict=True):
        headers, body = task_table(summarize(ExperimentDir(study / name), [0]))
        assert table == [headers, *body]
    # the wall times are the runtime arrays' sums
    base_dir = ExperimentDir(study / SYSTEMS[0])
    times = p.table_with("index")
    recorded = sum(float(base_dir.load_metric(m, 0).sum()) for m in
                   ("epoch_runtime", "test_evaluation_runtime", "validation_evaluation_runtime"))
    assert times[1][0] == "0" and times[1][4] == format_duration(recorded)
    text = page.read_text()
    assert "finished runs: index 0; started, not finished (left out): index 3" in text


def test_the_page_holds_the_configs_versions_and_device(study, page):
    p = Page(page.read_text())
    configs = [json.loads(t) for t in p.pres]
    assert configs == [ExperimentDir(study / n).read_config().to_dict() for n in SYSTEMS]
    differ = {row[0]: row[1:] for row in p.table_with("key")[1:]}
    assert differ == {"reset_network": ["false", "true"]}
    env = dict(row for row in p.table_with("")[1:])
    assert env["jax"] == jax.__version__ and env["numpy"] == np.__version__
    assert env["devices"] == ", ".join(f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices())


def test_the_page_is_self_contained_with_its_figures_embedded(page):
    p = Page(page.read_text())
    for tag, attrs in p.attrs:  # nothing to fetch: no script, stylesheet or image from elsewhere
        assert tag not in ("script", "link", "iframe"), tag
        assert not any(attrs.get(k, "").startswith(("http:", "https:", "file:", "/")) for k in ("src", "href"))
    images = [_png(src) for src in p.images]
    assert len(images) >= 8  # main figure, accuracy by epoch, test accuracy and loss, relative accuracy, analysis
    main = images[0]
    assert main.size[0] > 2 * main.size[1]  # the three panels side by side
    colors = {c for _, c in main.convert("RGB").getcolors(1 << 20)}
    assert (0xD6, 0x27, 0x28) in colors  # the base system's red line was drawn
    alts = [attrs["alt"] for tag, attrs in p.attrs if tag == "img"]
    assert alts[:2] == ["The paper's main figure", "Test accuracy, epoch by epoch"]
    assert any("next_task_dormant_units_analysis" in a for a in alts)


def test_default_output_goes_into_the_results_folder(study, capsys):
    assert report_cli.main(["--results-dir", str(study)]) == 0
    assert capsys.readouterr().out.strip() == str(study / "report.html")
    assert Page((study / "report.html").read_text()).images
    (study / "report.html").unlink()


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", ["missing", "empty", "unfinished only", "an experiment directory"])
def test_no_finished_run_is_one_line_exit_2_and_nothing_written(case, study, tmp_path, capsys):
    root = tmp_path / "r"
    if case != "missing":
        root.mkdir()
    if case == "unfinished only":
        folder = ExperimentDir(root / "base_deep_learning_system")
        folder.write_config(load_config([REPO_ROOT / "configs" / "base_deep_learning_system.json", SMOKE_SCALE]))
        folder.save_metric("test_accuracy_per_epoch", 0, np.zeros(4, np.float32))
        folder.save_status(0, 2, False)
    if case == "an experiment directory":
        root = study / SYSTEMS[0]
    before = _listing(root) if root.exists() else None
    out = tmp_path / "out.html"
    assert report_cli.main(["--results-dir", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    expected = {"missing": "no such results folder", "empty": "no finished run",
                "unfinished only": "no finished run", "an experiment directory": "is one experiment directory"}
    assert expected[case] in err
    assert not out.exists()
    assert (_listing(root) if root.exists() else None) == before


def test_the_committed_laptop_protocol_folder_reads_without_a_write(tmp_path):
    committed = REPO_ROOT / "docs" / "scaled_protocol" / "results"
    if not committed.is_dir():
        pytest.skip("docs/scaled_protocol/results is not in this checkout")
    copy = tmp_path / "results"  # a copy: the sweep may be exporting into the committed folder meanwhile
    shutil.copytree(committed, copy)
    before = _listing(copy)
    out = tmp_path / "scaled.html"
    assert report_cli.main(["--results-dir", str(copy), "--out", str(out)]) == 0
    assert _listing(copy) == before
    p = Page(out.read_text())
    names = [row[0] for row in p.table_with("system")[1:]]
    assert names == [n for n in plots.PAPER_COLORS if (copy / n).is_dir()]
    assert len(p.images) >= 10  # analysed runs: every figure can be drawn


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium binary (Debian: apt-get install chromium)")
def test_chromium_draws_the_tables_and_the_figures(page, tmp_path):
    shot = tmp_path / "page.png"
    done = subprocess.run(["bash", str(SCREENSHOT), str(page), str(shot), "1200", "2400"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    a = np.asarray(image).astype(int)
    dark = (a.max(axis=2) < 80).mean(axis=1)  # text and axes
    assert dark[:300].max() > 0.02  # the title and the summary table near the top
    red = (np.abs(a - (0xD6, 0x27, 0x28)).max(axis=2) < 30).sum()
    assert red > 200  # the base system's red curves: the embedded PNGs were decoded and drawn
    grey = (np.abs(a - (0xF0, 0xF0, 0xF0)).max(axis=2) < 3).sum()
    assert grey > 1000  # the tables' header cells (background #f0f0f0): the page's style applied


def test_the_screenshot_script_refuses_bad_arguments(tmp_path):
    done = subprocess.run(["bash", str(SCREENSHOT), str(tmp_path / "none.html"), str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no such page" in done.stderr
    assert subprocess.run(["bash", str(SCREENSHOT)], capture_output=True, timeout=60).returncode == 2
