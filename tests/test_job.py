"""The whole job on a real local Ray instance: one row per sample, keep-list checked against an
independent computation from the score table, DataComp keep.npy, summary."""

from __future__ import annotations

import glob
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_scores, tiny_cfg
from tmars_ray.data import schema
from tmars_ray.job import run
from tmars_ray.run.manifest import RunState


def _pool_keys(pool: str) -> set[tuple[str, str]]:
    keys = set()
    for shard in glob.glob(f"{pool}/*.tar"):
        with tarfile.open(shard) as tar:
            keys |= {(shard, m.name.split(".")[0]) for m in tar.getmembers()}
    return keys


@pytest.fixture(scope="module")
def job_run(ray_session, small_pool, tiny_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_cfg(input=small_pool, output=out, clip_pretrained=tiny_checkpoint)
    return cfg, run(cfg)


def test_one_row_per_sample_with_the_design_schema(job_run, small_pool):
    cfg, result = job_run
    assert result.exit_code == 0, result.message
    records = RunState.load(cfg.output).records
    assert len(records) == 3 and all(r.shard_status == "ok" for r in records)
    table = read_scores(cfg.output)
    for field in schema.SCORE_SCHEMA:
        assert table.schema.field(field.name).type == field.type, field.name
    rows = {(r["shard"], r["key"]) for r in table.select(["shard", "key"]).to_pylist()}
    assert rows == _pool_keys(small_pool)
    assert table.num_rows == len(rows) == 24
    assert set(table["status"].to_pylist()) == {"ok"}
    # text found where the generator drew text: most text samples have boxes, masked != original
    t = table.to_pandas()
    assert (t.n_text_boxes > 0).sum() >= 8
    changed = t[t.n_text_boxes > 0]
    assert (changed.clip_score != changed.tmars_score).all()
    plain = t[t.n_text_boxes == 0]
    assert (plain.clip_score == plain.tmars_score).all()
    assert ((t.text_area > 0) == (t.n_text_boxes > 0)).all()


def test_keep_list_matches_an_independent_selection(job_run):
    cfg, result = job_run
    t = read_scores(cfg.output).to_pandas()
    ok = t[t.status == "ok"]
    order = np.lexsort((ok.uid.to_numpy(), -ok.tmars_score.to_numpy()))
    k = int(np.floor(0.5 * len(ok)))
    expected = sorted(ok.uid.to_numpy()[order[:k]])
    kept = pq.read_table(f"{cfg.output}/keep/keep.parquet")["uid"].to_pylist()
    assert kept == expected
    summary = json.loads(open(f"{cfg.output}/keep/summary.json").read())
    assert summary["counts"]["kept"] == k
    assert summary["threshold"] == pytest.approx(float(ok.tmars_score.to_numpy()[order[k - 1]]))
    assert summary["random_weights"] is False
    assert "tmars-ray" in summary["versions"]
    # DataComp subset file: two uint64 halves of the 128-bit uid, sorted, read back the
    # way DataComp's resharder does
    npy = np.load(f"{cfg.output}/keep/keep.npy")
    assert npy.dtype == np.dtype("u8,u8")
    halves = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in expected], dtype="u8,u8")
    assert np.array_equal(npy, halves)
    for uid in ok.uid:
        probe = np.array([(int(uid[:16], 16), int(uid[16:], 16))], dtype="u8,u8")
        pos = np.searchsorted(npy, probe)[0]
        found = pos < len(npy) and npy[pos] == probe[0]
        assert found == (uid in set(expected))


def test_rerun_skips_done_shards_and_keeps_the_keep_list(job_run):
    cfg, result = job_run
    before = open(f"{cfg.output}/keep/keep.parquet", "rb").read()
    again = run(cfg)
    assert again.summary["scoring"]["shards"]["skipped_done"] == 3
    assert again.summary["scoring"]["shards"]["scored_now"] == 0
    assert open(f"{cfg.output}/keep/keep.parquet", "rb").read() == before
