"""Writing a benchmark's section into docs/performance.md, between its own markers."""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
HEADER = "# Performance\n\nMeasured numbers; each section says how to reproduce it.\n\n"


def write_section(text: str, begin: str, end: str, doc: Path = DOC) -> None:
    """Replace the text between `begin` and `end` (markers included in `text`), or append it."""
    old = doc.read_text() if doc.exists() else HEADER
    if begin in old and end in old:
        new = old[: old.index(begin)] + text.rstrip("\n") + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    doc.write_text(new)
    print(f"written to {doc}", file=sys.stderr)
