"""The repository explains itself: every "semantics §N" in the code names a section of
docs/reference_semantics.md, and the documents the code points to exist."""

import re

from conftest import REPO_ROOT

SEMANTICS = REPO_ROOT / "docs" / "reference_semantics.md"
CITATION = re.compile(r"semantics §(\d+)((?:[–-]\d+|(?:,\s*§\d+))*)")


def _sections() -> set[int]:
    return {int(m) for m in re.findall(r"^## (\d+)\. ", SEMANTICS.read_text(), flags=re.M)}


def _cited(text: str) -> set[int]:
    out: set[int] = set()
    for first, rest in CITATION.findall(text):
        out.add(int(first))
        span = re.match(r"[–-](\d+)", rest)
        if span:
            out.update(range(int(first), int(span.group(1)) + 1))
        out.update(int(n) for n in re.findall(r"§(\d+)", rest))
    return out


def test_sections_are_numbered_in_order():
    numbers = [int(m) for m in re.findall(r"^## (\d+)\. ", SEMANTICS.read_text(), flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 10


def test_every_citation_names_an_existing_section():
    sections = _sections()
    files = [p for d in ("lop_jax", "experiments", "scripts", "tests") for p in (REPO_ROOT / d).glob("*.py")]
    cited = {}
    for path in files:
        for n in _cited(path.read_text()):
            cited.setdefault(n, []).append(path.name)
    assert cited, "no citation found: has the short form changed?"
    missing = {n: names for n, names in cited.items() if n not in sections}
    assert not missing, f"cited sections missing from {SEMANTICS.name}: {missing}"


def test_the_documents_the_code_points_to_exist():
    for name in ("reference_semantics.md", "performance_notes.md"):
        assert (REPO_ROOT / "docs" / name).is_file()
