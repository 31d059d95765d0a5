"""`make paper` in miniature: the experiment's code paths through the real job (demo model,
text recognition, `tmars select`), DataComp's rule, the claim rule and the resumable caches.
The figures themselves are a benchmark (BENCHMARKS.md section 7), never asserted here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tmars_ray.devtools import paper, paper_report
from tmars_ray.devtools.synth import sample_uid

# the scoring config `make paper` uses (a rerun must score like the first run to resume)
CONFIG = str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "local-cpu.yaml")

SMALL = paper.PaperSettings(
    samples=96, shards=2, pools=1, seeds=2, batch_size=16, image_size=32, per_class=1, threads=1
)


def _run(visual: float) -> dict:
    return {f"{m}_acc": visual for m in paper_report.METRICS} | {"kept": 10, "loss": 1.0}


def test_a_claim_needs_a_difference_beyond_both_spreads() -> None:
    runs = {
        "a": [_run(0.60), _run(0.62), _run(0.64)],  # mean 0.62, std 0.02
        "b": [_run(0.50), _run(0.52), _run(0.54)],  # mean 0.52, std 0.02
        "c": [_run(0.55), _run(0.63), _run(0.47)],  # mean 0.55, std 0.08
    }
    summary = paper_report.aggregate(runs)
    assert summary["a"]["visual_acc"] == pytest.approx(0.62)
    assert summary["a"]["visual_std"] == pytest.approx(0.02)
    above = paper_report.claim(summary, runs, "a", "b")
    assert above["above"] and above["paired_wins"] == "3/3"
    assert above["difference"] == pytest.approx(0.10) and above["spread"] == pytest.approx(0.04)
    # a higher mean, and higher in 2 of 3 paired runs, but within c's spread: not claimed
    within = paper_report.claim(summary, runs, "a", "c")
    assert within["difference"] > 0 and not within["above"]
    assert within["paired_wins"] == "2/3"
    # one run has no spread: never a claim
    one = {"a": [_run(0.9)], "b": [_run(0.1)]}
    single = paper_report.aggregate(one)
    assert math.isnan(single["a"]["visual_std"])
    assert not paper_report.claim(single, one, "a", "b")["above"]


def test_the_pool_makeup_counts_each_kind_of_pair() -> None:
    from tmars_ray.devtools.synth import generate_sample, sample_metadata

    records = [sample_metadata(generate_sample(7, i, (160, 320))) for i in range(60)]
    m = paper.pool_makeup(records)
    assert sum(m[c] for c in ("picture", "text", "both", "neither")) == pytest.approx(1.0, abs=3e-4)
    assert m["text_in_caption"] == pytest.approx(m["text"] + m["both"], abs=2e-4)
    with_text = sum(bool(r["text_lines"]) for r in records) / 60
    assert m["any_text"] == pytest.approx(with_text, abs=1e-4)
    assert m["picture_with_unrelated_text"] <= m["picture"]


@pytest.fixture(scope="module")
def small_experiment(ray_session, tmp_path_factory):
    work = tmp_path_factory.mktemp("paper")
    bench = work / "BENCHMARKS.md"
    bench.write_text(
        "# Benchmarks\n\n## 7. The paper\n\n<!-- bench:paper -->\nold\n<!-- /bench:paper -->\n"
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.__dict__.items()]
    return work, bench, flags


def test_a_small_experiment_end_to_end(small_experiment, capsys) -> None:
    work, bench, flags = small_experiment
    assert (
        paper.main(
            ["--output", str(work / "out"), "--config", CONFIG, "--write", str(bench), *flags]
        )
        == 0
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["filters"]) == set(paper.FILTERS)
    for row in last["filters"].values():
        assert row["runs"] == SMALL.seeds * SMALL.pools
        assert {"visual_acc", "visual_std", "typographic_acc", "typographic_std"} <= set(row)
        assert 0.0 <= row["visual_acc"] <= 1.0 and row["visual_std"] >= 0.0
    text = bench.read_text()
    assert "old" not in text and "REDUCED" in text and "tmars-and-clip-score" in text
    assert (work / "benchmarks" / "paper.png").stat().st_size > 1000  # the plot, beside the file
    assert "![accuracy by filter](benchmarks/paper.png)" in text

    # DataComp's rule: every filter's model saw the same number of samples, one pool's worth
    results = [
        json.loads((work / "out" / "models" / f).read_text())
        for f in os.listdir(work / "out" / "models")
        if f.endswith(".json")
    ]
    assert len(results) == len(paper.FILTERS) * SMALL.seeds
    assert {r["samples_seen"] for r in results} == {SMALL.steps * SMALL.batch_size}
    assert SMALL.steps * SMALL.batch_size == SMALL.samples  # 96 = 6 x 16


def test_keep_lists_come_from_one_score_table(small_experiment) -> None:
    work, _, _ = small_experiment
    kept, facts = paper.keep_lists(str(work / "out"), paper.POOL_SEEDS[0], SMALL, CONFIG)
    assert facts["failed"] == 0 and len(kept["none"]) == SMALL.samples
    half = SMALL.samples // 2
    assert len(kept["clip-score"]) == len(kept["tmars"]) == half
    both = set(kept["tmars-and-clip-score"].tolist())
    assert both == set(kept["tmars"].tolist()) & set(kept["clip-score"].tolist())
    assert set(kept["text-match"].tolist()) < set(kept["none"].tolist())
    # text-match by `select` is the run's own text-match keep-list
    name = paper.pool_name(paper.POOL_SEEDS[0], SMALL)
    own = pq.read_table(work / "out" / f"run-{name}" / "keep" / "keep.parquet")["uid"]
    index = {sample_uid(paper.POOL_SEEDS[0], i): i for i in range(SMALL.samples)}
    assert sorted(index[u] for u in own.to_pylist()) == kept["text-match"].tolist()


def test_a_rerun_reuses_every_cached_model(small_experiment, monkeypatch) -> None:
    work, _, _ = small_experiment

    def never(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(paper, "train_on", never)
    res = paper.experiment(str(work / "out"), SMALL, CONFIG)
    assert all(len(v) == SMALL.seeds for v in res["runs"].values())
    # a keep-list that changed (other scores) is trained again, not served from the cache
    images = np.zeros((SMALL.samples, SMALL.image_size, SMALL.image_size, 3), np.uint8)
    with pytest.raises(AssertionError, match="trained again"):
        paper.run_model(
            str(work / "out"), paper.POOL_SEEDS[0], "none", 0, np.arange(SMALL.samples - 1),
            (images, [""] * SMALL.samples), ((), ()), SMALL, "",
        )  # fmt: skip
    # another training setting is another experiment: not served from the cache
    with pytest.raises(AssertionError, match="trained again"):
        paper.experiment(
            str(work / "out"), paper.PaperSettings(**{**SMALL.__dict__, "seeds": 3}), None
        )


def test_settings_the_experiment_refuses(tmp_path) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        paper.experiment(str(tmp_path), paper.PaperSettings(image_size=48), None)
    with pytest.raises(ValueError, match="pools"):
        paper.experiment(str(tmp_path), paper.PaperSettings(pools=3), None)
    assert np.all(np.diff(paper.POOL_SEEDS) != 0) and paper.EVAL_SEED not in paper.POOL_SEEDS
