"""The operator tables the commands print (``project list``, ``sink parked``)."""

from __future__ import annotations

from collections.abc import Iterable


def render_table(header: str, rows: Iterable[str], empty: str) -> str:
    """An operator table: the header line, one line per row, or ``empty`` when there is none."""
    lines = [header, *rows]
    if len(lines) == 1:
        lines.append(empty)
    return "\n".join(lines)
