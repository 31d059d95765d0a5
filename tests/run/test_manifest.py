"""Run state: completion records batched into segments, read back once, tolerant of identical
duplicates (compaction); a newer record of a shard supersedes an older one; shard ids never
collide; segments written before shard identities were kept stay readable."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tmars_ray.run import manifest, storage
from tmars_ray.run.manifest import ManifestWriter, RunState, ShardRecord, shard_id_for


def rec(
    i: int, parts: list[str] | None = None, fp: str = "fp", size: int | None = None
) -> ShardRecord:
    return ShardRecord(
        shard=f"s3://pool/{i:05d}.tar",
        shard_id=f"{i:05d}.tar-abc",
        parts=parts if parts is not None else [f"scores/{i:05d}.tar-abc/part-1.parquet"],
        rows=10,
        fingerprint=fp,
        status_counts={"ok": 9, "decode_error": 1},
        derived_uids=i % 2,
        shard_size=size,
        shard_version=None if size is None else f"mtime:{size}",
    )


def test_records_round_trip_through_segments(tmp_path):
    run = str(tmp_path / "run")
    w = ManifestWriter(run, flush_records=3, flush_seconds=1e9)
    for i in range(7):
        w.add(rec(i))
    assert w.written == 6  # two full segments; one record pending until close
    w.close()
    state = RunState.load(run)
    assert len(state.segments) == 3
    assert [r.shard_id for r in state.records] == [f"{i:05d}.tar-abc" for i in range(7)]
    # segments are read column by column into positional fields: the orders must agree
    assert manifest.SEGMENT_SCHEMA.names == [f.name for f in dataclasses.fields(ShardRecord)]
    assert state.records[2].scored_at is not None  # stamped by the writer
    assert dataclasses.replace(state.records[2], scored_at=None) == rec(2)
    assert state.failure_counts() == (70, 7, {"decode_error": 7, "ok": 63})
    assert state.derived_uids == 3
    assert set(state.done("fp")) == {f"s3://pool/{i:05d}.tar" for i in range(7)}
    assert state.done("other") == set()


def test_the_run_state_answers_from_its_table_without_building_records(tmp_path):
    """Resume at 1.28M shards must not build an object per shard: "done?", changed shards,
    counts and the shard ids come from the arrow table; the records as objects are built only
    when asked for, sorted by shard id whatever order the segments hold them in."""
    run = str(tmp_path / "run")
    w = ManifestWriter(run, flush_records=2, flush_seconds=1e9)
    for i in (5, 3, 9, 1, 7):  # written out of shard order
        w.add(rec(i, size=i))
    w.add(dataclasses.replace(rec(4, size=4), shard_status="truncated", error="cut short"))
    w.close()
    now = {f"s3://pool/{i:05d}.tar": (i, f"mtime:{i}") for i in (1, 3, 4, 5, 7)}
    now["s3://pool/00009.tar"] = (10, "mtime:10")  # rewritten since
    state = RunState.load(run)
    assert state.done("fp", now) == {f"s3://pool/{i:05d}.tar" for i in (1, 3, 4, 5, 7)}
    assert [r.shard for r in state.changed("fp", now)] == ["s3://pool/00009.tar"]
    # six shards with the same JSON counts: parsed once, counted six times
    assert state.failure_counts() == (60, 6, {"decode_error": 6, "ok": 54})
    assert state.fingerprints() == {"fp": 6} and len(state) == 6 and state.derived_uids == 5
    assert state.problems() == [
        {"shard": "s3://pool/00004.tar", "status": "truncated", "error": "cut short", "rows": 10}
    ]
    assert state.shard_ids() == {f"{i:05d}.tar-abc" for i in (1, 3, 4, 5, 7, 9)}
    assert "records" not in vars(state)  # nothing above built the record objects
    assert [r.shard_id for r in state.records] == sorted(state.shard_ids())


def test_compaction_keeps_every_record_once(tmp_path):
    run = str(tmp_path / "run")
    w = ManifestWriter(run, flush_records=1)
    for i in range(5):
        w.add(rec(i))
    state = RunState.load(run)
    manifest.compact(state, min_segments=2)
    after = RunState.load(run)
    assert len(after.segments) == 1 and after.records == state.records


def test_newer_record_supersedes_older_one(tmp_path):
    run = str(tmp_path / "run")
    ManifestWriter(run, flush_seconds=1e9).add(rec(1))  # pending only: never written
    w = ManifestWriter(run)
    w.add(rec(1))
    w.add(rec(2))
    w.close()
    w = ManifestWriter(run)  # the shard was rewritten (other size) and scored again
    w.add(rec(1, parts=["scores/00001.tar-abc/part-2.parquet"], size=7))
    w.close()
    state = RunState.load(run)
    assert [r.shard_id for r in state.records] == ["00001.tar-abc", "00002.tar-abc"]
    assert state.by_shard["s3://pool/00001.tar"].parts == ["scores/00001.tar-abc/part-2.parquet"]
    assert [r.parts for r in state.superseded] == [["scores/00001.tar-abc/part-1.parquet"]]
    assert state.listed_parts() == {
        "scores/00001.tar-abc/part-2.parquet",
        "scores/00002.tar-abc/part-1.parquet",
    }
    # compaction keeps only the current record
    manifest.compact(state, min_segments=2)
    after = RunState.load(run)
    assert after.records == state.records and after.superseded == []


def test_conflicting_records_of_the_same_content_are_refused(tmp_path):
    run = str(tmp_path / "run")
    for parts in (None, ["scores/other.parquet"]):
        w = ManifestWriter(run)
        w.add(rec(1, parts=parts, size=7))
        w.close()
    with pytest.raises(ValueError, match="two different completion records"):
        RunState.load(run)


def test_retraction_undoes_a_stale_record_until_it_is_scored_again(tmp_path):
    run = str(tmp_path / "run")
    w = ManifestWriter(run)
    for i in (1, 2):
        w.add(rec(i, size=5))
    w.close()
    now = {"s3://pool/00001.tar": (6, "mtime:6"), "s3://pool/00002.tar": (5, "mtime:5")}
    state = RunState.load(run)
    assert [r.shard for r in state.changed("fp", now)] == ["s3://pool/00001.tar"]
    state = manifest.retract(state, {"s3://pool/00001.tar": "00001.tar-abc"}, "fp", now)
    for st in (state, RunState.load(run)):  # in memory as on disk
        assert set(st.done("fp", now)) == {"s3://pool/00002.tar"}
        assert [r.shard for r in st.records] == ["s3://pool/00002.tar"]
        assert [(r.shard, r.shard_size) for r in st.retractions] == [("s3://pool/00001.tar", 6)]
        assert [r.parts for r in st.superseded] == [["scores/00001.tar-abc/part-1.parquet"]]
        assert st.listed_parts() == {"scores/00002.tar-abc/part-1.parquet"}
    manifest.compact(RunState.load(run), min_segments=1)  # the retraction survives compaction
    assert [r.shard for r in RunState.load(run).retractions] == ["s3://pool/00001.tar"]
    # scored again: the new record (the retraction's identity) replaces the retraction
    w = ManifestWriter(run, identities=now)
    w.add(rec(1, parts=["scores/00001.tar-abc/part-3.parquet"]))
    w.close()
    state = RunState.load(run)
    assert set(state.done("fp", now)) == set(now) and state.retractions == []


def test_segment_order_does_not_follow_the_clock(tmp_path):
    """A driver whose clock is behind the one that wrote the old record (another machine)
    still writes segments that sort after it: its record wins."""
    run = str(tmp_path / "run")
    future = os.path.join(run, "manifest", f"seg-{9 * 10**19:020d}-ffffffff.parquet")
    os.makedirs(os.path.dirname(future))
    buf = io.BytesIO()
    pq.write_table(manifest._to_table([rec(1)]), buf)
    storage.write_bytes_atomic(future, buf.getvalue())
    w = ManifestWriter(run)
    w.add(rec(1, parts=["scores/00001.tar-abc/new.parquet"], size=7))
    w.close()
    assert manifest._segment_seq(w.names[0]) == 9 * 10**19 + 1
    state = RunState.load(run)
    assert state.by_shard["s3://pool/00001.tar"].parts == ["scores/00001.tar-abc/new.parquet"]


def test_identity_decides_done(tmp_path):
    run = str(tmp_path / "run")
    w = ManifestWriter(run, identities={"s3://pool/00001.tar": (100, 'etag:"a"')})
    w.add(rec(1))
    w.add(rec(2))  # not in identities: written without
    w.close()
    state = RunState.load(run)
    r1 = state.by_shard["s3://pool/00001.tar"]
    assert (r1.shard_size, r1.shard_version) == (100, 'etag:"a"')
    same = {"s3://pool/00001.tar": (100, 'etag:"a"'), "s3://pool/00002.tar": (5, None)}
    assert set(state.done("fp", same)) == {"s3://pool/00001.tar", "s3://pool/00002.tar"}
    for rewritten in ((100, 'etag:"b"'), (101, 'etag:"a"'), None):
        ids = {**same, "s3://pool/00001.tar": rewritten}
        assert set(state.done("fp", ids)) == {"s3://pool/00002.tar"}
        assert [r.shard for r in state.changed("fp", ids)] == ["s3://pool/00001.tar"]
    assert state.unidentified() == 1  # record 2 cannot be checked: trusted, and counted


def _write_first_segment(run: str, table: pa.Table) -> None:
    """`table` as the run's first segment, whatever its schema (an older version's)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path = os.path.join(run, "manifest", f"seg-{1:020d}-00000000.parquet")
    os.makedirs(os.path.dirname(path))
    storage.write_bytes_atomic(path, buf.getvalue())


def test_segments_written_before_identities_stay_readable(tmp_path):
    """A segment with the schema of earlier versions (no identity columns, old 8-hex ids)."""
    run = str(tmp_path / "run")
    old_schema = pa.schema([f for f in manifest.SEGMENT_SCHEMA if f.name not in (
        "shard_size", "shard_version", "scored_at")])  # fmt: skip
    table = manifest._to_table([rec(1)]).select(old_schema.names).cast(old_schema)
    _write_first_segment(run, table)
    state = RunState.load(run)
    assert state.records == [rec(1)] and state.unidentified() == 1
    assert set(state.done("fp", {"s3://pool/00001.tar": (1, "mtime:1")})) == {"s3://pool/00001.tar"}


def test_a_column_an_older_segment_lacks_reads_as_its_default(tmp_path):
    run = str(tmp_path / "run")
    table = manifest._to_table([rec(1)]).drop_columns(["shard_status", "derived_uids"])
    _write_first_segment(run, table)
    assert RunState.load(run).records == [dataclasses.replace(rec(1), derived_uids=0)]


def test_segments_are_read_into_the_system_allocator(tmp_path):
    """Arrow's default pool (mimalloc) keeps the parquet decoder's freed buffers: at 1.28M
    shards that was ~0.7 GB of RSS beside the table. The state's table must live in the
    system allocator, and loading must leave (next to) nothing in the default pool."""
    run = str(tmp_path / "run")
    w = ManifestWriter(run, flush_records=500, flush_seconds=1e9)
    for i in range(2000):
        w.add(rec(i, size=i))
    w.close()
    system, default = pa.system_memory_pool(), pa.default_memory_pool()
    before = system.bytes_allocated(), default.bytes_allocated()
    state = RunState.load(run)
    assert system.bytes_allocated() - before[0] >= state.table.nbytes > 100_000
    assert default.bytes_allocated() - before[1] < state.table.nbytes // 10


def test_shard_ids_are_readable_and_collision_free():
    root = "s3://pool"
    # two URLs whose ids collided before: same sanitised 120-character prefix, same sha1[:8]
    a, b = (f"{root}/{'a' * 130}/{n}.tar" for n in (66646, 187754))
    assert hashlib.sha1(a.encode()).digest()[:4] == hashlib.sha1(b.encode()).digest()[:4]
    ida, idb = shard_id_for(a, root), shard_id_for(b, root)
    assert ida != idb
    assert ida == f"{'a' * 120}-{hashlib.sha256(a.encode()).hexdigest()}"
    # sanitised names that collide ("/" and "_" both become "_") are told apart by the digest
    x, y = shard_id_for(f"{root}/d/00001.tar", root), shard_id_for(f"{root}/d_00001.tar", root)
    assert x.startswith("d_00001.tar-") and y.startswith("d_00001.tar-") and x != y


def test_missing_run_folder_is_an_empty_state(tmp_path):
    state = RunState.load(str(tmp_path / "nothing"))
    assert not state and state.records == [] and state.failure_counts() == (0, 0, {})


def test_segments_in_s3(s3_env):
    s3_env.create_bucket("tmars-manifest")
    run = "s3://tmars-manifest/run"
    w = ManifestWriter(run, flush_records=50, flush_seconds=1e9)
    for i in range(120):
        w.add(rec(i))
    w.close()
    state = RunState.load(run)
    assert len(state.records) == 120 and len(state.segments) == 3
    assert storage.exists(
        state.segments[0] if "://" in state.segments[0] else "s3://" + state.segments[0]
    )
