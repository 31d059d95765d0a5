"""The scan (map): a group of score files -> uid-sorted runs of packed records, plus counts.

A pure function of its task, so it maps over threads (single node) or Ray tasks (cluster).
It reads only uid, status, derived_uid (when the table has it) and the method's columns,
batch by batch; every row becomes one record (records.py); every `run_rows` rows are sorted
by uid (stable: equal uids keep their file order, which decides duplicates later).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tmars_ray.data import schema
from tmars_ray.run import storage
from tmars_ray.selection import keys as K
from tmars_ray.selection import records as R
from tmars_ray.selection.methods import Method, valid_mask
from tmars_ray.selection.sources import ScoreUnit

RUN_ROWS = 1 << 20  # rows per sorted run (bounds scan memory)
DERIVED_COLUMN = "derived_uid"


@dataclass(frozen=True)
class ScanTask:
    units: tuple[ScoreUnit, ...]
    method: Method
    options: Mapping[str, Any] = field(default_factory=dict)  # method options
    out_dir: str = ""  # local folder for this task's runs (file runs only)
    run_rows: int = 0  # 0: RUN_ROWS


@dataclass
class ScanResult:
    runs: list[Any]  # RecordFile (single node) or per-partition slices (cluster)
    rows: int
    status: dict[str, int]
    derived_rows: int = 0
    dtypes: list[np.dtype] = field(default_factory=list)


def status_ok(batch: pa.RecordBatch, counts: Counter) -> np.ndarray:
    """ok mask of a batch; adds the batch's rows per status to `counts`."""
    status = batch.column("status")
    if not pa.types.is_dictionary(status.type):
        status = status.dictionary_encode()
    names = status.dictionary.to_pylist()
    ok_index = names.index(schema.OK) if schema.OK in names else -1
    indices = status.indices
    itype = np.dtype(indices.type.to_pandas_dtype())
    idx = np.frombuffer(
        indices.buffers()[1], itype, count=len(indices), offset=indices.offset * itype.itemsize
    ).astype(np.int64)
    valid = valid_mask(indices)
    if valid is not None:
        idx = np.where(valid, idx, len(names))
        names = [*names, "<null>"]
    for name, n in zip(names, np.bincount(idx, minlength=len(names))):
        if n:
            counts[name] += int(n)
    return idx == ok_index


def _derived(arr: pa.Array) -> np.ndarray | None:
    """The derived_uid flags of a batch, or None when no row's uid was derived (nulls: not
    derived)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    bits = np.frombuffer(arr.buffers()[1], np.uint8)
    flags = np.unpackbits(bits, bitorder="little")[arr.offset : arr.offset + n].astype(bool)
    valid = valid_mask(arr)
    if valid is not None:
        flags &= valid
    return flags if flags.any() else None


def _check_columns(url: str, names: Sequence[str], method: Method) -> None:
    missing = [c for c in ("uid", "status", *method.columns) if c not in names]
    if missing:
        raise ValueError(
            f"{url}: score table lacks column(s) {', '.join(missing)}{method.missing_hint()}"
        )


def scan_runs(task: ScanTask, emit: Callable[[np.ndarray], None]) -> ScanResult:
    """Read the task's files and hand every uid-sorted run to `emit` (valid only during the
    call: it lives in a reused buffer). Returns the counts (runs left empty)."""
    method = task.method
    run_rows = task.run_rows or RUN_ROWS
    status: Counter = Counter()
    pending: list[np.ndarray] = []
    pending_rows = 0
    rows = derived_rows = 0
    dtypes: list[np.dtype] = []
    scratch = R.Scratch()

    def flush() -> None:
        nonlocal pending, pending_rows
        parts = pending
        target = R.common_dtype([p.dtype for p in parts])
        parts = [R.convert(p, target) for p in parts]
        n = sum(len(p) for p in parts)
        rec = np.concatenate(parts, out=scratch.get("cat", target, n))
        order = K.order(R.rec_keys(rec))
        rec = R.take(rec, order, out=scratch.get("sorted", target, n))
        dtypes.append(target)
        emit(rec)
        pending, pending_rows = [], 0

    # batches well below run_rows keep the per-batch temporaries small (page-fault cost)
    batch_rows = max(1, min(run_rows, 1 << 18))
    fetched = _prefetch([u for unit in task.units for u in unit.urls if storage.is_remote(u)])
    for unit in task.units:
        unit_rows = 0
        for url in unit.urls:
            source = None
            try:
                source = io.BytesIO(next(fetched)) if storage.is_remote(url) else url
                pf = pq.ParquetFile(source, read_dictionary=["status"])
                names = pf.schema_arrow.names
                _check_columns(url, names, method)
                columns = ["uid", "status", *method.columns]
                if DERIVED_COLUMN in names:
                    columns.append(DERIVED_COLUMN)
                for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                    ok = status_ok(batch, status)
                    skey = R.row_skeys(ok, method.score_fn(batch, task.options))
                    try:
                        keys = K.encode_uids(batch.column("uid"))
                    except ValueError as e:
                        raise ValueError(f"{url}: {e}") from None
                    derived = None
                    if DERIVED_COLUMN in names:
                        derived = _derived(batch.column(DERIVED_COLUMN))
                        if derived is not None:
                            derived_rows += int(derived.sum())
                    pending.append(R.make_records(keys, skey, derived))
                    pending_rows += batch.num_rows
                    unit_rows += batch.num_rows
                    if pending_rows >= run_rows:
                        flush()
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{unit.check or url}: score part {url} is missing; the run is damaged - "
                    "rescore that shard"
                ) from None
            finally:
                if isinstance(source, io.BytesIO):
                    source.close()
        if unit.check is not None and unit_rows != unit.rows:
            raise ValueError(
                f"{unit.check}: its parts hold {unit_rows} rows but the manifest records "
                f"{unit.rows}; the run is damaged - rescore that shard"
            )
        rows += unit_rows
    if pending_rows:
        flush()
    return ScanResult([], rows, dict(status), derived_rows, dtypes)


def _prefetch(urls: list[str], threads: int = 16):
    """The bytes of object-store files, in order, fetched concurrently (score parts are small
    and a task's files hold at most RUN_ROWS rows: one GET after another would dominate)."""
    if not urls:
        return iter(())
    pool = ThreadPoolExecutor(min(threads, len(urls)))
    results = pool.map(storage.read_bytes, urls)
    pool.shutdown(wait=False)
    return results


def scan(task: ScanTask) -> ScanResult:
    """Single node: runs go to temp files under `task.out_dir`."""
    files: list[R.RecordFile] = []

    def emit(rec: np.ndarray) -> None:
        w = R.RecordWriter(os.path.join(task.out_dir, f"run-{len(files):05d}.bin"))
        w.write(rec)
        files.append(w.close())

    result = scan_runs(task, emit)
    result.runs = files
    return result


def split_points(rec: np.ndarray, bounds: K.Keys | None) -> list[int]:
    """Cut positions of a uid-sorted run at inclusive upper `bounds` (sorted key columns, one
    per partition but the last): partition p gets [cut[p], cut[p+1])."""
    n = len(rec)
    if bounds is None or len(bounds[0]) == 0:
        return [0, n]
    keys, bnd = K.unify([R.rec_keys(rec), bounds])
    if not K.is_hex(keys):
        keys = (np.ascontiguousarray(keys[0]),)
    cuts = [K.count_le(keys, K.take(bnd, slice(j, j + 1))) for j in range(len(bnd[0]))]
    return [0, *cuts, n]


def scan_partitioned(task: ScanTask, bounds: K.Keys | None) -> ScanResult:
    """Cluster: every run is cut into uid-range partitions; `runs[p]` is the list of partition
    p's slices (one per run, in run order), each a fresh uid-sorted array."""
    parts = 1 + (0 if bounds is None else len(bounds[0]))
    slices: list[list[np.ndarray]] = [[] for _ in range(parts)]

    def emit(rec: np.ndarray) -> None:
        cuts = split_points(rec, bounds)
        for p in range(parts):
            if cuts[p + 1] > cuts[p]:
                slices[p].append(rec[cuts[p] : cuts[p + 1]].copy())

    result = scan_runs(task, emit)
    result.runs = slices
    return result
