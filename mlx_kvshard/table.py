"""Plain-text tables for the command line (the plan's fit table, the doctor's report)."""

from __future__ import annotations

from typing import Sequence


def columns(rows: Sequence[Sequence[str]], align: str | None = None, sep: str = "  ") -> list[str]:
    """Each row as one line, every column as wide as its widest cell. `align` has one
    letter per column, "l" or "r" (default: all right); the last column of a left-aligned
    table is not padded, so lines carry no trailing blanks."""
    if not rows:
        return []
    n = len(rows[0])
    align = align or "r" * n
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)]
        lines.append(sep.join(cells).rstrip() if align[-1] == "l" else sep.join(cells))
    return lines
