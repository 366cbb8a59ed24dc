"""Installing lop-jax in a notebook's kernel: the notebooks' install cell (LOP_JAX_SOURCE: auto, a git
URL, a folder), run here against a small git repository and folders, and lop_jax.notebook_setup.install
with a recording runner (nothing is installed for real)."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from test_notebooks import FROM_SOURCE, install_cell

from lop_jax import notebook_setup
from lop_jax.notebook_setup import SetupError, install, is_checkout


def _fake_checkout(folder: Path) -> Path:
    (folder / "lop_jax").mkdir(parents=True)
    (folder / "configs").mkdir()
    (folder / "lop_jax" / "__init__.py").write_text("")
    (folder / "pyproject.toml").write_text("[project]\nname = 'lop-jax'\n")
    (folder / "configs" / "smoke.json").write_text("{}\n")
    return folder


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd=cwd,
                   check=True, capture_output=True)


@pytest.fixture
def cell(tmp_path, monkeypatch):
    """The install cell's definitions (everything before it acts), as on a runtime without Colab whose
    clone folder and Drive folder are under tmp_path."""
    tree = ast.parse(install_cell(FROM_SOURCE[0]))
    first_act = next(k for k, node in enumerate(tree.body)
                     if isinstance(node, ast.Assign) and node.targets[0].id == "CHECKOUT")
    namespace: dict = {}
    exec(compile(ast.Module(body=tree.body[:first_act], type_ignores=[]), "install cell", "exec"), namespace)
    assert namespace["IN_COLAB"] is False
    namespace["CLONE"], namespace["DRIVE"] = tmp_path / "clone", tmp_path / "drive" / "lop-jax"
    monkeypatch.chdir(tmp_path)
    return namespace


def test_auto_finds_the_checkout_above_the_notebook_then_the_clone_then_drive(cell, tmp_path, monkeypatch):
    find = cell["find_checkout"]
    with pytest.raises(FileNotFoundError, match="LOP_JAX_SOURCE=auto found no lop-jax checkout"):
        find("auto")
    drive = _fake_checkout(cell["DRIVE"])
    assert find("auto") == drive
    clone = _fake_checkout(cell["CLONE"])
    assert find("auto") == clone
    repo = _fake_checkout(tmp_path / "repo")
    (repo / "notebooks").mkdir()
    monkeypatch.chdir(repo / "notebooks")
    assert find("auto") == repo.resolve()


def test_a_folder_source_must_be_a_checkout(cell, tmp_path):
    find = cell["find_checkout"]
    repo = _fake_checkout(tmp_path / "somewhere" / "lop-jax")
    assert find(str(repo)) == repo.resolve()
    with pytest.raises(FileNotFoundError, match="is not a lop-jax checkout"):
        find(str(tmp_path / "somewhere"))


def test_a_git_url_is_cloned_once_at_the_branch_or_tag_given(cell, tmp_path):
    origin = _fake_checkout(tmp_path / "origin")
    _git("init", "-q", "-b", "main", cwd=origin)
    _git("add", ".", cwd=origin)
    _git("commit", "-q", "-m", "first", cwd=origin)
    _git("tag", "v1", cwd=origin)
    (origin / "configs" / "later.json").write_text("{}\n")
    _git("add", ".", cwd=origin)
    _git("commit", "-q", "-m", "second", cwd=origin)

    find = cell["find_checkout"]
    clone = find(f"file://{origin}#v1")
    assert clone == cell["CLONE"] and is_checkout(clone)
    assert (clone / "configs" / "smoke.json").is_file() and not (clone / "configs" / "later.json").exists()
    (clone / "configs" / "mine.json").write_text("{}\n")
    assert find(f"file://{origin}") == clone and (clone / "configs" / "mine.json").is_file()  # not cloned again


class Recorder:
    def __init__(self):
        self.commands: list[list[str]] = []

    def __call__(self, command, check):
        assert check
        self.commands.append(command)


def test_install_outside_colab_installs_nothing(tmp_path, monkeypatch):
    checkout = _fake_checkout(tmp_path / "repo")
    run = Recorder()
    lines = install(checkout, allow_pip=False, gpu=True, run=run)
    assert run.commands == []
    assert lines == [f"lop-jax {metadata.version('lop-jax')} is installed; this notebook uses the checkout {checkout}"]
    monkeypatch.setattr(notebook_setup, "_installed_version", lambda: None)
    with pytest.raises(SetupError, match=r"not installed in this kernel: run `pip install -e \.`"):
        install(checkout, allow_pip=False, run=run)
    with pytest.raises(SetupError, match="is not a lop-jax checkout"):
        install(tmp_path, allow_pip=True, run=run)
    assert run.commands == []


def test_install_on_colab_pip_installs_the_checkout_and_jax_for_the_gpu(tmp_path, monkeypatch):
    checkout = _fake_checkout(tmp_path / "repo")
    versions = iter([None, "0.1.0"])  # not installed before pip, installed after
    monkeypatch.setattr(notebook_setup, "_installed_version", lambda: next(versions))
    run = Recorder()
    lines = install(checkout, allow_pip=True, gpu=True, run=run)
    jax = metadata.version("jax")
    assert run.commands == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(checkout)],
                            [sys.executable, "-m", "pip", "install", "-q", f"jax[cuda12]=={jax}"]]
    assert lines == [f"installed lop-jax 0.1.0 from {checkout} with pip", f"GPU runtime: installed jax[cuda12]=={jax}"]
    # installed already, a CPU runtime: nothing to do
    run = Recorder()
    monkeypatch.setattr(notebook_setup, "_installed_version", lambda: "0.1.0")
    assert install(checkout, allow_pip=True, gpu=False, run=run)[1] == "no GPU on this runtime: JAX runs on the CPU"
    assert run.commands == []
