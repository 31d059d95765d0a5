"""Complete or say so (issue 25 item 4): a keep-list over a run with unscored shards (failed,
or not scored because the run stopped) says `complete: false` and how many shards (and, where
known, samples) are missing - in summary.json, the end-of-run lines and the report's banner;
`complete: true` only when every listed input shard is done. Selection reads only what the
run's own records list, of its own input; a second --input into a used output is refused.
Real Ray (the session instance), real runs of the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_cfg
from tmars_ray.devtools.synth import write_pool
from tmars_ray.job import JobError, run
from tmars_ray.run import inputs
from tmars_ray.run.manifest import ManifestWriter, RunState, ShardRecord
from tmars_ray.selection import keeplist
from tmars_ray.selection.select import select

CORRUPT = "x-corrupt.tar"


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, Path]:
    """`good`: 3 tars; `bad`: the same plus a corrupt tar; `other`: another pool."""
    base = tmp_path_factory.mktemp("complete")
    write_pool(str(base / "good"), samples=18, shards=3, seed=31)
    write_pool(str(base / "other"), samples=6, shards=1, seed=32)
    shutil.copytree(base / "good", base / "bad")
    junk = np.random.default_rng(7).integers(1, 256, 4000, np.uint8).tobytes()
    (base / "bad" / CORRUPT).write_bytes(junk)
    return {k: base / k for k in ("good", "bad", "other")}


def _cfg(pool: Path, out: Path, checkpoint: str, **kw):
    return tiny_cfg(input=str(pool), output=str(out), clip_pretrained=checkpoint, **kw)


def _summary(out: Path) -> dict:
    return json.loads((out / "keep" / "summary.json").read_text())


@pytest.fixture(scope="module")
def clean_run(ray_session, tiny_checkpoint, pools, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "run"
    result = run(_cfg(pools["good"], out, tiny_checkpoint))
    assert result.exit_code == 0, result.message
    return out


def test_a_clean_run_is_complete(clean_run):
    summary = _summary(clean_run)
    assert summary["complete"] is True and summary["missing_shards"] == 0
    assert summary["completeness"]["listed_shards"] == 3
    assert summary["completeness"]["text"] == "complete: all 3 input shard(s) are scored"


def test_an_allowed_failed_shard_gives_complete_false_everywhere(
    ray_session, tiny_checkpoint, pools, tmp_path
):
    out = tmp_path / "run"
    result = run(_cfg(pools["bad"], out, tiny_checkpoint, max_failed_shards=1, report=True))
    assert result.exit_code == 0, result.message  # the budget allows it: still not complete
    summary = _summary(out)
    assert summary["complete"] is False and summary["missing_shards"] == 1
    c = summary["completeness"]
    assert (c["listed_shards"], c["done_shards"], c["failed_shards"]) == (4, 3, 1)
    assert c["missing_examples"] == [str(pools["bad"] / CORRUPT)]
    assert "INCOMPLETE: 1 of 4 input shard(s) are not in this keep-list" in result.message
    assert f"missing shard: {pools['bad'] / CORRUPT}" in result.message
    html = (out / "report.html").read_text()
    assert 'id="incomplete-banner"' in html and "INCOMPLETE KEEP-LIST" in html
    # `tmars select` over the same folder later says the same
    again = select([str(out)], str(tmp_path / "later"))
    assert again["complete"] is False and again["missing_shards"] == 1


def test_a_run_that_stopped_is_incomplete_until_resumed(
    ray_session, tiny_checkpoint, pools, tmp_path
):
    """A scoring command records its listing before any work: stopped after that, the shards
    it did not finish are missing for any later selection."""
    pool, out = tmp_path / "pool", tmp_path / "run"
    shutil.copytree(pools["good"], pool)
    assert run(_cfg(pool, out, tiny_checkpoint)).exit_code == 0
    shutil.copy(pools["other"] / "00000000.tar", pool / "00000009.tar")  # a new shard ...
    from tmars_ray.data import sources

    root, shards = sources.list_shards(str(pool))
    state = RunState.load(str(out))
    inputs.check(str(out), str(pool), root, state)
    inputs.record(str(out), str(pool), root, shards)  # ... the run stops here
    summary = select([str(out)], str(tmp_path / "sel"))
    assert summary["complete"] is False and summary["missing_shards"] == 1
    assert summary["completeness"]["stopped_runs"] == [str(out)]
    assert "samples missing: unknown" in summary["completeness"]["text"]
    resumed = run(_cfg(pool, out, tiny_checkpoint))  # the same command resumes: complete
    assert resumed.exit_code == 0, resumed.message
    assert resumed.summary["complete"] is True
    assert resumed.summary["scoring"]["shards"]["scored_now"] == 1
    assert "complete: all 4 input shard(s) are scored" in resumed.message


def test_a_second_input_into_a_used_output_is_refused(
    ray_session, tiny_checkpoint, pools, clean_run, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    segments = sorted(p.name for p in (out / "manifest").iterdir())
    with pytest.raises(JobError) as err:
        run(_cfg(pools["other"], out, tiny_checkpoint))
    text = str(err.value)
    assert f"refusing --input {pools['other']}" in text
    assert f"--input {pools['good']}" in text and "new --output" in text
    assert sorted(p.name for p in (out / "manifest").iterdir()) == segments  # nothing written
    # the same input, spelled with a trailing slash, resumes
    again = run(_cfg(Path(str(pools["good"]) + "/"), out, tiny_checkpoint))
    assert again.exit_code == 0 and again.summary["complete"] is True
    # a folder from before input.json existed is judged by its records' shards
    (out / inputs.INPUT_JSON).unlink()
    with pytest.raises(JobError, match="refusing --input .*another input .*3 done shards"):
        run(_cfg(pools["other"], out, tiny_checkpoint))


def _plant(run_dir: Path, shard: str, part: str, rows_from: Path) -> None:
    """A completion record added to the run's manifest, listing `part` (copied from a real
    score part), as if another run or input had written into the folder."""
    target = run_dir / part
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(rows_from, target)
    n = pq.ParquetFile(target).metadata.num_rows
    writer = ManifestWriter(str(run_dir), flush_seconds=0)
    writer.add(
        ShardRecord(shard, "planted", [part], n, RunState.load(str(run_dir)).records[0].fingerprint)
    )
    writer.close()


def test_selection_reads_only_the_runs_own_records_of_its_own_input(clean_run, pools, tmp_path):
    state = RunState.load(str(clean_run))
    part = clean_run / state.records[0].parts[0]
    want = keeplist.load_keep_uids(str(clean_run / "keep"))
    # a score file no record lists: ignored (counted), the keep-list is unchanged
    unlisted = tmp_path / "unlisted"
    shutil.copytree(clean_run, unlisted)
    (unlisted / "scores" / "stray").mkdir()
    shutil.copy(part, unlisted / "scores" / "stray" / "part-0.parquet")
    summary = select([str(unlisted)], str(tmp_path / "sel-unlisted"))
    assert summary["counts"]["ignored_partial_files"] == 1
    assert keeplist.load_keep_uids(str(tmp_path / "sel-unlisted" / "keep")) == want
    # a record of a shard of another input: refused
    foreign = tmp_path / "foreign"
    shutil.copytree(clean_run, foreign)
    _plant(foreign, str(pools["other"] / "00000000.tar"), "scores/planted/part-0.parquet", part)
    with pytest.raises(ValueError, match=r"outside .*mixes inputs"):
        select([str(foreign)], str(tmp_path / "sel-foreign"))
    # a record whose part lies outside the run's scores/ folder: refused, never read
    outside = tmp_path / "outside"
    shutil.copytree(clean_run, outside)
    shard = str(pools["good"] / "00000099.tar")
    _plant(outside, shard, "../elsewhere/part-0.parquet", part)
    with pytest.raises(ValueError, match=r"not under the run's scores/"):
        select([str(outside)], str(tmp_path / "sel-outside"))
