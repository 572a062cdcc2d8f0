"""Helpers the benchmark scripts share: the launch count of a profile and the Markdown table.

Imported by the scripts in this folder as ``benchmarks._common`` (each puts the repository root
on ``sys.path`` first); not a benchmark itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def top_level_aten(event: Any) -> bool:
    """A ``torch.profiler`` event that is an aten op no aten op called: one op called from
    Python (a ``torch._foreach_*`` op counts once, not once per tensor of its loop)."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """A Markdown table: the header, then one line per row (cells as ``str`` gives them); the
    first ``left`` columns are left-aligned (names), the others right-aligned (numbers)."""
    align = ["---"] * left + ["---:"] * (len(columns) - left)
    lines = [_line(columns), "|" + "|".join(align) + "|"]
    lines += [_line(row) for row in rows]
    return "\n".join(lines)


def _line(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
