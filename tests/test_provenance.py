"""Provenance (issue 25 item 3): a threshold, a refit or a set operation over scores made under
other settings is refused, naming the fields; --allow-mismatched-scores overrides and
summary.json records it. Real tiny runs: one scored with open_clip's PIL preprocessing, one
with the batched torch preprocessing (scores within 2e-3, but not the same scores)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.conftest import tiny_cfg
from tmars_ray.job import run
from tmars_ray.selection import select as sel
from tmars_ray.selection.provenance import ProvenanceMismatch


def test_mismatched_scores_are_refused_naming_the_field(ray_session, tiny_checkpoint, tmp_path):
    from tmars_ray.devtools.synth import write_pool

    pool = str(tmp_path / "pool")
    write_pool(pool, samples=8, shards=2, seed=41)
    run_a, run_b = str(tmp_path / "run-a"), str(tmp_path / "run-b")
    base = tiny_cfg(input=pool, clip_pretrained=tiny_checkpoint)
    a = run(dataclasses.replace(base, output=run_a))
    assert a.exit_code == 0
    assert a.summary["provenance"]["fields"]["clip_preprocess"] == "auto"
    summary_a = f"{run_a}/keep/summary.json"

    b_cfg = dataclasses.replace(
        base, output=run_b, clip_preprocess="torch", threshold_from=summary_a
    )
    with pytest.raises(ProvenanceMismatch, match="clip_preprocess") as err:
        run(b_cfg)
    assert "--threshold-from" in str(err.value) and "'torch'" in str(err.value)
    assert "clip_model" not in str(err.value)  # only the fields that differ are named

    # the same check for set algebra (selection alone, over the scored runs)
    for kw in ({"intersect": [f"{run_a}/keep"]}, {"union": [f"{run_a}/keep/keep.parquet"]}):
        with pytest.raises(ProvenanceMismatch, match="clip_preprocess"):
            sel.select([run_b], str(tmp_path / "sel"), fraction=0.5, **kw)

    # the same refusal from the command line: exit 2, the field named, nothing kept
    from click.testing import CliRunner

    from tmars_ray.cli import main

    cli_out = str(tmp_path / "sel-cli")
    args = ["select", "--scores", run_b, "--output", cli_out, "--fraction", "0.5"]
    res = CliRunner().invoke(main, [*args, "--intersect", f"{run_a}/keep"])
    assert res.exit_code == 2, res.output
    assert "clip_preprocess" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "sel-cli/keep/summary.json").exists()
    res = CliRunner().invoke(main, ["select", "--scores", run_a, "--output", cli_out,
                                    "--fraction", "0.5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "complete: all 2 input shard(s) are scored" in res.output  # the completeness line

    # an older summary.json without the provenance record: the run folder's fingerprints
    doc = json.loads((tmp_path / "run-a/keep/summary.json").read_text())
    doc.pop("provenance")
    (tmp_path / "run-a/keep/summary.json").write_text(json.dumps(doc))
    with pytest.raises(ProvenanceMismatch, match="clip_preprocess"):
        sel.select([run_b], str(tmp_path / "sel"), threshold=0.0, threshold_from=summary_a)

    # overridden: used, and recorded with the differing field
    b = run(dataclasses.replace(b_cfg, allow_mismatched_scores=True))
    assert b.exit_code == 0
    assert b.summary["scoring"]["shards"]["scored_now"] == 0  # the scores were kept
    prov = json.loads((tmp_path / "run-b/keep/summary.json").read_text())["provenance"]
    assert prov["mismatched_scores_allowed"] is True
    (mismatch,) = prov["mismatches"]
    assert mismatch["role"] == "--threshold-from" and list(mismatch["fields"]) == [
        "clip_preprocess"
    ]
    assert mismatch["fields"]["clip_preprocess"] == {"here": "torch", "there": "auto"}

    # same settings: checked and accepted
    same = sel.select([run_a], str(tmp_path / "same"), fraction=0.5, intersect=[run_a])
    assert same["provenance"]["checked"] == [{"role": "--intersect", "source": run_a}]
    assert not same["provenance"]["mismatches"]
