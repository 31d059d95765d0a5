"""Completion records and the run state: which shards are done, and which score parts are theirs.

A shard is done when a record naming it is in a manifest *segment* (`manifest/seg-*.parquet`).
The driver writes a record when the rows of the parts the workers reported add up to the
shard's sample count; records are batched into segments (one atomic write per segment, not
per shard) so a million-shard run costs a few hundred small files, listed and read in one go.
Readers read only the parts a record lists: a part left by a retried or killed task is never
counted. `RunState.load` is the only reader, once per command; it keeps the records as one
arrow table, so a resume over a million shards never holds an object per shard.

Identity: a record carries the shard's size and version (ETag on object stores, mtime on local
disk) as listed when its run started, so a shard rewritten in place is seen as changed and
scored again. First a retraction (`SHARD_STALE`, carrying the new identity) supersedes the old
record, so a crash or a failed rescore leaves the shard not done - never its old rows in force;
then the new record supersedes the retraction. Segment names are ordered (`seg-<N>-...`, N
above every segment the writer saw, whatever the clocks say); of two records of a shard URL,
the later one is the shard's record. Superseded parts are unlisted: never read, deleted by the
next cleanup (`engine.pipeline`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tmars_ray.run import storage
from tmars_ray.run.layout import RunLayout

log = logging.getLogger(__name__)

SHARD_OK = "ok"  # data.schema.SHARD_OK; repeated here so run/ stays below data/
OK = "ok"
# shard_status of a retraction: "this shard changed (the record's identity is its new one);
# every earlier record of it, in this run or another, is stale". Not a completion record.
SHARD_STALE = "stale"

SEGMENT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("shard_id", pa.string()),
        ("parts", pa.list_(pa.string())),
        ("rows", pa.int64()),
        ("fingerprint", pa.string()),
        ("shard_status", pa.string()),
        ("error", pa.string()),
        ("status_counts", pa.string()),  # JSON object status -> rows
        ("derived_uids", pa.int64()),
        # added with shard identity; segments written before lack them (read as null)
        ("shard_size", pa.int64()),
        ("shard_version", pa.string()),
        ("scored_at", pa.int64()),
    ]
)


@dataclass(slots=True)
class ShardRecord:
    shard: str  # source shard URL as read
    shard_id: str  # file-name-safe id, unique within the input
    parts: list[str]  # score part files, relative to the run folder (may be empty: no rows)
    rows: int  # rows in those parts (== samples read from the shard)
    fingerprint: str  # scoring fingerprint it was scored with
    shard_status: str = SHARD_OK  # why a shard ended early (data.schema.SHARD_*)
    error: str | None = None
    status_counts: dict[str, int] = field(default_factory=dict)
    derived_uids: int = 0  # rows whose uid was derived (no DataComp uid in the sample)
    # the shard as listed when it was scored: None in records written before identities were
    # kept (such a record is trusted as current: see `_current`)
    shard_size: int | None = None
    shard_version: str | None = None  # "etag:..." / "mtime:..." (data.sources.shard_version)
    scored_at: int | None = None  # wall-clock ns when the record was written (across runs)

    @property
    def retraction(self) -> bool:
        return self.shard_status == SHARD_STALE


def _current(
    size: int | None, version: str | None, identity: tuple[int | None, str | None] | None
) -> bool:
    """Whether a record of (size, version) was scored from the shard as it is listed now
    (`identity`). A record without identity (older tmars-ray) cannot be checked: trusted."""
    return size is None or (identity is not None and (size, version) == identity)


def shard_id_for(shard_url: str, input_root: str) -> str:
    """Stable, file-name-safe id of a shard: its path below the input root (readable, cut at
    120 characters) plus the full SHA-256 of its URL, so distinct URLs never share an id. Runs
    scored before used 8 hex digits of SHA-1; their records keep those ids and stay readable
    (ids are only compared as strings, and the two forms never coincide)."""
    rel = (
        shard_url[len(input_root) :].lstrip("/") if shard_url.startswith(input_root) else shard_url
    )
    rel = rel or posixpath.basename(shard_url)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("._") or "shard"
    digest = hashlib.sha256(shard_url.encode()).hexdigest()
    return f"{safe[:120]}-{digest}"


def _segment_seq(path: str) -> int:
    """N of a segment name `seg-<N>-...` (0 when it does not parse)."""
    head = posixpath.basename(path)[4:].split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _last_seq(segments: list[str]) -> int:
    """The highest N among these segments (0 for none)."""
    return max(map(_segment_seq, segments), default=0)


def _segment_names(fs: Any, root: str) -> list[str]:
    """Segments in write order (their N, then name)."""
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    names = [
        p for p in names if posixpath.basename(p).startswith("seg-") and p.endswith(".parquet")
    ]
    return sorted(names, key=lambda p: (_segment_seq(p), posixpath.basename(p)))


def _to_table(records: list[ShardRecord]) -> pa.Table:
    names = SEGMENT_SCHEMA.names
    cols: dict[str, list] = {name: [getattr(r, name) for r in records] for name in names}
    cols["status_counts"] = [json.dumps(c, sort_keys=True) for c in cols["status_counts"]]
    return pa.table(cols, schema=SEGMENT_SCHEMA)


def _read_segment(data: bytes) -> pa.Table:
    """A segment's records in SEGMENT_SCHEMA. A column missing from an older segment reads as
    the field's default (null where there is none). Read into the system allocator: Arrow's
    default (mimalloc) keeps the parquet decoder's freed buffers, which at 1.28M shards held
    ~0.7 GB of RSS beside the 479 MB table (BENCHMARKS, run state)."""
    import pyarrow.dataset as ds  # 0.5 s to import: paid only where segments exist

    table = (
        ds.ParquetFileFormat()
        .make_fragment(pa.BufferReader(data))
        .to_table(schema=SEGMENT_SCHEMA, memory_pool=pa.system_memory_pool())
    )
    for f in fields(ShardRecord):
        if f.default not in (MISSING, None) and table[f.name].null_count:  # only old segments
            i = table.schema.get_field_index(f.name)
            table = table.set_column(i, f.name, pc.fill_null(table[f.name], f.default))
    return table


def _from_table(table: pa.Table) -> list[ShardRecord]:
    """Records of a table in SEGMENT_SCHEMA, column by column (half the cost of row
    dicts at a million records)."""
    cols = [table.column(name).to_pylist() for name in SEGMENT_SCHEMA.names]
    names = SEGMENT_SCHEMA.names  # == the fields of ShardRecord, in order
    i_parts, i_counts = names.index("parts"), names.index("status_counts")
    cols[i_parts] = [p or [] for p in cols[i_parts]]
    cols[i_counts] = [json.loads(c or "{}") for c in cols[i_counts]]
    for name in ("fingerprint", "shard_status"):  # a few distinct values: one object each
        same: dict[Any, Any] = {}
        cols[names.index(name)] = [same.setdefault(v, v) for v in cols[names.index(name)]]
    return [ShardRecord(*row) for row in zip(*cols)]


def _sorted(records: list[ShardRecord]) -> list[ShardRecord]:
    return sorted(records, key=lambda r: r.shard_id)


def _latest(url: str, table: pa.Table) -> tuple[pa.Table, list[ShardRecord]]:
    """Of records in write order, the latest per shard URL (the table itself, not a copy,
    when every shard has one record), and the completion records they supersede. Only shards
    with more than one record (rescored, retracted, or copied by compaction: few) are
    compared record by record."""
    distinct = pc.count_distinct(table["shard"], memory_pool=pa.system_memory_pool())
    if distinct.as_py() == table.num_rows:  # lighter than group_by
        return table, []
    order = table.append_column("_i", pa.array(range(table.num_rows), pa.int64()))
    groups = order.group_by("shard").aggregate([("_i", "max"), ("_i", "count")])
    latest = table.take(groups["_i_max"])
    many = groups.filter(pc.greater(groups["_i_count"], 1))["shard"].combine_chunks()
    superseded: list[ShardRecord] = []
    last: dict[str, ShardRecord] = {}
    for rec in _from_table(table.filter(pc.is_in(table["shard"], value_set=many))):
        prev = last.get(rec.shard)
        if prev is not None and prev != rec:
            if (
                not (prev.retraction or rec.retraction)
                and (prev.shard_size, prev.shard_version) == (rec.shard_size, rec.shard_version)
            ):  # fmt: skip
                raise ValueError(
                    f"{url}: shard written twice: {rec.shard} has two different completion "
                    f"records (parts {prev.parts} and {rec.parts}) of the same content; the "
                    "run is damaged - rescore it"
                )
            if not prev.retraction:
                superseded.append(prev)
        last[rec.shard] = rec
    return latest, superseded


class RunState:
    """A run folder read once: its completion records, kept as one arrow table (`table`, in
    no particular order) - a 1.28M-shard run answers "done?" without a Python object per
    shard; the records as objects, sorted by shard id (`records`, `by_shard`), are built only
    when a reader asks for them."""

    def __init__(
        self,
        url: str,
        records: list[ShardRecord] | pa.Table,
        segments: list[str],
        superseded: list[ShardRecord] | None = None,
    ):
        """`records` in write order (retractions included): a later record of a shard URL
        supersedes an earlier one made from other shard content (another size or version: the
        shard was rewritten), or a retraction; identical copies (compaction leaves them) are
        one record; two different records of the same content mean a damaged run (refused)."""
        self.url = url
        self.layout = RunLayout(url)
        self.segments = segments
        table = records if isinstance(records, pa.Table) else _to_table(records)
        latest, replaced = _latest(url, table)
        self.superseded = list(superseded or []) + replaced  # records a newer one replaced
        stale = pc.fill_null(pc.equal(latest["shard_status"], SHARD_STALE), False)
        # retractions in force: shards that changed and are not scored again (yet)
        self._retracted = latest.filter(stale)
        self.retractions = _sorted(_from_table(self._retracted))
        # completion records (a copy only when there are retractions: few runs have them)
        self.table = latest.filter(pc.invert(stale)) if self.retractions else latest

    @classmethod
    def load(cls, url: str, readers: int = 32) -> RunState:
        """List the manifest once and read its segments concurrently."""
        fs, root = storage.filesystem(RunLayout(url).manifest_dir)
        fs.invalidate_cache(root)  # filesystem instances are cached per process: list afresh
        names = _segment_names(fs, root)

        def read(path: str) -> pa.Table:
            return _read_segment(fs.cat_file(path))

        with ThreadPoolExecutor(max(1, min(readers, len(names)))) as pool:
            chunks = list(pool.map(read, names))
        return cls(url, pa.concat_tables(chunks) if chunks else _to_table([]), names)

    def plus(self, records: list[ShardRecord], segments: list[str]) -> RunState:
        """This state with `records`, written after it in `segments`, applied."""
        return RunState(
            self.url,
            pa.concat_tables([self.current_table(), _to_table(records)]),
            self.segments + segments,
            self.superseded,
        )

    def current_table(self) -> pa.Table:
        """The records and retractions in force (what compaction keeps)."""
        return pa.concat_tables([self._retracted, self.table])

    def __bool__(self) -> bool:
        return self.table.num_rows > 0

    def __len__(self) -> int:
        return self.table.num_rows

    @cached_property
    def records(self) -> list[ShardRecord]:
        return _sorted(_from_table(self.table))

    @cached_property
    def by_shard(self) -> dict[str, ShardRecord]:
        return {r.shard: r for r in self.records}

    def shard_urls(self) -> list[str]:
        return self.table["shard"].to_pylist()

    def shard_ids(self) -> set[str]:
        return set(self.table["shard_id"].to_pylist())

    def _checked(
        self, fingerprint: str, identities: dict[str, tuple[int | None, str | None]] | None
    ) -> Iterator[tuple[int, str, bool]]:
        """(row, shard URL, current?) of the records made with this fingerprint; read in
        slices, so no column becomes a million Python objects at once."""
        step = 65_536
        for start in range(0, self.table.num_rows, step):
            part = self.table.slice(start, step)
            cols = [
                part[c].to_pylist() for c in ("fingerprint", "shard", "shard_size", "shard_version")
            ]
            for i, (fp, url, size, version) in enumerate(zip(*cols), start):
                if fp == fingerprint:
                    yield i, url, identities is None or _current(size, version, identities.get(url))

    def done(
        self, fingerprint: str, identities: dict[str, tuple[int | None, str | None]] | None = None
    ) -> set[str]:
        """URLs of shards already scored with this fingerprint; with `identities` (shard URL
        -> (size, version) as listed now), only those whose shard has not changed since
        (`_current`)."""
        return {u for _, u, current in self._checked(fingerprint, identities) if current}

    def changed(
        self, fingerprint: str, identities: dict[str, tuple[int | None, str | None]]
    ) -> list[ShardRecord]:
        """Records (this fingerprint) of listed shards rewritten since they were scored."""
        rows = [
            i for i, u, current in self._checked(fingerprint, identities)
            if not current and u in identities
        ]  # fmt: skip
        return _sorted(_from_table(self.table.take(pa.array(rows, pa.int64()))))

    def unidentified(self) -> int:
        """Records written before shard identities were kept (rewrites go unnoticed)."""
        return self.table["shard_size"].null_count

    def _value_counts(self, column: str) -> Iterator[tuple[Any, int]]:
        counts = pc.value_counts(self.table[column])
        return zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())

    def fingerprints(self) -> Counter:
        return Counter(dict(self._value_counts("fingerprint")))

    def status_counts(self) -> dict[str, int]:
        counts: Counter = Counter()
        for text, shards in self._value_counts("status_counts"):  # parsed once per distinct
            for status, rows in json.loads(text or "{}").items():
                counts[status] += rows * shards
        return dict(sorted(counts.items()))

    def failure_counts(self) -> tuple[int, int, dict[str, int]]:
        """(samples, failed samples, rows per status) over the run."""
        counts = self.status_counts()
        total = sum(counts.values())
        return total, total - counts.get(OK, 0), counts

    @property
    def derived_uids(self) -> int:
        return pc.sum(self.table["derived_uids"]).as_py() or 0

    def problems(self) -> list[dict[str, Any]]:
        """Shards that ended early (truncated, unreadable, ...)."""
        ended = self.table.filter(pc.not_equal(self.table["shard_status"], SHARD_OK))
        return [
            {"shard": r.shard, "status": r.shard_status, "error": r.error, "rows": r.rows}
            for r in _sorted(_from_table(ended))
        ]

    def listed_parts(self) -> set[str]:
        return set(pc.list_flatten(self.table["parts"]).to_pylist())


def retract(
    state: RunState,
    shards: dict[str, str],
    fingerprint: str,
    identities: dict[str, tuple[int | None, str | None]],
) -> RunState:
    """Write a retraction for each shard in `shards` (URL -> shard id) whose record, in this
    run or an earlier one, was made from content the shard no longer has; return the run
    state with them applied. From then on the shard is not done here, and no selection over
    this run reads its stale rows, whether or not scoring it again succeeds."""
    if not shards:
        return state
    # stamps the new identity
    writer = ManifestWriter(state.url, identities=identities, after=state.segments)
    added = [ShardRecord(u, i, [], 0, fingerprint, SHARD_STALE) for u, i in sorted(shards.items())]
    for record in added:
        writer.add(record)
    writer.close()
    return state.plus(added, writer.names)


def missing_samples_text(failed: list[dict[str, Any]]) -> str:
    """How many samples failed shards (summary.json `failed_shards`) may have taken with them:
    those read before the failure, and an unknown number where nothing could be counted."""
    read = sum(f.get("samples_read") or 0 for f in failed)
    unknown = sum(1 for f in failed if not f.get("samples_read"))
    if unknown == len(failed):
        return "how many samples are missing is unknown (the shards could not be counted)"
    text = f"at least {read} samples missing"
    return text + (f", plus an unknown number in {unknown} shard(s)" if unknown else "")


class ManifestWriter:
    """Driver side: batches completion records into segments (one atomic write each).

    A record is durable once its segment is written: `add` flushes every `flush_records`
    records or `flush_seconds`, `close` flushes the rest. A crash loses at most the pending
    records; their shards are scored again (their parts are unlisted, so never counted).

    `identities` (shard URL -> (size, version), as listed before reading) stamps each record
    with the shard it was scored from; every record gets `scored_at`. `after`: the folder's
    segments as this command's RunState listed them (under the lease nobody else writes), so
    the writer need not list the folder again; without it, the first flush lists it."""

    def __init__(
        self,
        url: str,
        flush_records: int = 2000,
        flush_seconds: float | None = None,
        identities: dict[str, tuple[int | None, str | None]] | None = None,
        after: list[str] | None = None,
    ):
        self.layout = RunLayout(url)
        self.identities = identities or {}
        # N of the last segment seen or written (None: not listed yet)
        self._seq: int | None = None if after is None else _last_seq(after)
        if flush_seconds is None:  # TMARS_MANIFEST_FLUSH_SECONDS=0: a segment per shard
            flush_seconds = float(os.environ.get("TMARS_MANIFEST_FLUSH_SECONDS", "2"))
        self.flush_records, self.flush_seconds = flush_records, flush_seconds
        self.pending: list[ShardRecord] = []
        self.written = 0
        self.names: list[str] = []  # segments written by this writer
        self._last = time.monotonic()

    def add(self, record: ShardRecord) -> None:
        # in place: the caller's copy (the in-memory run state) matches what is written
        if record.shard_size is None and record.shard in self.identities:
            record.shard_size, record.shard_version = self.identities[record.shard]
        if record.scored_at is None:
            record.scored_at = time.time_ns()
        self.pending.append(record)
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if len(self.pending) >= self.flush_records or (
            self.pending and time.monotonic() - self._last >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self.pending:
            return
        storage.check_fence()  # (write_bytes_atomic checks too; this names the intent)
        buf = io.BytesIO()
        pq.write_table(_to_table(self.pending), buf, compression="zstd")
        if self._seq is None:  # one listing per writer: sort after every existing segment
            fs, root = storage.filesystem(self.layout.manifest_dir)
            fs.invalidate_cache(root)
            self._seq = _last_seq(_segment_names(fs, root))
        self._seq = _next_seq(self._seq)
        name = f"seg-{self._seq:020d}-{uuid.uuid4().hex[:8]}.parquet"
        storage.write_bytes_atomic(self.layout.segment(name), buf.getvalue())
        self.names.append(self.layout.segment(name))
        self.written += len(self.pending)
        self.pending = []

    def close(self) -> None:
        self.flush()


def _next_seq(last: int) -> int:
    """A segment number above `last`: the clock in ns when it is ahead (names stay readable
    as times), else last + 1 (a clock behind an earlier driver's never reorders records)."""
    return max(time.time_ns(), last + 1)


def compact(state: RunState, min_segments: int = 64) -> None:
    """Fold many segments into one holding the current records and retractions only (written
    first, after every other segment; readers tolerate identical duplicates; superseded
    records go)."""
    if len(state.segments) < min_segments:
        return
    buf = io.BytesIO()
    pq.write_table(state.current_table(), buf, compression="zstd")
    seq = _next_seq(_last_seq(state.segments))
    name = f"seg-{seq:020d}-compact-{uuid.uuid4().hex[:8]}.parquet"
    storage.write_bytes_atomic(state.layout.segment(name), buf.getvalue())
    fs, _ = storage.filesystem(state.layout.manifest_dir)
    storage.check_fence()
    fs.rm(state.segments)
    log.info("compacted %d manifest segments into %s", len(state.segments), name)


def write_fingerprint(url: str, fingerprint: str, fields: dict[str, Any]) -> None:
    """Record what a fingerprint stands for, so a mismatch can say which field differs."""
    path = RunLayout(url).fingerprint_file(fingerprint)
    if not storage.exists(path):
        storage.write_bytes_atomic(path, json.dumps(fields, sort_keys=True, indent=1).encode())


def read_fingerprint(url: str, fingerprint: str) -> dict[str, Any] | None:
    path = RunLayout(url).fingerprint_file(fingerprint)
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
