"""Score sources -> the score files to read, in the order that decides duplicate uids.

A *run* (given as a loaded `RunState`, or a folder with manifest/ or scores/, loaded once here
with `RunState.load`) contributes exactly the parts its completion records list, shards in
shard-id order, parts in listed order. Files under scores/ that no record lists are partial
output of an interrupted or retried task: ignored and counted. Within a run, a rescored shard's
newest record is its record (`RunState`). Across runs, two records of one source shard are an
error unless the shard was rewritten in between (both record its identity, and they differ):
then the record scored last (`scored_at`) is read and the other is not. Anything else is a
parquet file, a folder of them (recursive), or a glob, in path order.

Row counts: a run's files are planned by their records' row counts (no per-file metadata
reads: one GET per shard would dominate at a million shards); the scan checks every shard's
rows against its record as it reads them.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from tmars_ray.run import storage
from tmars_ray.run.layout import MANIFEST_DIR, SCORES_DIR
from tmars_ray.run.manifest import RunState, ShardRecord

log = logging.getLogger(__name__)

Source = str | RunState
PARTIAL_SAMPLE = 100  # partial files named in the summary (all are counted)


@dataclass(frozen=True)
class ScoreUnit:
    """Score files read together: a run's shard (its listed parts) or one plain file."""

    urls: tuple[str, ...]
    rows: int
    # a run's shard ("shard S (run R, record I)"): the scan checks that its parts hold `rows`
    check: str | None = None


@dataclass
class Sources:
    units: list[ScoreUnit] = field(default_factory=list)
    ignored_partial: list[str] = field(default_factory=list)  # first PARTIAL_SAMPLE
    ignored_partial_count: int = 0
    shard_status: Counter = field(default_factory=Counter)
    fingerprints: Counter = field(default_factory=Counter)
    shards: int = 0
    names: list[str] = field(default_factory=list)  # each source as given (for the summary)
    runs: list[RunState] = field(default_factory=list)  # the run sources, in order
    superseded: int = 0  # records of rewritten shards that a later run's record replaced


def _is_run(fs: Any, path: str) -> bool:
    return fs.isdir(path) and (
        fs.isdir(posixpath.join(path, MANIFEST_DIR)) or fs.isdir(posixpath.join(path, SCORES_DIR))
    )


def _parquet_files(fs: Any, path: str) -> list[str]:
    return sorted(
        p
        for p in fs.find(path)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
    )


def resolve_sources(sources: list[Source]) -> Sources:
    out = Sources()
    seen_shards: dict[str, _Seen] = {}
    dropped: set[int] = set()
    for source in sources:
        if isinstance(source, RunState):
            out.names.append(source.url)
            _resolve_run(source, out, seen_shards, dropped)
            continue
        out.names.append(source)
        fs, path = storage.filesystem(source)
        if _is_run(fs, path):
            _resolve_run(RunState.load(source), out, seen_shards, dropped)
            continue
        if any(c in path for c in "*?["):
            paths = sorted(p for p in fs.glob(path) if p.endswith(".parquet"))
        elif fs.isdir(path):
            paths = _parquet_files(fs, path)
        elif fs.exists(path):
            paths = [path]
        else:
            raise FileNotFoundError(f"score source {source} does not exist")
        for p in paths:
            with fs.open(p, "rb") as f:
                rows = pq.ParquetFile(f).metadata.num_rows
            out.units.append(ScoreUnit((storage.unstrip(fs, p),), rows))
    if dropped:  # units of records a later run's record superseded
        out.units = [u for i, u in enumerate(out.units) if i not in dropped]
    return out


@dataclass
class _Seen:
    where: str
    rec: ShardRecord
    unit: int | None  # index of its ScoreUnit in Sources.units (None: no parts)


def _newer(rec: ShardRecord, other: ShardRecord) -> bool | None:
    """Whether `rec` supersedes `other` (records of one shard in two runs). Only a rewritten
    shard - both record its identity, and they differ - is ordered, by `scored_at`; a
    retraction (the shard changed, not scored again there) loses to a record of the content
    it names and hides older others. None when they cannot be ordered (the same shard scored
    twice: an error)."""
    if rec.retraction and other.retraction:
        return False  # both hide the shard: either will do
    if rec.retraction != other.retraction:
        same = (rec.shard_size, rec.shard_version) == (other.shard_size, other.shard_version)
        if same:
            return other.retraction
    elif (rec.shard_size, rec.shard_version) == (other.shard_size, other.shard_version):
        return None
    if None in (rec.shard_size, other.shard_size, rec.scored_at, other.scored_at):
        return None
    return rec.scored_at > other.scored_at


def _uncount(out: Sources, rec: ShardRecord) -> None:
    out.shards -= 1
    for counter, key in ((out.shard_status, rec.shard_status), (out.fingerprints, rec.fingerprint)):
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]


def _resolve_run(state: RunState, out: Sources, seen: dict[str, _Seen], dropped: set[int]) -> None:
    out.runs.append(state)
    listed: set[str] = set()
    # retractions first: a shard this run retracted (changed since an earlier run scored it)
    # hides that run's stale rows, and is not itself a shard with rows
    for rec in [*state.retractions, *state.records]:
        where = f"{state.url} (record {rec.shard_id})"
        prev = seen.get(rec.shard)
        if prev is not None:
            newer = _newer(rec, prev.rec)
            if newer is None:
                raise ValueError(
                    f"shard written twice: {rec.shard} has completion records {prev.where} "
                    f"and {where}; remove one of them (or the duplicate run) and select again"
                )
            out.superseded += 1
            if not newer:  # this run scored the shard before it was rewritten: not read
                listed.update(rel.strip("/") for rel in rec.parts)
                continue
            if not prev.rec.retraction:
                _uncount(out, prev.rec)
            if prev.unit is not None:
                dropped.add(prev.unit)
        seen[rec.shard] = _Seen(where, rec, len(out.units) if rec.parts else None)
        if rec.retraction:
            continue
        out.shards += 1
        out.shard_status[rec.shard_status] += 1
        out.fingerprints[rec.fingerprint] += 1
        if not rec.parts:
            if rec.rows:
                raise ValueError(
                    f"{where}: shard {rec.shard} records {rec.rows} rows but lists no parts; "
                    "the run is damaged - rescore that shard"
                )
            continue
        listed.update(rel.strip("/") for rel in rec.parts)
        urls = tuple(state.layout.path(rel) for rel in rec.parts)
        out.units.append(ScoreUnit(urls, rec.rows, f"shard {rec.shard} ({where})"))
    _count_partial(state, listed, out)


def _count_partial(state: RunState, listed: set[str], out: Sources) -> None:
    """One recursive listing of scores/: every file no record lists is partial output."""
    fs, root = storage.filesystem(state.layout.scores_dir)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return
    base = storage.filesystem(state.url)[1].rstrip("/")
    partial = [p for p in sorted(found) if p[len(base) :].strip("/") not in listed]
    if partial:
        log.warning(
            "%s: ignoring %d score file(s) that no completion record lists (partial output)",
            state.url,
            len(partial),
        )
    out.ignored_partial_count += len(partial)
    room = PARTIAL_SAMPLE - len(out.ignored_partial)
    out.ignored_partial.extend(storage.unstrip(fs, p) for p in partial[: max(0, room)])


def plan_groups(units: list[ScoreUnit], rows: int) -> list[tuple[ScoreUnit, ...]]:
    """Contiguous groups of units of about `rows` rows (order kept: it decides duplicates; a
    shard's parts stay together so its row count is checked in one place)."""
    groups: list[tuple[ScoreUnit, ...]] = []
    cur: list[ScoreUnit] = []
    n = 0
    for u in units:
        cur.append(u)
        n += u.rows
        if n >= rows:
            groups.append(tuple(cur))
            cur, n = [], 0
    if cur:
        groups.append(tuple(cur))
    return groups
