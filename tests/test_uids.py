"""Derived uids end to end: a --uid-column the pool does not have is an error before any work;
with --allow-derived-uids the job runs, counts them per shard and in the summary, and writes
no keep.npy (a derived uid matches nothing in DataComp) - keep.parquet still."""

from __future__ import annotations

import os

import pytest

from tests.conftest import tiny_cfg
from tmars_ray.job import JobError, run
from tmars_ray.run.manifest import RunState


@pytest.fixture(scope="module")
def parquet_pool(tmp_path_factory) -> str:
    from tmars_ray.devtools.synth import write_pool

    out = tmp_path_factory.mktemp("pqpool")
    write_pool(str(out), samples=12, shards=2, seed=21, fmt="parquet")
    return str(out)


def test_wrong_uid_column_is_an_error_before_any_work(parquet_pool, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(
        input=parquet_pool, output=str(out), clip_pretrained=tiny_checkpoint, uid_column="id"
    )
    with pytest.raises(JobError, match=r"'id' \(--uid-column\).*--allow-derived-uids"):
        run(cfg)
    assert not os.path.exists(out / "scores") and not os.path.exists(out / "manifest")


def test_derived_uids_are_counted_and_keep_npy_needs_the_flag(
    ray_session, parquet_pool, tiny_checkpoint, tmp_path
):
    cfg = tiny_cfg(
        input=parquet_pool,
        output=str(tmp_path / "run"),
        clip_pretrained=tiny_checkpoint,
        uid_column="id",
        allow_derived_uids=True,
    )
    result = run(cfg)
    assert result.exit_code == 0, result.message
    state = RunState.load(cfg.output)
    assert [r.derived_uids for r in state.records] == [r.rows for r in state.records]
    counts = result.summary["counts"]
    assert counts["derived_uids"] == 12 and counts["kept"] == 6
    assert result.summary["scoring"]["samples"]["derived_uids"] == 12
    assert (tmp_path / "run" / "keep" / "keep.npy").exists()  # the user asked for it

    from dataclasses import replace

    from tmars_ray.selection.select import select_config

    summary = select_config(
        replace(cfg, allow_derived_uids=False), [state], str(tmp_path / "strict")
    )
    keep = tmp_path / "strict" / "keep"
    assert (keep / "keep.parquet").exists() and not (keep / "keep.npy").exists()
    assert summary["counts"]["derived_uids_kept"] == 6
    assert "derived" in summary["keep"]["npy_skipped_reason"]
