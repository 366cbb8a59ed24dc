"""Tables in a document regenerated from committed arrays, between ``<!-- report: NAME -->`` and
``<!-- /report -->`` markers, so that a number in the docs is always one a script printed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

MARKER = re.compile(r"<!-- report: (.+?) -->")


class MissingArrays(ValueError):
    """A report marker of the document names a table that no committed arrays give."""


def document_markers(text: str) -> list[str]:
    """The NAMEs of the ``<!-- report: NAME -->`` markers of a document, in order."""
    return MARKER.findall(text)


def update_document(doc: Path, tables: dict[str, str]) -> list[str]:
    """Replace the text between ``<!-- report: NAME -->`` and ``<!-- /report -->`` with the table of
    NAME; returns the names replaced, in the document's order. A marker naming no table (its folder
    has no arrays) raises ``MissingArrays`` and the document is left as it was."""
    text = doc.read_text()
    names = document_markers(text)
    missing = [n for n in names if n not in tables]
    if missing:
        raise MissingArrays(f"{doc}: marker '<!-- report: {missing[0]} -->' has no result arrays behind it "
                            "(its folder holds no exported run); export the runs or remove the marker")
    for name in dict.fromkeys(names):
        pattern = re.compile(rf"(<!-- report: {re.escape(name)} -->\n).*?(<!-- /report -->)", re.S)
        text, n = pattern.subn(lambda m, t=tables[name]: m.group(1) + t + "\n" + m.group(2), text)
        if not n:
            raise MissingArrays(f"{doc}: marker '<!-- report: {name} -->' has no closing <!-- /report -->")
    doc.write_text(text)
    return names


def update_for_command(doc: Path, tables: dict[str, str]) -> int:
    """``update_document`` as a command runs it: prints which tables it replaced and returns 0, or
    prints the one-line error and returns 2 with the document left as it was."""
    try:
        done = update_document(doc, tables)
    except (MissingArrays, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{doc}: updated {', '.join(done) or 'nothing (no report marker)'}")
    return 0
