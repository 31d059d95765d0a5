"""Score parts are written by the workers; the driver only adds up small completion records.

`write_parts` is the pipeline's last stage (CPU tasks): for each shard in its batch it writes
one part file `scores/<shard_id>/part-<uuid>.parquet` and returns one record row (shard, rows,
part, status counts); a shard's `end` row becomes an `end` record with the sample count.
`ShardTracker` (driver) adds the records up and, when a shard's rows equal its sample count,
hands a ShardRecord listing exactly those parts to the ManifestWriter. Parts written by a task
that was retried or killed are never reported, hence never listed, hence never read.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tmars_ray.data import schema
from tmars_ray.run import storage
from tmars_ray.run.driverlog import stage
from tmars_ray.run.layout import RunLayout
from tmars_ray.run.manifest import ManifestWriter, ShardRecord

log = logging.getLogger(__name__)

RECORD_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "part" or "end"
        ("shard", pa.string()),
        ("shard_id", pa.string()),
        ("part", pa.string()),  # relative to the run folder
        ("rows", pa.int64()),
        ("derived_uids", pa.int64()),
        ("status_counts", pa.string()),  # JSON
        ("n_samples", pa.int64()),
        ("shard_status", pa.string()),
        ("error", pa.string()),
    ]
)
_NULL_UNLESS_OK = ("n_text_boxes", "text_area", "boxes")
# statuses of samples whose image was decoded (the others never reached a decoder)
_DECODED = pa.array(
    [schema.OK, schema.DETECT_ERROR, schema.SCORE_ERROR, schema.OOM, schema.WORKER_CRASH]
)


def score_table(rows: pa.Table, table_schema: pa.Schema) -> pa.Table:
    """Sample rows of one shard -> the score table's columns and types, in shard order.
    Scores and boxes are null unless the sample is ok; sizes are null when never decoded."""
    t = rows.sort_by("idx")
    ok = pc.equal(t["status"], schema.OK)
    cols = {}
    for f in table_schema:
        col = t[f.name] if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
        if f.name in _NULL_UNLESS_OK or "score" in f.name:
            col = pc.if_else(ok, col.cast(f.type), pa.scalar(None, f.type))
        elif f.name in ("width", "height"):  # sizes of images that were decoded
            known = pc.and_(pc.greater(col, 0), pc.is_in(t["status"], _DECODED))
            col = pc.if_else(known, col.cast(f.type), pa.scalar(None, f.type))
        elif f.name == "derived_uid":
            col = pc.fill_null(col.cast(f.type), False)
        cols[f.name] = col.cast(f.type)
    return pa.table(cols, schema=table_schema)


# Test-only fault injection: the first writer task to see this marker path missing creates it
# and aborts its process right after writing a part (a task killed mid-write).
CRASH_ONCE_ENV = "TMARS_TEST_WRITER_CRASH_ONCE"


def write_parts(
    batch: pa.Table, run: str, optional: list[str], crash_once: str | None = None
) -> pa.Table:
    """Ray Data batch function: write this batch's score rows as one part per shard; return
    one small record per part and per end row."""
    layout = RunLayout(run)
    table_schema = schema.table_schema(optional)
    out: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}

    def emit(**kw: Any) -> None:
        for name in out:
            out[name].append(kw.get(name))

    is_end = pc.equal(batch["kind"], "end")
    for end in (
        batch.filter(is_end)
        .select(["shard", "shard_id", "n_samples", "shard_status", "error"])
        .to_pylist()
    ):
        emit(kind="end", rows=0, derived_uids=0, status_counts="{}", **end)
    samples = batch.filter(pc.invert(is_end))
    if samples.num_rows:
        for shard_id in pc.unique(samples["shard_id"]).to_pylist():
            rows = samples.filter(pc.equal(samples["shard_id"], shard_id))
            table = score_table(rows, table_schema)
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            rel = layout.rel_part(shard_id, f"part-{uuid.uuid4().hex}.parquet")
            with stage("writing parts", f"{rows['shard'][0].as_py()} (part {rel})"):
                storage.write_bytes_atomic(layout.path(rel), buf.getvalue())
            if crash_once:
                _crash_once(crash_once)
            status, counts = np.unique(
                table["status"].to_numpy(zero_copy_only=False), return_counts=True
            )
            emit(
                kind="part",
                shard=rows["shard"][0].as_py(),
                shard_id=shard_id,
                part=rel,
                rows=table.num_rows,
                derived_uids=int(pc.sum(table["derived_uid"].cast(pa.int64())).as_py() or 0),
                status_counts=json.dumps({str(s): int(c) for s, c in zip(status, counts)}),
                n_samples=-1,
                shard_status="",
                error="",
            )
    return pa.table(out, schema=RECORD_SCHEMA)


def _crash_once(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    log.error("test fault injection: writer aborts after writing a part")
    os.abort()


@dataclass
class _Shard:
    parts: list[str] = field(default_factory=list)
    rows: int = 0
    derived: int = 0
    counts: Counter = field(default_factory=Counter)
    end: dict[str, Any] | None = None


class ShardTracker:
    """Driver side: adds up part records per shard; a complete shard becomes a ShardRecord."""

    def __init__(self, manifest: ManifestWriter, fingerprint: str, shards: dict[str, str]):
        self.manifest, self.fingerprint = manifest, fingerprint
        self.shard_of = shards  # shard_id -> shard URL, for the shards of this invocation
        self.open: dict[str, _Shard] = {}
        self.done: list[ShardRecord] = []
        self.failed: list[dict[str, Any]] = []  # shards that could not be read: never done
        self.samples = 0
        self.rows_by_status: Counter = Counter()  # every row written so far, done shard or not
        self.start = self.last_log = time.monotonic()

    def add(self, records: pa.Table) -> None:
        for r in records.to_pylist():
            s = self.open.setdefault(r["shard_id"], _Shard())
            if r["kind"] == "end":
                s.end = r
            else:
                s.parts.append(r["part"])
                s.rows += r["rows"]
                s.derived += r["derived_uids"]
                counts = json.loads(r["status_counts"])
                s.counts.update(counts)
                self.rows_by_status.update(counts)
            self._maybe_finish(r["shard_id"], s)
        self.manifest.maybe_flush()
        self._progress()

    def _maybe_finish(self, shard_id: str, s: _Shard) -> None:
        if s.end is None or s.rows < s.end["n_samples"]:
            return
        shard = self.shard_of.get(shard_id, s.end["shard"])
        if s.rows > s.end["n_samples"]:
            raise RuntimeError(
                f"shard {shard}: {s.rows} score rows for {s.end['n_samples']} samples"
            )
        del self.open[shard_id]
        if s.end["shard_status"] in schema.SHARD_FAILED:
            self._fail(shard, shard_id, s)
            return
        record = ShardRecord(
            shard=shard,
            shard_id=shard_id,
            parts=sorted(s.parts),
            rows=s.rows,
            fingerprint=self.fingerprint,
            shard_status=s.end["shard_status"] or schema.SHARD_OK,
            error=s.end["error"] or None,
            status_counts=dict(sorted(s.counts.items())),
            derived_uids=s.derived,
        )
        self.manifest.add(record)
        self.done.append(record)
        self.samples += record.rows
        if record.shard_status != schema.SHARD_OK:
            log.warning("shard %s: %s %s", record.shard, record.shard_status, record.error or "")

    def _fail(self, shard: str, shard_id: str, s: _Shard) -> None:
        """No completion record: its parts stay unlisted (discarded by the next run, which
        reads the shard again). Rows read before the failure are not samples we can vouch
        for, so the count of lost samples is at least what was read, often unknown."""
        status, error = s.end["shard_status"], s.end["error"] or ""
        self.failed.append(
            {
                "shard": shard,
                "shard_id": shard_id,
                "reason": f"{status}: {error}" if error else status,
                "status": status,
                "samples_read": s.rows,
            }
        )
        log.error("FAILED shard %s: %s %s (not recorded as done)", shard, status, error)

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_log >= 10:
            self.last_log = now
            by_status = ", ".join(f"{k} {v}" for k, v in self.rows_by_status.most_common())
            log.info(
                "scored %d/%d shards, %d samples (%.1f samples/s)%s",
                len(self.done),
                len(self.shard_of),
                self.samples,
                self.samples / max(now - self.start, 1e-9),
                f"; rows so far: {by_status}" if by_status else "",
            )

    def finish(self) -> None:
        self.manifest.close()
        self._progress(force=True)

    def unfinished(self) -> list[str]:
        done = {r.shard_id for r in self.done} | {f["shard_id"] for f in self.failed}
        return [url for sid, url in self.shard_of.items() if sid not in done]
