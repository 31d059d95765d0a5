"""The whole job over a pool holding every bad input of DESIGN 8 (tests/badpool.py): one row per
sample with its precise status, shard-level problems per shard, everything counted in the
summary, the failure budget deciding the exit code, and every output written either way.
Also two safety properties checked on the same run: archive member names never become
filesystem paths, and credentials never reach an output file."""

from __future__ import annotations

import glob
import io
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.badpool import ABSOLUTE_DIR, ESCAPE_DIR, MAX_IMAGE_PIXELS, write_bad_pool
from tests.conftest import REPO, done_shards, read_scores, tiny_cfg
from tmars_ray.data import schema
from tmars_ray.job import EXIT_FAILURE_BUDGET, run
from tmars_ray.run.manifest import RunState

SECRET = "tmars-SENTINEL-secret-7f3a91"
KEY_ID = "tmars-SENTINEL-keyid-52c0"


@pytest.fixture(scope="module")
def bad_run(ray_session, tiny_checkpoint, tmp_path_factory):
    pool = write_bad_pool(tmp_path_factory.mktemp("badpool") / "pool")
    out = str(tmp_path_factory.mktemp("badrun"))
    cfg = tiny_cfg(
        input=pool.root,
        output=out,
        clip_pretrained=tiny_checkpoint,
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_failed_shards=len(pool.failed),  # these tests look at the sample failure budget
    )
    saved = {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")}
    os.environ.update(AWS_SECRET_ACCESS_KEY=SECRET, AWS_ACCESS_KEY_ID=KEY_ID)
    try:
        result = run(cfg)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return pool, cfg, result


def _rows(out: str) -> list[dict]:
    return read_scores(out).to_pylist()


def _name(shard_url: str) -> str:
    return shard_url.rstrip("/").rsplit("/", 1)[-1]


def test_every_sample_has_exactly_one_row_with_its_precise_status(bad_run):
    pool, cfg, _ = bad_run
    rows = _rows(cfg.output)
    seen = Counter((_name(r["shard"]), r["key"]) for r in rows)
    assert [k for k, n in seen.items() if n > 1] == []
    assert set(seen) == set(pool.scored_samples)  # failed shards have no rows
    got = {(_name(r["shard"]), r["key"]): r["status"] for r in rows}
    wrong = {k: (got[k], want) for k, want in pool.scored_samples.items() if got[k] != want}
    assert wrong == {}, "got vs expected status"
    assert set(got.values()) <= set(schema.SAMPLE_STATUSES)


def test_convertible_images_are_scored_at_their_size(bad_run):
    pool, cfg, _ = bad_run
    for r in _rows(cfg.output):
        k = (_name(r["shard"]), r["key"])
        if r["status"] == schema.OK:
            assert (r["width"], r["height"]) == pool.sizes[k], k
            assert r["clip_score"] is not None and r["tmars_score"] is not None, k
            assert -1.0 <= r["tmars_score"] <= 1.0
        else:  # no score leaks into a failed row
            assert r["clip_score"] is None and r["tmars_score"] is None, k
            assert r["width"] is None and r["height"] is None, k


def test_uids_are_given_or_derived_and_stable(bad_run):
    pool, cfg, _ = bad_run
    for r in _rows(cfg.output):
        k = (_name(r["shard"]), r["key"])
        assert len(r["uid"]) == 32 and r["uid"] == r["uid"].lower()
        int(r["uid"], 16)
        if k in pool.uids:
            assert r["uid"] == pool.uids[k], k
    derived = [
        r["uid"] for r in _rows(cfg.output) if (_name(r["shard"]), r["key"]) not in pool.uids
    ]
    assert len(derived) == len(set(derived))  # (shard, key) hashes do not collide


def test_shard_problems_are_recorded_per_shard(bad_run):
    pool, cfg, result = bad_run
    records = {_name(r.shard): r for r in RunState.load(cfg.output).records}
    # every shard that could be read is done, whatever happened to its samples; a failed
    # shard is never done (a rerun reads it again) and is listed with its reason
    assert set(records) == set(pool.shards) - set(pool.failed)
    failed = {_name(f["shard"]): f for f in result.summary["failed_shards"]}
    assert {k: f["reason"].split(":")[0] for k, f in failed.items()} == pool.failed
    assert all(": " in f["reason"] for f in failed.values())  # status: why
    assert "3 rows not read" in failed["k-no-image-column.parquet"]["reason"]
    assert failed["i-not-a-tar.tar"]["samples_read"] == 0
    for name, want in pool.shards.items():
        if name in pool.failed:
            continue
        rec = records[name]
        assert rec.shard_status == want, name
        expected_rows = sum(1 for s, _ in pool.scored_samples if s == name)
        assert rec.rows == expected_rows == sum(rec.status_counts.values()), name
        if want in (
            schema.SHARD_TRUNCATED,
            schema.SHARD_CORRUPT,
            schema.SHARD_UNREADABLE,
            schema.SHARD_MISSING_COLUMN,
        ):
            assert rec.error, name
        if want == schema.SHARD_OK:
            assert rec.error is None, name
    # truncated shards keep the rows read before the damage
    assert records["d-truncated.tar"].status_counts == {"ok": 2, "truncated": 1}


def test_summary_counts_every_sample_and_shard_problem(bad_run):
    pool, cfg, result = bad_run
    summary = json.loads(Path(cfg.output, "keep", "summary.json").read_text())
    samples = summary["scoring"]["samples"]
    assert samples["input"] == pool.n_samples
    assert samples["by_status"] == pool.by_status()
    assert samples["failed"] == pool.n_samples - pool.by_status()[schema.OK]
    problems = {_name(p["shard"]): p["status"] for p in summary["scoring"]["shards"]["problems"]}
    assert problems == {
        k: v for k, v in pool.shards.items() if v != schema.SHARD_OK and k not in pool.failed
    }
    failed = {_name(f["shard"]): f["reason"].split(":")[0] for f in summary["failed_shards"]}
    assert failed == pool.failed and summary["scoring"]["shards"]["failed"] == len(failed)
    assert f"FAILED SHARDS: {len(failed)} shard(s) could not be read" in result.message
    # the selection's own counts agree with the scoring's
    counts = summary["counts"]
    assert counts["input"] == pool.n_samples
    assert counts["status"] == pool.by_status()
    assert counts["ok"] == pool.by_status()[schema.OK]
    assert summary["shards"] == len(pool.shards) - len(pool.failed)
    assert summary["shard_status"] == dict(
        sorted(Counter(v for k, v in pool.shards.items() if k not in pool.failed).items())
    )
    # a uid in b and c (in-shard duplicates also repeat their uid, whatever their status)
    assert counts["duplicate_uids"] == 3 and counts["duplicate_rows"] == 3
    assert counts["candidates"] == counts["ok"] - 1  # c's copy of the cross-shard uid
    for status, n in pool.by_status().items():
        if status != schema.OK:
            assert f"{status}={n}" in result.message


def test_keep_list_has_no_uid_twice(bad_run):
    pool, cfg, _ = bad_run
    kept = pq.read_table(f"{cfg.output}/keep/keep.parquet")["uid"].to_pylist()
    assert kept == sorted(set(kept))
    ok = {r["uid"] for r in _rows(cfg.output) if r["status"] == schema.OK}
    assert set(kept) <= ok
    assert len(kept) == (len(ok)) // 2  # fraction 0.5 over the distinct ok uids


def test_over_budget_exits_3_with_all_outputs_then_a_wider_budget_exits_0(bad_run):
    pool, cfg, result = bad_run
    failed = pool.n_samples - pool.by_status()[schema.OK]
    assert failed / pool.n_samples > cfg.max_failures == 0.01
    assert result.exit_code == EXIT_FAILURE_BUDGET
    assert f"FAILED: {failed} of {pool.n_samples} samples" in result.message
    assert "--max-failures" in result.message

    def outputs() -> dict[str, bytes]:
        files = sorted(glob.glob(f"{cfg.output}/**/*", recursive=True))
        return {f: Path(f).read_bytes() for f in files if os.path.isfile(f)}

    before = outputs()
    for name in ("keep/keep.parquet", "keep/summary.json"):
        assert f"{cfg.output}/{name}" in before, name
    # samples whose json lacks a uid got derived uids, and some were kept: no DataComp npy
    assert result.summary["counts"]["derived_uids_kept"] > 0
    assert f"{cfg.output}/keep/keep.npy" not in before
    assert done_shards(cfg.output) == len(pool.shards) - len(pool.failed)

    wide = tiny_cfg(**{**cfg.to_dict(), "max_failures": 1.0})
    again = run(wide)
    assert again.exit_code == 0, again.message
    # only the failed shards are read again (and fail again)
    assert again.summary["scoring"]["shards"]["scored_now"] == 0
    assert len(again.summary["failed_shards"]) == len(pool.failed)
    after = outputs()
    assert set(after) == set(before)
    assert after[f"{cfg.output}/keep/keep.parquet"] == before[f"{cfg.output}/keep/keep.parquet"]


def test_member_names_are_never_used_as_paths(bad_run):
    pool, cfg, _ = bad_run
    keys = {k for s, k in pool.samples if s == "b-meta.tar"}
    assert f"../{ESCAPE_DIR}/evil" in keys and f"{ABSOLUTE_DIR}/evil" in keys
    for base in (
        Path(pool.root),
        Path(pool.root).parent,
        Path(cfg.output),
        REPO,
        Path.cwd(),
        Path("/tmp"),
    ):
        assert not (base / ESCAPE_DIR).exists() and not (base.parent / ESCAPE_DIR).exists()
    assert not Path(ABSOLUTE_DIR).exists()
    # the reader streams members (tarfile "r|"); nothing in the package extracts to disk
    for path in (REPO / "tmars_ray").glob("*.py"):
        text = path.read_text()
        assert ".extractall(" not in text and ".extract(" not in text, path


def test_credentials_never_reach_outputs(bad_run):
    _, cfg, result = bad_run
    for f in glob.glob(f"{cfg.output}/**/*", recursive=True):
        if os.path.isfile(f):
            data = Path(f).read_bytes()
            assert SECRET.encode() not in data and KEY_ID.encode() not in data, f
    assert SECRET not in result.message and SECRET not in json.dumps(result.summary)


class _FlakyFile(io.BytesIO):
    """A shard file whose store fails at some point (a dropped S3 connection): every read
    touching bytes from `fail_at` on raises."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self._fail_at = fail_at

    def read(self, n: int | None = -1) -> bytes:
        end = len(self.getbuffer()) if n is None or n < 0 else self.tell() + n
        if end > self._fail_at:
            raise ConnectionError("connection reset by peer")
        return super().read(n)


@pytest.mark.parametrize("shard", ["b-meta.tar", "j-cells.parquet"])
def test_a_failing_store_is_raised_never_recorded_as_damaged_data(shard, tmp_path, monkeypatch):
    """Damaged data becomes statuses; a store failing mid-shard must raise instead, so the
    shard is retried or the job fails - never written as a short, 'truncated' shard. (The
    parquet reader reads the footer first: its failure comes before any row.)"""
    from tmars_ray.data import sources

    pool = write_bad_pool(tmp_path / "pool")
    data = Path(pool.root, shard).read_bytes()

    class FlakyFS:
        def open(self, path, mode="rb"):
            return _FlakyFile(data, len(data) // 2)

    monkeypatch.setattr(sources.storage, "filesystem", lambda url: (FlakyFS(), url))
    item = {"shard": f"{pool.root}/{shard}", "shard_id": "x", "shard_rel": shard}
    rows = []
    with pytest.raises(sources.StorageError, match="connection reset"):
        for row in sources.read_shard(item, tiny_cfg()):
            rows.append(row)
    assert all(r["kind"] == "sample" for r in rows)  # no end row: the shard never completes
    if shard.endswith(".tar"):
        assert rows  # it failed mid-shard, after rows had gone out
