"""The bounded sample of score rows the report draws from, and which of them were kept.

Memory stays bounded whatever the run's size: at most `MAX_PLOT_ROWS` score rows, the same ones
every time (whole score files picked at an even stride, then evenly spaced rows), reading only
the columns the report needs; the keep-list is streamed in chunks against the sample.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tmars_ray.data import schema
from tmars_ray.run import storage
from tmars_ray.run.layout import KEEP_PARQUET
from tmars_ray.run.manifest import RunState

MAX_PLOT_ROWS = 200_000  # rows sampled for plots and gallery candidates

# Columns read for the sample (never `boxes`: polygons are read for gallery rows only).
SAMPLE_COLUMNS = (
    "uid",
    "shard",
    "key",
    "status",
    "width",
    "height",
    "n_text_boxes",
    "text_area",
    "clip_score",
    "tmars_score",
)


@dataclasses.dataclass
class Unit:
    files: list[str]  # the score part files of one shard (or one loose score file)
    rows: int | None  # from the completion record, when there is one


@dataclasses.dataclass
class Sample:
    table: pa.Table  # SAMPLE_COLUMNS present in the run + `_file`, `_row`
    files: list[str]  # part-file URLs that `_file` indexes
    total_rows: int
    note: str | None


def score_units(state: RunState) -> list[Unit]:
    """The run's score files: its completion records' parts, or - without records (scores
    copied by hand, say) - every parquet file under scores/."""
    if state.records:
        return [Unit([state.layout.path(p) for p in r.parts], r.rows) for r in state.records]
    fs, path = storage.filesystem(state.layout.scores_dir)
    if not fs.exists(path):
        return []
    return [
        Unit([storage.unstrip(fs, p)], None)
        for p in sorted(fs.find(path))
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
    ]


def _num_rows(url: str) -> int:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_sample(state: RunState, max_rows: int = MAX_PLOT_ROWS) -> Sample:
    """At most `max_rows` score rows, the same ones every time: whole score files at an even
    stride (reading part of a file costs as much as all of it), then evenly spaced rows."""
    units = score_units(state)
    rows = [u.rows if u.rows is not None else sum(_num_rows(p) for p in u.files) for u in units]
    total = sum(rows)
    chosen = list(range(len(units)))
    if total > max_rows and units:
        want = min(len(units), max(1, math.ceil(len(units) * max_rows / total)))
        chosen = sorted({int(i) for i in np.linspace(0, len(units) - 1, want).round()})
    read_rows = sum(rows[i] for i in chosen)
    rate = min(1.0, max_rows / read_rows) if read_rows else 1.0

    files: list[str] = []
    parts: list[pa.Table] = []
    seen = 0  # global row index over the chosen files, for the even row spacing
    for i in chosen:
        for url in units[i].files:
            fi = len(files)
            files.append(url)
            for batch, start in _batches(url, SAMPLE_COLUMNS):
                n = batch.num_rows
                idx = np.arange(seen, seen + n)
                seen += n
                keep = np.floor((idx + 1) * rate) > np.floor(idx * rate)
                if not keep.any():
                    continue
                t = pa.Table.from_batches([batch]).filter(pa.array(keep))
                local = np.nonzero(keep)[0] + start
                t = t.append_column("_file", pa.array(np.full(len(local), fi, np.int32)))
                parts.append(t.append_column("_row", pa.array(local.astype(np.int64))))
    table = _concat(parts)
    note = None
    if table.num_rows < total:
        note = (
            f"Plots and galleries use a deterministic sample of {table.num_rows:,} of "
            f"{total:,} score rows ({len(chosen)} of {len(units)} score files)."
        )
    return Sample(table, files, total, note)


def _batches(url: str, columns: tuple[str, ...]) -> Iterator[tuple[pa.RecordBatch, int]]:
    """(batch, index of its first row in the file) over the columns the file has."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in columns if c in pf.schema_arrow.names]
        start = 0
        for batch in pf.iter_batches(batch_size=1 << 16, columns=cols):
            yield batch, start
            start += batch.num_rows


_EMPTY = pa.schema(
    [pa.field(c, schema.SCORE_SCHEMA.field(c).type) for c in SAMPLE_COLUMNS]
    + [pa.field("_file", pa.int32()), pa.field("_row", pa.int64())]
)


def _concat(parts: list[pa.Table]) -> pa.Table:
    """One table with every SAMPLE_COLUMN (missing ones as nulls), whatever files lacked."""
    out = []
    for t in parts:
        cols = []
        for field in _EMPTY:
            if field.name in t.column_names:
                cols.append(t[field.name].cast(field.type))
            else:
                cols.append(pa.nulls(t.num_rows, field.type))
        out.append(pa.table(cols, schema=_EMPTY))
    return pa.concat_tables(out) if out else _EMPTY.empty_table()


def kept_flags(
    state: RunState, summary: dict[str, Any], uids: pa.ChunkedArray
) -> np.ndarray | None:
    """Which sampled rows are in the keep-list; None when the run has none. The keep-list is
    streamed in chunks against the (bounded) sample, never loaded whole."""
    if not summary:
        return None
    # the run's own keep/ first (a copied or moved run), else where the summary says it went
    for url in (
        state.layout.keep_file(KEEP_PARQUET),
        (summary.get("keep") or {}).get("parquet"),
    ):
        if url:
            fs, path = storage.filesystem(url)
            if fs.exists(path):
                break
    else:
        return None
    wanted = pc.unique(uids.combine_chunks().cast(pa.string()))
    matched = []
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1 << 20, columns=["uid"]):
            col = batch.column(0).cast(pa.string())
            matched.append(pc.filter(col, pc.is_in(col, value_set=wanted)))
    found = pa.concat_arrays(matched) if matched else pa.array([], pa.string())
    return pc.is_in(uids.cast(pa.string()), value_set=found).to_numpy(zero_copy_only=False)
