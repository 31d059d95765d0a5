"""Failed shards (issue 24, DESIGN 6): a shard that cannot be read, or whose image column
holds no bytes, is listed in summary.json `failed_shards`, fails the run unless
--max-failed-shards allows it, is never marked done, and a rerun that finds it readable scores
only it - ending with the keep-list of a clean run. Real Ray (the session instance)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_cfg
from tmars_ray.data import schema
from tmars_ray.devtools.synth import write_pool
from tmars_ray.job import EXIT_FAILURE_BUDGET, run
from tmars_ray.run.manifest import RunState

GARBAGE, WRONG = "x-garbage.tar", "y-wrong-type.parquet"


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, Path]:
    """`bad`: 3 good tars + a garbage .tar + a parquet whose image column is int64;
    `good`: the same pool with both replaced by readable shards; `fix`: those two."""
    base = tmp_path_factory.mktemp("failed-shards")
    write_pool(str(base / "tars"), samples=24, shards=3, seed=11)
    write_pool(str(base / "extra-tar"), samples=8, shards=1, seed=12)
    write_pool(str(base / "extra-pq"), samples=8, shards=1, seed=13, fmt="parquet")
    bad, fix = base / "bad", base / "fix"
    bad.mkdir()
    fix.mkdir()
    for tar in sorted((base / "tars").glob("*.tar")):
        shutil.copy(tar, bad / tar.name)
    shutil.copy(base / "extra-tar" / "00000000.tar", fix / GARBAGE)
    shutil.copy(base / "extra-pq" / "00000000.parquet", fix / WRONG)
    (bad / GARBAGE).write_bytes(np.random.default_rng(5).integers(1, 256, 5000, np.uint8).tobytes())
    table = pq.read_table(fix / WRONG)
    ints = pa.array(range(table.num_rows), pa.int64())
    pq.write_table(
        table.set_column(table.schema.get_field_index("image"), "image", ints), bad / WRONG
    )
    good = base / "good"
    shutil.copytree(bad, good)
    for f in fix.iterdir():
        shutil.copy(f, good / f.name)
    return {"bad": bad, "good": good, "fix": fix}


def _cfg(pool: Path, out: Path, checkpoint: str, **kw):
    return tiny_cfg(input=str(pool), output=str(out), clip_pretrained=checkpoint, **kw)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def test_failed_shards_fail_the_run_are_never_done_and_a_rerun_retries_them(
    ray_session, tiny_checkpoint, pools, tmp_path
):
    out = tmp_path / "run"
    first = run(_cfg(pools["bad"], out, tiny_checkpoint, report=True))
    assert first.exit_code == EXIT_FAILURE_BUDGET, first.message
    summary = json.loads((out / "keep" / "summary.json").read_text())
    failed = {_name(f["shard"]): f["reason"] for f in summary["failed_shards"]}
    assert set(failed) == {GARBAGE, WRONG}
    assert failed[GARBAGE].startswith(schema.SHARD_UNREADABLE + ": ")
    assert failed[WRONG].startswith(schema.SHARD_BAD_COLUMN + ": ") and "int64" in failed[WRONG]
    assert "FAILED SHARDS: 2 shard(s) could not be read" in first.message
    assert "--max-failed-shards 0" in first.message
    assert "how many samples are missing is unknown" in first.message
    assert "failures: none" in first.message  # every sample that was read was scored
    html = (out / "report.html").read_text()
    assert 'id="failed-shards-banner"' in html and GARBAGE in html and WRONG in html
    # the keep-list is written over what was scored; failed shards are not done
    assert (out / "keep" / "keep.parquet").exists()
    done = {_name(r.shard) for r in RunState.load(str(out)).records}
    assert done == {p.name for p in pools["bad"].glob("*.tar")} - {GARBAGE}

    # a budget of 2 failed shards: the same (retried, failing again) shards, exit 0
    allowed = run(_cfg(pools["bad"], out, tiny_checkpoint, max_failed_shards=2))
    assert allowed.exit_code == 0, allowed.message
    assert len(allowed.summary["failed_shards"]) == 2
    assert allowed.summary["scoring"]["shards"]["skipped_done"] == 3

    # the bad shards replaced by readable ones: only they are scored, and the keep-list is a
    # clean run's, byte for byte
    for f in pools["fix"].iterdir():
        shutil.copy(f, pools["bad"] / f.name)
    fixed = run(_cfg(pools["bad"], out, tiny_checkpoint))
    assert fixed.exit_code == 0, fixed.message
    assert fixed.summary["failed_shards"] == []
    assert fixed.summary["scoring"]["shards"]["scored_now"] == 2
    assert fixed.summary["scoring"]["shards"]["skipped_done"] == 3
    assert "failed shards: none" in fixed.message
    clean = run(_cfg(pools["good"], tmp_path / "clean", tiny_checkpoint))
    assert clean.exit_code == 0, clean.message
    for name in ("keep.parquet", "keep.npy"):
        assert (out / "keep" / name).read_bytes() == (
            tmp_path / "clean" / "keep" / name
        ).read_bytes()
    assert fixed.summary["counts"]["kept"] == clean.summary["counts"]["kept"] > 0


def test_a_shard_gone_before_it_is_read_is_a_failed_shard(pools):
    from tmars_ray.data import sources

    item = {"shard": str(pools["bad"] / "gone.tar"), "shard_id": "g", "shard_rel": "gone.tar"}
    rows = list(sources.read_shard(item, tiny_cfg()))
    assert [r["kind"] for r in rows] == ["end"]
    assert (
        rows[0]["shard_status"] == schema.SHARD_MISSING
        and schema.SHARD_MISSING in schema.SHARD_FAILED
    )
