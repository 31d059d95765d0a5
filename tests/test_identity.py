"""Identity of shards and weights (issue 25 item 5): a shard rewritten in place after it was
scored is scored again - its old rows replaced, never doubled - on resume and when re-filtering
with --scores-from; records of a shard are superseded, not mixed; local weights are identified
by a full content hash, cached by file identity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_scores, tiny_cfg
from tmars_ray.config import Config
from tmars_ray.data import sources
from tmars_ray.job import run
from tmars_ray.models import file_hash
from tmars_ray.run.manifest import ManifestWriter, RunState, ShardRecord
from tmars_ray.selection.sources import resolve_sources


def _keep(run_dir: Path) -> dict[str, bytes]:
    return {n: (run_dir / "keep" / n).read_bytes() for n in ("keep.parquet", "keep.npy")}


def _rewrite_caption_same_size(shard: Path) -> None:
    """New content, same size: the first caption's bytes replaced in place (only the mtime
    and the content tell the rewrite)."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".txt"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"z" * member.size)
    assert shard.stat().st_size == size


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder.parent.parent)) for p in folder.rglob("*") if p.is_file()}


def test_rewritten_shards_are_rescored_not_doubled(ray_session, tiny_checkpoint, tmp_path):
    from tmars_ray.devtools.synth import write_pool

    pool, other = tmp_path / "pool", tmp_path / "other"
    write_pool(str(pool), samples=24, shards=3, seed=5)  # 8 samples per shard
    write_pool(str(other), samples=30, shards=3, seed=6)  # 10 per shard, other uids
    base = tiny_cfg(input=str(pool), clip_pretrained=tiny_checkpoint)
    first = tmp_path / "first"
    assert run(dataclasses.replace(base, output=str(first))).exit_code == 0
    before = {r.shard: r for r in RunState.load(str(first)).records}

    # the crawl rewrites two shards under the same names: one with other samples (other size),
    # one in place with the same size (only the mtime says so)
    shutil.copy(other / "00000001.tar", pool / "00000001.tar")
    _rewrite_caption_same_size(pool / "00000002.tar")
    new_pool_size = 8 + 10 + 8

    fresh = tmp_path / "fresh"
    assert run(dataclasses.replace(base, output=str(fresh))).exit_code == 0
    reference = read_scores(str(fresh)).sort_by("uid")
    assert reference.num_rows == new_pool_size

    # re-filtering with --scores-from the first run: only the rewritten shards are scored;
    # selection reads them from this run, the unchanged one from the first run
    refilter = tmp_path / "refilter"
    result = run(dataclasses.replace(base, output=str(refilter), scores_from=[str(first)]))
    assert result.exit_code == 0, result.message
    assert result.summary["scoring"]["shards"]["scored_now"] == 2
    assert _keep(refilter) == _keep(fresh)

    # resume of the first run: the same two shards rescored, their old rows replaced
    result = run(dataclasses.replace(base, output=str(first)))
    assert result.exit_code == 0, result.message
    assert result.summary["scoring"]["shards"]["scored_now"] == 2
    assert result.summary["scoring"]["samples"]["input"] == new_pool_size
    assert any(
        "2 shard(s) changed since they were scored" in n for n in result.summary["scoring"]["notes"]
    )
    state = RunState.load(str(first))
    after = {r.shard: r for r in state.records}
    assert after.keys() == before.keys()
    unchanged = str(pool / "00000000.tar")
    assert after[unchanged] == before[unchanged]  # not rescored
    for name in ("00000001.tar", "00000002.tar"):
        new, old = after[str(pool / name)], before[str(pool / name)]
        assert new.parts != old.parts and new.scored_at > old.scored_at
        assert (new.shard_size, new.shard_version) != (old.shard_size, old.shard_version)
        # the old parts are gone: the folder holds exactly what the new record lists
        assert _files_under(first / "scores" / new.shard_id) == set(new.parts)
    table = read_scores(str(first))
    keys = list(zip(table["shard"].to_pylist(), table["key"].to_pylist()))
    assert len(keys) == len(set(keys)) == new_pool_size
    assert table.sort_by("uid").equals(reference)  # every score as a fresh run gives it
    assert _keep(first) == _keep(fresh)

    # nothing changed since: nothing is scored again
    result = run(dataclasses.replace(base, output=str(first)))
    assert result.summary["scoring"]["shards"]["scored_now"] == 0

    # rewritten into something unreadable: its stale rows are retracted, so the keep-list
    # (a failed shard allowed) holds none of them, and the run says the shard failed
    zero = str(pool / "00000000.tar")
    stale_uids = set(table.filter(pc.equal(table["shard"], zero))["uid"].to_pylist())
    (pool / "00000000.tar").write_bytes(b"not a tar any more" * 64)
    result = run(dataclasses.replace(base, output=str(first), max_failed_shards=1))
    assert result.exit_code == 0, result.message
    assert [f["shard"] for f in result.summary["failed_shards"]] == [zero]
    assert zero not in set(read_scores(str(first))["shard"].to_pylist())
    kept = set(pq.read_table(first / "keep" / "keep.parquet")["uid"].to_pylist())
    assert kept and not kept & stale_uids


def rec(shard: str, parts: list[str], identity=(None, None), at: int | None = None):
    return ShardRecord(
        shard, "s-1", parts, 1, "fp", shard_size=identity[0], shard_version=identity[1],
        scored_at=at,
    )  # fmt: skip


def _write_run(run_dir: Path, *records: ShardRecord) -> RunState:
    """A run whose records are written one segment each, in order, with their parts."""
    for r in records:
        for part in r.parts:
            (run_dir / part).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / part).write_bytes(b"part")
        w = ManifestWriter(str(run_dir))
        w.add(r)
        w.close()
    return RunState.load(str(run_dir))


def _unit_files(srcs) -> list[str]:
    return [Path(u).name for unit in srcs.units for u in unit.urls]


def test_selection_reads_only_the_newest_record_of_a_shard(tmp_path):
    """Within a run, a rescored shard's new record supersedes the old one even while the old
    parts are still there (a crash before their deletion): they are never read."""
    state = _write_run(
        tmp_path / "run",
        rec("pool/a.tar", ["scores/s-1/part-old.parquet"], (10, "mtime:1")),
        rec("pool/a.tar", ["scores/s-1/part-new.parquet"], (12, "mtime:2")),
    )
    srcs = resolve_sources([state])
    assert _unit_files(srcs) == ["part-new.parquet"] and srcs.shards == 1


def test_across_runs_the_later_score_of_a_rewritten_shard_wins(tmp_path):
    old = _write_run(
        tmp_path / "old", rec("pool/a.tar", ["scores/s-1/o.parquet"], (10, "etag:1"), 1)
    )
    new = _write_run(
        tmp_path / "new", rec("pool/a.tar", ["scores/s-1/n.parquet"], (11, "etag:2"), 2)
    )
    for order in ([new, old], [old, new]):
        srcs = resolve_sources(order)
        assert _unit_files(srcs) == ["n.parquet"]
        assert (srcs.shards, srcs.superseded, dict(srcs.fingerprints)) == (1, 1, {"fp": 1})
        assert srcs.ignored_partial_count == 0  # superseded parts are not partial output
    # the same shard, unchanged, in two runs is still an error: it was scored twice
    twice = _write_run(
        tmp_path / "twice", rec("pool/a.tar", ["scores/s-1/t.parquet"], (11, "etag:2"), 3)
    )
    with pytest.raises(ValueError, match="shard written twice"):
        resolve_sources([new, twice])
    legacy = _write_run(tmp_path / "legacy", rec("pool/a.tar", ["scores/s-1/l.parquet"]))
    with pytest.raises(ValueError, match="shard written twice"):
        resolve_sources([new, legacy])


def test_a_retraction_hides_stale_rows_here_and_in_an_earlier_run(tmp_path):
    """A rewritten shard whose rescoring has not happened (a crash) or failed: its old rows are
    read by no selection - neither from this run nor from the earlier run it re-filters."""
    from tmars_ray.run import manifest

    old_id, new_id = (10, "etag:1"), (11, "etag:2")
    earlier = _write_run(
        tmp_path / "earlier", rec("pool/a.tar", ["scores/s-1/e.parquet"], old_id, 1)
    )
    here = _write_run(
        tmp_path / "here",
        rec("pool/a.tar", ["scores/s-1/h.parquet"], old_id, 2),
        rec("pool/b.tar", ["scores/s-2/b.parquet"], (5, "etag:5"), 2),
    )
    listing = {"pool/a.tar": new_id, "pool/b.tar": (5, "etag:5")}
    here = manifest.retract(here, {"pool/a.tar": "s-1"}, "fp", listing)
    for sources_ in ([here], [here, earlier], [earlier, RunState.load(str(tmp_path / "here"))]):
        srcs = resolve_sources(sources_)
        assert _unit_files(srcs) == ["b.parquet"] and srcs.shards == 1
    # once an earlier run holds the shard's new content, the retraction does not hide it
    newer = _write_run(tmp_path / "newer", rec("pool/a.tar", ["scores/s-1/n.parquet"], new_id, 1))
    srcs = resolve_sources([here, newer])
    assert sorted(_unit_files(srcs)) == ["b.parquet", "n.parquet"] and srcs.shards == 2


def test_s3_listing_gives_the_etag_and_a_rewrite_changes_it(s3_env, tmp_path):
    from tmars_ray.devtools.synth import write_pool

    write_pool(str(tmp_path / "pool"), samples=4, shards=2, seed=1)
    write_pool(str(tmp_path / "other"), samples=4, shards=2, seed=2)
    s3_env.upload_dir(tmp_path / "pool", "s3://ident/pool")
    root, shards, sizes, versions = sources.list_shards_identified("s3://ident/pool")
    assert all(versions[s].startswith("etag:") for s in shards), versions
    run_dir = "s3://ident/run"
    ids = {s: (sizes[s], versions[s]) for s in shards}
    w = ManifestWriter(run_dir, identities=ids)
    for item in sources.shard_items(root, shards, sizes, versions):
        w.add(ShardRecord(item["shard"], item["shard_id"], [], 0, "fp"))
    w.close()
    state = RunState.load(run_dir)
    assert set(state.done("fp", ids)) == set(shards)

    fs = s3_env.filesystem()
    fs.put_file(str(tmp_path / "other" / "00000001.tar"), "ident/pool/00000001.tar")
    _, _, sizes2, versions2 = sources.list_shards_identified("s3://ident/pool")
    now = {s: (sizes2[s], versions2[s]) for s in shards}
    assert versions2[shards[1]] != versions[shards[1]]
    assert set(state.done("fp", now)) == {shards[0]}
    assert [r.shard for r in state.changed("fp", now)] == [shards[1]]


def test_weights_hash_is_full_and_cached_by_file_identity(tmp_path):
    cache = tmp_path / "cache"
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(os.urandom(3 << 20) + b"a" + os.urandom(3 << 20))
    full = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert file_hash.content_hash(str(ckpt), cache) == full
    entries = json.loads((cache / file_hash.CACHE_FILE).read_text())
    assert entries == {file_hash.file_key(str(ckpt)): full}

    # reuse is observable: an entry for this exact file state is believed without reading it
    planted = {file_hash.file_key(str(ckpt)): "planted"}
    (cache / file_hash.CACHE_FILE).write_text(json.dumps(planted))
    assert file_hash.content_hash(str(ckpt), cache) == "planted"

    # a byte in the middle changed, size and mtime restored (what a partial hash of the
    # first and last MiB missed): ctime moved, so the file is hashed again
    st = ckpt.stat()
    with open(ckpt, "r+b") as f:
        f.seek(3 << 20)
        f.write(b"b")
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ckpt.stat().st_mtime_ns == st.st_mtime_ns and ckpt.stat().st_size == st.st_size
    changed = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert changed != full and file_hash.content_hash(str(ckpt), cache) == changed

    # touched (same content): rehashed, same digest; replaced by rename: rehashed
    os.utime(ckpt)
    (cache / file_hash.CACHE_FILE).write_text(json.dumps(planted))
    assert file_hash.content_hash(str(ckpt), cache) == changed
    repl = tmp_path / "new.bin"
    repl.write_bytes(b"other weights")
    os.replace(repl, ckpt)
    assert file_hash.content_hash(str(ckpt), cache) == hashlib.sha256(b"other weights").hexdigest()


def test_fingerprint_sees_a_change_in_the_middle_of_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TMARS_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"\0" * (5 << 20))
    before = Config(clip_pretrained=str(ckpt)).fingerprint_fields()["fields"]["clip_pretrained"]
    assert before == {
        "file": "w.safetensors",
        "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
    }
    with open(ckpt, "r+b") as f:
        f.seek(5 << 19)  # 2.5 MiB: outside the first and last MiB
        f.write(b"\1")
    after = Config(clip_pretrained=str(ckpt)).fingerprint_fields()["fields"]["clip_pretrained"]
    assert after != before
    # a folder of weights: every file by content
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a")
    one = Config(clip_pretrained=str(folder)).scoring_fingerprint()
    (folder / "a.bin").write_bytes(b"b")
    assert Config(clip_pretrained=str(folder)).scoring_fingerprint() != one
