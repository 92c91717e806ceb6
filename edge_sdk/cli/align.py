"""`edge-sdk align`: offline alignment of timestamped CSV/Parquet files onto a reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from rich.table import Table as RichTable

from ..errors import AlignError
from .app import app, console

_SPEC_HELP = ("Stream to match: [NAME=]PATH:POLICY[:TOLERANCE[:OFFSET[:DRIFT_PPM]]], e.g. "
              "audio.csv:nearest:0.05 or imu=imu.parquet:interpolate:0.01:-0.004. Policies: nearest, "
              "previous, next, interpolate. TOLERANCE/OFFSET in seconds ('' or 'none' = unbounded), DRIFT in ppm.")


@dataclass(frozen=True)
class StreamArg:
    name: str
    path: Path
    policy: str
    tolerance: float | None
    offset: float
    drift_ppm: float


def parse_stream_arg(text: str) -> StreamArg:
    """Parse one ``--stream`` value; errors name the argument and the bad field."""
    name = None
    rest = text
    if "=" in text.split(":", 1)[0]:
        name, rest = text.split("=", 1)
    parts = rest.split(":")
    if len(parts) < 2 or len(parts) > 5 or not parts[0]:
        raise AlignError(f"--stream {text!r}: expected [NAME=]PATH:POLICY[:TOLERANCE[:OFFSET[:DRIFT_PPM]]]")
    path = Path(parts[0])

    def number(i: int, what: str, default: float | None) -> float | None:
        if len(parts) <= i or parts[i].strip().lower() in ("", "none"):
            return default
        try:
            return float(parts[i])
        except ValueError:
            raise AlignError(f"--stream {text!r}: {what} {parts[i]!r} is not a number") from None

    return StreamArg(name or path.stem, path, parts[1], number(2, "tolerance", None),
                     number(3, "offset", 0.0) or 0.0, number(4, "drift_ppm", 0.0) or 0.0)


@app.command("align")
def align_command(
    reference: Path = typer.Option(..., "--reference", "-r", help="Reference stream (drives the output rows): CSV or Parquet."),
    streams: list[str] = typer.Option(..., "--stream", "-s", help=_SPEC_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Output file: .csv, or .parquet (needs pyarrow)."),
    ts_column: str | None = typer.Option(None, "--ts-column", help="Timestamp column name (default: ts/timestamp/time, else the first column)."),
    unit: str = typer.Option("s", "--time-unit", help="Timestamps in files: 's' (float seconds) or 'ns' (int64 nanoseconds)."),
    strict_order: bool = typer.Option(False, "--strict-order", help="Reject unsorted stream timestamps instead of sorting them."),
    no_exact: bool = typer.Option(False, "--no-exact-matches", help="Do not match samples with exactly the reference time."),
) -> None:
    """Align streams onto a reference's timestamps, exactly as pandas.merge_asof would, and write one table."""
    import numpy as np

    from ..runtime.align import Stream, align
    from ..runtime.align.tables import read_table, write_table

    ref = read_table(reference, ts_column, unit)
    args = [parse_stream_arg(s) for s in streams]
    names = [a.name for a in args]
    if len(set(names)) != len(names) or ref.ts_name in names:
        raise AlignError(f"stream names must be unique and differ from the reference column (got {', '.join(names)}); "
                         "use NAME=PATH:... to rename")
    tables = {a.name: read_table(a.path, ts_column, unit) for a in args}
    spec = {a.name: Stream(tables[a.name].ts, tables[a.name].values(), a.policy, a.tolerance, a.offset, a.drift_ppm,
                           not no_exact, unsorted="raise" if strict_order else "sort") for a in args}
    results = align(ref.ts, spec)
    out: dict[str, object] = {ref.ts_name: ref.ts, **ref.columns}
    for a in args:
        res, table = results[a.name], tables[a.name]
        out[f"{a.name}.index"] = res.indices
        out[f"{a.name}.ts"] = [v if ok else None for v, ok in zip(res.matched_ts.tolist(), res.mask.tolist())]
        for j, col in enumerate(table.columns):
            if isinstance(res.values, np.ndarray):
                column = res.values[:, j]
                out[f"{a.name}.{col}"] = np.where(res.mask, column, np.nan)
            else:
                out[f"{a.name}.{col}"] = [row[j] if row is not None else None for row in res.values]
    write_table(output, out)
    summary = RichTable(title=f"aligned {ref.ts.size} reference rows → {output}")
    for col in ("stream", "policy", "tolerance s", "samples", "matched", "unmatched"):
        summary.add_column(col)
    for a in args:
        m = int(results[a.name].mask.sum())
        summary.add_row(a.name, a.policy, "none" if a.tolerance is None else f"{a.tolerance:g}",
                        str(tables[a.name].ts.size), str(m), str(ref.ts.size - m))
    console.print(summary)
