"""Duplicate uids (issue 25 item 5): a uid on several rows - within a shard, across shards,
across score sources - is represented by its first `ok` row in the documented order (sources
as given, then shard id, then row order); a failed row never hides a later ok one, wherever
the merge's chunks happen to cut; duplicates are counted in summary.json."""

from __future__ import annotations

import numpy as np
import pytest

from tests.selection.test_select import random_pool, reference, run_select, split, write_run
from tmars_ray.selection import records as R
from tmars_ray.selection import sortmerge as SM

U = [f"{i:032x}" for i in range(1, 8)]


def _rows(uids, status, scores):
    n = len(uids)
    return {
        "uid": uids,
        "status": status,
        "tmars_score": scores,
        "clip_score": [0.1] * n,
        "clip_score_2": [0.1] * n,
        "ocr_text": [None] * n,
        "caption": ["c"] * n,
    }


def test_an_ok_row_wins_over_earlier_failed_rows_in_shards_and_runs(tmp_path):
    A, B, C, D, E = U[:5]
    # run1, shard 0: A fails, then A ok later in the same shard; B fails here...
    s0 = _rows(
        [A, B, A, C], ["decode_error", "no_caption", "ok", "too_large"], [0.1, 0.2, 0.4, 0.3]
    )
    # ... shard 1: B ok (wins over its failed row in shard 0); D ok twice: first one wins
    s1 = _rows([B, D, D], ["ok", "ok", "ok"], [0.8, 0.5, 0.9])
    # run2 (a --scores-from source after run1): C ok wins over run1's failed C; E never ok
    s2 = _rows([C, E, A], ["ok", "decode_error", "ok"], [0.7, 0.6, 0.95])
    run1 = write_run(tmp_path / "run1", [s0, s1], "s3://new/shard")
    run2 = write_run(tmp_path / "run2", [s2], "s3://old/shard")
    summary, kept, _ = run_select(tmp_path, [run1, run2], threshold=0.45)
    # A's representative is 0.4 (run1's ok row; run2's 0.95 is later): below the threshold
    assert kept == sorted([B, C, D])
    c = summary["counts"]
    # A: 3 rows, B: 2, C: 2, D: 2 -> 5 duplicate rows of 4 uids; E has no candidate
    assert (c["duplicate_rows"], c["duplicate_uids"], c["candidates"]) == (5, 4, 4)
    assert "first ok row" in summary["duplicate_rule"]
    # source order decides: run2 first makes its rows win
    summary, kept, _ = run_select(tmp_path, [run2, run1], name="swapped", threshold=0.45)
    assert kept == sorted([A, B, C, D])


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_dedup_prefers_ok_rows_across_chunk_boundaries(chunk):
    """The merged stream arrives in chunks; a uid's rows may straddle any cut."""
    uids = np.array([1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 5], np.uint64)
    skey = np.array(
        [
            R.SKEY_NOT_OK, R.SKEY_NOT_OK, 0x90000000,  # 1: third row
            0x90000001, 0x90000002,  # 2: first row
            R.SKEY_NOT_OK,  # 3: no candidate
            R.SKEY_NOT_OK, R.SKEY_NON_FINITE, 0x90000003, R.SKEY_NOT_OK,  # 4: ok but NaN
            0x90000004,
        ],
        np.uint32,
    )  # fmt: skip
    rec = R.make_records((uids, np.zeros_like(uids)), skey)  # hi differs: fast path too
    dedup = SM.Dedup(R.RecordSink())
    for start in range(0, len(rec), chunk):
        dedup(rec[start : start + chunk].copy())
    out = dedup.close().rec
    assert out["hi"].tolist() == [1, 2, 5]
    assert out["skey"].tolist() == [0x90000000, 0x90000001, 0x90000004]
    assert dedup.stats() == {"duplicate_rows": 6, "duplicate_uids": 3, "non_finite": 1}


def test_random_pools_with_many_duplicates_match_the_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(SM, "MERGE_BUFFER_ROWS", 64)  # many merge rounds: many chunk cuts
    monkeypatch.setattr(SM, "MERGE_MIN_BLOCK", 8)
    rows = random_pool(np.random.default_rng(3), 900, dup_share=0.4)
    run = write_run(tmp_path / "run", split(rows, [200, 450, 700]))
    summary, kept, _ = run_select(tmp_path, [run], fraction=0.5)
    want, thr, n = reference(rows, "tmars", fraction=0.5)
    assert kept == want and summary["counts"]["candidates"] == n
    assert summary["threshold"] == pytest.approx(thr)
    assert summary["counts"]["duplicate_rows"] == len(rows["uid"]) - len(set(rows["uid"]))


def test_in_a_shard_a_later_copy_of_a_uid_whose_first_copy_failed_is_scored(tmp_path):
    """The reader marks `duplicate_uid` (and skips scoring) only after a copy that will be
    scored: a first copy without a caption does not keep the second from being scored."""
    from tests.badpool import _jpeg, _meta, _sample, _tar_bytes
    from tests.conftest import tiny_cfg
    from tmars_ray.data import schema, sources

    uid, other = U[0], U[1]
    members = (
        _sample("a-nocap", None, _meta(uid), _jpeg(40, 32, 1))  # fails: no caption
        + _sample("b-ok", b"a picture", _meta(uid), _jpeg(40, 32, 2))  # scored: may win
        + _sample("c-dup", b"a picture", _meta(uid), _jpeg(40, 32, 3))  # a real duplicate
        + _sample("d-ok", b"a picture", _meta(other), _jpeg(40, 32, 4))
    )
    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar_bytes(members))
    item = {"shard": str(shard), "shard_id": "s", "shard_rel": "s.tar"}
    rows = [r for r in sources.read_shard(item, tiny_cfg()) if r["kind"] != "end"]
    assert [(r["key"], r["status"]) for r in rows] == [
        ("a-nocap", schema.NO_CAPTION),
        ("b-ok", ""),  # to be scored
        ("c-dup", schema.DUPLICATE_UID),
        ("d-ok", ""),
    ]
