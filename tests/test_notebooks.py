"""The Colab notebooks in ``notebooks/``: stored without outputs, and executing top to bottom at the CI size.

Each notebook runs in a fresh ``python3`` kernel (nbclient) from the ``notebooks/`` folder, as Jupyter and
Colab start it, with ``LOP_JAX_NOTEBOOK_SIZE=ci`` (the smallest setting that still runs every cell) and
``LOP_JAX_RESULTS`` in a temporary folder shared by the three notebooks, so that they also share JAX's
persistent compilation cache there. Cells tagged ``figure`` must produce a PNG image.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("quickstart.ipynb", "paper_figures.ipynb", "custom_algorithm.ipynb")
# the notebooks whose first code cell installs lop-jax as LOP_JAX_SOURCE says (lop_jax.notebook_setup): all
FROM_SOURCE = NOTEBOOKS
CELL_TIMEOUT_S = 600


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    dirty = [k for k, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{name}: cells {dirty} have stored outputs or execution counts; clear them before committing"
    attached = [k for k, c in enumerate(nb.cells) if c.get("attachments")]
    assert not attached, f"{name}: cells {attached} have attachments (stored images)"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_reads_size_and_results_from_environment(name):
    sources = "\n".join(c.source for c in _code_cells(_read(name)))
    assert "LOP_JAX_NOTEBOOK_SIZE" in sources and "LOP_JAX_RESULTS" in sources
    assert 'LOP_JAX_SOURCE = os.environ.get("LOP_JAX_SOURCE") or "auto"' in sources
    assert "<owner>" not in (NOTEBOOK_DIR / name).read_text(), f"{name}: a placeholder to edit is left"
    assert '"google.colab" in sys.modules' in sources
    assert any("figure" in c.metadata.get("tags", []) for c in _code_cells(_read(name))), \
        f"{name}: no cell is tagged 'figure'"


def install_cell(name: str) -> str:
    """The source of a notebook's install cell (its first code cell)."""
    return _code_cells(_read(name))[0].source


def test_the_install_cell_is_one_cell_in_every_notebook_that_has_it():
    cells = {name: install_cell(name) for name in FROM_SOURCE}
    assert len(set(cells.values())) == 1, "the install cells differ: change them together"
    cell = cells[FROM_SOURCE[0]]
    assert cell.startswith("# Install lop-jax.") and "from lop_jax.notebook_setup import install" in cell
    for name in FROM_SOURCE:  # the first markdown cell says which Colab runtime to pick
        intro = _read(name).cells[0]
        assert intro.cell_type == "markdown" and "CPU" in intro.source and "runtime" in intro.source
    assert "**GPU**" in _read("paper_figures.ipynb").cells[0].source


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook-results")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executes_at_ci_size(name, results_root, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("LOP_JAX_NOTEBOOK_SIZE", "ci")
    monkeypatch.setenv("LOP_JAX_RESULTS", str(results_root))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the notebooks' own cache, in results_root
    repo_results = REPO_ROOT / "results" / "notebooks"
    notebooks_before = _files_under(NOTEBOOK_DIR)
    results_before = _files_under(repo_results)
    stored = (NOTEBOOK_DIR / name).read_bytes()

    nb = _read(name)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = [c for c in _code_cells(nb) if "figure" in c.metadata.get("tags", [])]
    for cell in figures:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"{name}: a figure cell produced no image:\n{cell.source[:300]}"
    streams = "".join(o.get("text", "") for c in _code_cells(nb) for o in c.outputs if o.output_type == "stream")
    assert "size: ci" in streams
    assert str(results_root.resolve()) in streams, "the notebook did not put its results under LOP_JAX_RESULTS"
    assert any(p.is_dir() for p in results_root.iterdir())
    if name == "paper_figures.ipynb":  # the no-full-runs branch: its own runs, the retrained network among them
        assert "demo_runs" in streams and "'retrained_network'" in streams
    if name == "custom_algorithm.ipynb":  # the notebook's own method ran and the loop recorded its metric
        import re

        counts = re.findall(r"norm_cap: capped_kernels_per_epoch: (\d+) in all", streams)
        assert counts and int(counts[0]) > 0, streams[-2000:]
        assert "refused: config key 'methods'" in streams

    assert _files_under(NOTEBOOK_DIR) == notebooks_before, "executing the notebook left files in notebooks/"
    assert _files_under(repo_results) == results_before, "executing the notebook wrote into results/notebooks/"
    assert (NOTEBOOK_DIR / name).read_bytes() == stored, "executing the notebook modified the stored file"
