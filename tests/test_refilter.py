"""Re-filtering a new crawl (DESIGN 5): frozen threshold from an earlier run, and a refit over
the union of runs that equals one run over the union of the pools."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq

from tests.conftest import read_scores, tiny_cfg
from tmars_ray.job import run


def _keep(run_dir) -> list[str]:
    return pq.read_table(f"{run_dir}/keep/keep.parquet")["uid"].to_pylist()


def test_frozen_threshold_and_refit_over_the_union(ray_session, tiny_checkpoint, tmp_path):
    from tmars_ray.devtools.synth import write_pool

    old, new, union = tmp_path / "old", tmp_path / "new", tmp_path / "union"
    write_pool(str(old), samples=10, shards=2, seed=21)
    write_pool(str(new), samples=10, shards=2, seed=22)
    union.mkdir()
    for pool in (old, new):
        for shard in pool.glob("*.tar"):
            shutil.copy(shard, union / f"{pool.name}-{shard.name}")
    base = tiny_cfg(clip_pretrained=tiny_checkpoint)
    run_old = dataclasses.replace(base, input=str(old), output=str(tmp_path / "run-old"))
    assert run(run_old).exit_code == 0
    old_summary = json.loads((tmp_path / "run-old/keep/summary.json").read_text())

    # frozen: the new crawl alone, with the old run's threshold
    frozen = dataclasses.replace(
        base,
        input=str(new),
        output=str(tmp_path / "run-new"),
        threshold_from=str(tmp_path / "run-old/keep/summary.json"),
    )
    result = run(frozen)
    assert result.exit_code == 0
    scores = read_scores(str(tmp_path / "run-new")).to_pandas()
    expected = sorted(
        scores[
            (scores.status == "ok") & (scores.tmars_score >= np.float32(old_summary["threshold"]))
        ].uid
    )
    assert _keep(tmp_path / "run-new") == expected
    assert result.summary["threshold"] == old_summary["threshold"]

    # refit: a new dated run over the same crawl, quantile refitted over both earlier runs;
    # every shard was already scored by an earlier run with the same config: nothing rescored
    refit = dataclasses.replace(
        base,
        input=str(new),
        output=str(tmp_path / "run-refit"),
        scores_from=[str(tmp_path / "run-old"), str(tmp_path / "run-new")],
    )
    again = run(refit)
    assert again.summary["scoring"]["shards"]["scored_now"] == 0
    one_run = dataclasses.replace(base, input=str(union), output=str(tmp_path / "run-union"))
    assert run(one_run).exit_code == 0
    assert _keep(tmp_path / "run-refit") == _keep(tmp_path / "run-union")
    assert (tmp_path / "run-refit/keep/keep.npy").read_bytes() == (
        tmp_path / "run-union/keep/keep.npy"
    ).read_bytes()
