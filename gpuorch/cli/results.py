"""`gpuctl results ARRAY`: a sweep's tasks as one table of index, state, runtime and result fields."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from gpuorch.cli.printing import table

BUILT_IN = {"index": "index", "state": "state", "runtime": "runtime_seconds", "job_id": "job_id"}
"""--sort names of the columns every row has."""


def result_fields(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every result field any task reported, in the order first seen."""
    fields: dict[str, None] = {}
    for row in rows:
        for name in row["result"] or {}:
            fields.setdefault(name, None)
    return list(fields)


def _value(row: dict[str, Any], field: str) -> Any:
    return row[BUILT_IN[field]] if field in BUILT_IN else (row["result"] or {}).get(field)


def sort_rows(rows: Sequence[dict[str, Any]], field: str, reverse: bool = False) -> list[dict[str, Any]]:
    """Rows by `field` (a built-in column or a result field): numbers in order, then text; rows without it
    last, whichever the direction. ValueError when no row has the field."""
    if field not in BUILT_IN and field not in result_fields(rows):
        known = ", ".join([*BUILT_IN, *result_fields(rows)])
        raise ValueError(f"no task reported a result field {field!r}; sort by one of: {known}")
    present = [row for row in rows if _value(row, field) is not None]
    missing = [row for row in rows if _value(row, field) is None]

    def key(row: dict[str, Any]) -> tuple[int, Any]:
        value = _value(row, field)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return (1, str(value))
        return (0, value)

    return sorted(present, key=key, reverse=reverse) + missing


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value)


def format_results(rows: Sequence[dict[str, Any]]) -> str:
    fields = result_fields(rows)
    lines = [
        (
            row["index"],
            row["state"],
            f"{row['runtime_seconds']:.1f}s" if row["runtime_seconds"] is not None else "-",
            *(_cell((row["result"] or {}).get(name)) for name in fields),
        )
        for row in rows
    ]
    return table(("INDEX", "STATE", "RUNTIME", *(name.upper() for name in fields)), lines)


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    fields = result_fields(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "job_id", "state", "runtime_seconds", *fields])
    for row in rows:
        result = row["result"] or {}
        writer.writerow(
            [
                row["index"],
                row["job_id"],
                row["state"],
                "" if row["runtime_seconds"] is None else f"{row['runtime_seconds']:.3f}",
                *("" if result.get(name) is None else _cell(result[name]) for name in fields),
            ]
        )
    return out.getvalue().rstrip("\n")
