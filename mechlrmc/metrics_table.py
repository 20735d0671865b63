"""A run's `metrics.csv`: one row per logged step, written by one writer and read exactly.

Columns: the task's (`Task.metric_columns`: step, its metrics, its eval metrics, wall_time), then
any scalar a recorded loop added (`Recorder.step`), in the order they first came. A new column
rewrites the file once (atomically; the earlier rows are empty there); rows are appended and
flushed to disk one call at a time, and a failed append is undone. Floats are written with
`repr`, so reading back (`read`, pandas' round-trip parser) gives the same floats. A reader takes
only complete rows: a row the writer is appending at that moment is left out.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from mechlrmc.files import CheckpointError, atomic_write, write_failed


def _format(value: float | int | None) -> str:
    if value is None or value != value:  # None or NaN
        return ""
    return repr(int(value)) if isinstance(value, int) else repr(float(value))


def _complete(text: str) -> str:
    return text[:text.rfind("\n") + 1]  # the piece after the last newline may be half a row


def header(file: Path) -> tuple[str, ...] | None:
    """The columns of `file` (None where it is missing or empty)."""
    if not file.is_file():
        return None
    with open(file) as f:
        line = f.readline().rstrip("\n")
    return tuple(line.split(",")) if line else None


def start(file: Path, columns: tuple[str, ...]) -> None:
    """A table with `columns` and no rows."""
    atomic_write(file, (",".join(columns) + "\n").encode())


def add_columns(file: Path, names: list[str]) -> None:
    """New columns at the end (the file rewritten atomically; earlier rows empty there)."""
    bad = [n for n in names if not n or any(c in n for c in ',"\n\r')]
    if bad:
        raise CheckpointError(f"metric name {bad[0]!r} cannot be a column of metrics.csv: allowed names "
                              f"without commas, quotes or line breaks")
    lines = _complete(file.read_text()).split("\n")[:-1]
    pad = "," * len(names)
    body = [lines[0] + "," + ",".join(names), *(line + pad for line in lines[1:] if line)]
    atomic_write(file, ("\n".join(body) + "\n").encode())


def append(file: Path, columns: tuple[str, ...], rows: list[dict]) -> tuple[str, ...]:
    """Append `rows` to the table whose columns are `columns` (adding the columns a row brings
    first) and flush them to disk; the columns it has now."""
    new = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in columns]
    if new:
        add_columns(file, new)
        columns = (*columns, *new)
    text = "".join(",".join(_format(r.get(c)) for c in columns) + "\n" for r in rows)
    size = file.stat().st_size
    try:
        with open(file, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        os.truncate(file, size)
        raise write_failed(file, e) from e
    return columns


def truncate(file: Path, step: int) -> None:
    """Keep only complete rows up to `step` (used on resume)."""
    lines = file.read_text().split("\n")
    head, body = lines[0], lines[1:-1]
    keep = [line for line in body if line and int(line.split(",", 1)[0]) <= step]
    atomic_write(file, ("\n".join([head, *keep]) + "\n").encode())


def read(file: Path) -> pd.DataFrame:
    """The table's complete rows, with exactly the floats written."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    return pd.read_csv(io.StringIO(_complete(file.read_text())), float_precision="round_trip")
