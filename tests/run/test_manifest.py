"""Run state: completion records batched into segments, read back once, tolerant of identical
duplicates (compaction), loud on conflicting ones."""

from __future__ import annotations

import pytest

from tmars_ray.run import manifest, storage
from tmars_ray.run.manifest import ManifestWriter, RunState, ShardRecord


def rec(i: int, parts: list[str] | None = None, fp: str = "fp") -> ShardRecord:
    return ShardRecord(
        shard=f"s3://pool/{i:05d}.tar",
        shard_id=f"{i:05d}.tar-abc",
        parts=parts if parts is not None else [f"scores/{i:05d}.tar-abc/part-1.parquet"],
        rows=10,
        fingerprint=fp,
        status_counts={"ok": 9, "decode_error": 1},
        derived_uids=i % 2,
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
    assert state.records[2] == rec(2)
    assert state.failure_counts() == (70, 7, {"decode_error": 7, "ok": 63})
    assert state.derived_uids == 3
    assert set(state.done("fp")) == {f"s3://pool/{i:05d}.tar" for i in range(7)}
    assert state.done("other") == {}


def test_compaction_keeps_every_record_once(tmp_path):
    run = str(tmp_path / "run")
    w = ManifestWriter(run, flush_records=1)
    for i in range(5):
        w.add(rec(i))
    state = RunState.load(run)
    manifest.compact(state, min_segments=2)
    after = RunState.load(run)
    assert len(after.segments) == 1 and after.records == state.records


def test_conflicting_records_are_refused(tmp_path):
    run = str(tmp_path / "run")
    ManifestWriter(run).add(rec(1))  # pending only
    w = ManifestWriter(run)
    w.add(rec(1))
    w.close()
    w = ManifestWriter(run)
    w.add(rec(1, parts=["scores/other.parquet"]))
    w.close()
    with pytest.raises(ValueError, match="two different completion records"):
        RunState.load(run)


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
