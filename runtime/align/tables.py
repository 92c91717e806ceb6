"""Read and write timestamped tables (CSV always; Parquet when pyarrow is installed) for offline use.

A table is a header row plus columns; one column holds the timestamps (``ts``, ``timestamp``,
``time``, or else the first column). Numeric columns become float64 arrays, others stay strings.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import AlignError, MissingDependencyError

TS_NAMES = ("ts", "timestamp", "time")


@dataclass
class Table:
    ts: np.ndarray
    ts_name: str
    columns: dict[str, Any]  # name -> float64 array or list of str

    def values(self) -> np.ndarray | list | None:
        """All value columns as one [rows, cols] float64 array (numeric), else None/row tuples."""
        if not self.columns:
            return None
        cols = list(self.columns.values())
        if all(isinstance(c, np.ndarray) for c in cols):
            return np.stack(cols, axis=1)
        return list(zip(*cols))


def _pyarrow(purpose: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("pyarrow", "align", purpose) from None
    return pa, pq


def _ts_column(names: list[str], wanted: str | None, path: Path) -> str:
    if wanted is not None:
        if wanted not in names:
            raise AlignError(f"{path}: no timestamp column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    for cand in TS_NAMES:
        if cand in names:
            return cand
    return names[0]


def _parse_ts(raw: list[str], unit: str, path: Path) -> np.ndarray:
    out = []
    for row, text in enumerate(raw, start=2):
        try:
            out.append(int(text) if unit == "ns" else float(text))
        except ValueError:
            raise AlignError(f"{path}: line {row}: timestamp {text!r} is not {'an integer (ns)' if unit == 'ns' else 'a number'}") from None
    return np.array(out, dtype=np.int64 if unit == "ns" else np.float64)


def _numeric(raw: list[str]) -> np.ndarray | list[str]:
    try:
        return np.array([float(x) if x != "" else math.nan for x in raw], dtype=np.float64)
    except ValueError:
        return raw


def read_table(path: str | Path, ts_column: str | None = None, unit: str = "s") -> Table:
    """Load a CSV or Parquet file (chosen by extension)."""
    path = Path(path)
    if unit not in ("s", "ns"):
        raise AlignError(f"time unit must be 's' or 'ns', got {unit!r}")
    if not path.is_file():
        raise AlignError(f"{path}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        _, pq = _pyarrow("reading Parquet")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several unrelated types for bad files
            raise AlignError(f"{path}: cannot read Parquet: {exc}") from None
        names = table.column_names
        if not names:
            raise AlignError(f"{path}: no columns")
        tsn = _ts_column(names, ts_column, path)
        col = table.column(tsn).to_numpy()
        if col.dtype.kind == "M":
            ts = col.astype("datetime64[ns]").view(np.int64)
        else:
            ts = col.astype(np.int64 if unit == "ns" else np.float64)
        columns = {}
        for n in names:
            if n == tsn:
                continue
            arr = table.column(n).to_numpy(zero_copy_only=False)
            columns[n] = arr.astype(np.float64) if arr.dtype.kind in "fiub" else [str(x) for x in arr]
        return Table(ts, tsn, columns)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AlignError(f"{path}: cannot read CSV: {exc}") from None
    if not rows or not rows[0]:
        raise AlignError(f"{path}: empty file (a header row is required)")
    header, body = rows[0], [r for r in rows[1:] if r]
    for line, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise AlignError(f"{path}: line {line}: {len(r)} fields, header has {len(header)}")
    tsn = _ts_column(header, ts_column, path)
    ti = header.index(tsn)
    ts = _parse_ts([r[ti] for r in body], unit, path)
    columns = {h: _numeric([r[i] for r in body]) for i, h in enumerate(header) if i != ti}
    return Table(ts, tsn, columns)


def write_table(path: str | Path, columns: dict[str, Any]) -> None:
    """Write columns (arrays or lists, None/NaN = empty cell) as CSV or Parquet by extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".parquet", ".pq"):
        pa, pq = _pyarrow("writing Parquet")
        arrays = {}
        for name, col in columns.items():
            if isinstance(col, np.ndarray):
                arrays[name] = pa.array(col)
            else:
                arrays[name] = pa.array([None if v is None else str(v) for v in col], type=pa.string())
        pq.write_table(pa.table(arrays), path)
        return
    names = list(columns)
    cols = [columns[n].tolist() if isinstance(columns[n], np.ndarray) else list(columns[n]) for n in names]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for row in zip(*cols):
            writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else
                             (repr(v) if isinstance(v, float) else v) for v in row])
