"""Rows from JSONL or Parquet files, local or gs://, each tagged with where it came from.

A row that cannot be used raises ``BadRow`` naming the file and line (JSONL, 1-based) or row
(Parquet, 1-based); callers decide whether to skip it (``spec.data.skipBadRows``) or stop.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from posttrain.trainer import storage


class BadRow(ValueError):
    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Row:
    where: str  # "data/train.jsonl:12" or "data/train.parquet row 12"
    value: dict[str, Any] | BadRow  # the row, or why it could not be read


def file_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(
        f"spec.data: cannot tell the format of {path!r} from its extension; "
        "use .jsonl/.json or .parquet, or set spec.data.format"
    )


T = TypeVar("T")


def load_rows(
    path: str, data: Any, make: Callable[[dict[str, Any], str], T]
) -> tuple[list[T], list[BadRow]]:
    """``make(row, where)`` of every row of ``path`` (in ``data.format``), and the rows skipped.
    A row that cannot be read or made (``make`` raises ``BadRow``) stops the load with its file
    and line, unless ``data.skip_bad_rows`` (spec.data.skipBadRows) skips it."""
    made: list[T] = []
    skipped: list[BadRow] = []
    for row in read_rows(path, data.format):
        try:
            if isinstance(row.value, BadRow):
                raise row.value
            made.append(make(row.value, row.where))
        except BadRow as bad:
            if not data.skip_bad_rows:
                raise BadRow(
                    bad.where, f"{bad.reason} (set spec.data.skipBadRows to skip such rows)"
                ) from None
            skipped.append(bad)
    return made, skipped


def read_rows(path: str, declared_format: str = "auto") -> Iterator[Row]:
    fmt = file_format(path, declared_format)
    if not storage.exists(path):
        raise FileNotFoundError(f"spec.data: {path}: no such file")
    if fmt == "jsonl":
        yield from _jsonl(path)
    else:
        yield from _parquet(path)


def _jsonl(path: str) -> Iterator[Row]:
    text = storage.read_text(path)
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield Row(where, BadRow(where, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(value, dict):
            yield Row(
                where, BadRow(where, f"a row must be a JSON object, got {type(value).__name__}")
            )
            continue
        yield Row(where, value)


def _parquet(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
    for i, value in enumerate(table.to_pylist(), start=1):
        yield Row(f"{path} row {i}", value)
