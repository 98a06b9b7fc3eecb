"""Plain-text and Markdown tables: one look for every CLI, report and benchmark.

No numpy or torch, so the kiosk's commands use it as well as the trainer's.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence


def _is_number(value: object) -> bool:
    """True for ints and floats (numpy included), but not bools."""
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _format_cell(value: object, spec: str | None) -> str:
    """Render one cell: an explicit format spec wins, floats default to 3 decimals."""
    if value is None:
        return ""
    if spec is not None:
        return format(value, spec)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.3f}"
    return str(value)


def _table_cells(
    rows: Sequence[Mapping], columns: Sequence[str], formats: Mapping[str, str] | None
) -> tuple[list[list[str]], list[bool]]:
    """Formatted cells per row plus, per column, whether it is numeric (numeric
    columns are right-aligned so that digits line up)."""
    formats = formats or {}
    cells = [[_format_cell(row.get(col), formats.get(col)) for col in columns] for row in rows]
    numeric = [
        any(_is_number(row.get(col)) for row in rows)
        and all(row.get(col) is None or _is_number(row.get(col)) for row in rows)
        for col in columns
    ]
    return cells, numeric


def format_table(
    rows: Sequence[Mapping],
    columns: Sequence[str],
    formats: Mapping[str, str] | None = None,
) -> str:
    """Plain-text table for terminals and logs: text left-aligned, numbers
    right-aligned, floats to 3 decimals unless `formats[column]` gives a format
    spec (e.g. ".1%"). Missing values print as blanks."""
    cells, numeric = _table_cells(rows, columns, formats)
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def format_markdown_table(
    rows: Sequence[Mapping],
    columns: Sequence[str],
    formats: Mapping[str, str] | None = None,
) -> str:
    """GitHub-flavoured Markdown table for docs, formatted like `format_table`;
    numeric columns are right-aligned and `|` in cells is escaped."""
    cells, numeric = _table_cells(rows, columns, formats)
    cells = [[c.replace("|", "\\|") for c in r] for r in cells]
    rule = ["---:" if num else "---" for num in numeric]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(values) + " |"

    return "\n".join([line(columns), line(rule), *(line(r) for r in cells)])
