"""Config: YAML + CLI overrides, validation, the fingerprint that guards resume; CLI help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tmars_ray.cli import main
from tmars_ray.config import Config

REPO = Path(__file__).resolve().parent.parent


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "clip_model: ViT-L-14\nfraction: 0.3\nintersect: [a/keep, b/keep]\n"
        "actor_resources: {accel: 1}\n"
    )
    cfg = Config.load(str(path), fraction=0.2, det_batch_size=None)
    assert cfg.clip_model == "ViT-L-14"
    assert cfg.fraction == 0.2  # CLI wins over YAML
    assert cfg.det_batch_size == 8  # None = not given: default stays
    assert cfg.intersect == ["a/keep", "b/keep"] and cfg.actor_resources == {"accel": 1}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"clip_modle": "x"}, "unknown config key"),
        ({"method": "best"}, "choose one of"),
        ({"fraction": 1.5}, "within"),
        ({"fraction": 0.5, "threshold": 0.3}, "either fraction or threshold"),
        ({"det_actors_min": 3, "det_actors_max": 2}, "min <= max"),
        ({"clip_batch_size": 0}, ">= 1"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=message):
        Config.load(None, **bad)


def test_yaml_round_trip(tmp_path):
    """A dumped config loads back equal, keys in declaration order; the old key still loads."""
    cfg = Config.load(
        None, clip_model="ViT-L-14", fraction=0.25, intersect=["a/keep"], model_threads=2,
        actor_resources={"accel": 1.0}, input="/pool", report=False, det_num_gpus=0.5,
    )  # fmt: skip
    path = tmp_path / "dump.yaml"
    path.write_text(cfg.to_yaml())
    assert Config.load(str(path)) == cfg
    assert list(yaml.safe_load(cfg.to_yaml())) == [f.name for f in dataclasses.fields(Config)]
    assert Config.load(None, torch_threads=3).model_threads == 3


def test_each_concern_module_declares_one_concern():
    """Config's fields are its concern classes' fields, each class holding only its groups."""
    from tmars_ray.config import inputs, job, models, resources, selection

    groups = {
        inputs.InputOptions: {"io"},
        models.ModelOptions: {"detection", "scoring"},
        resources.ResourceOptions: {"resources"},
        selection.SelectionOptions: {"selection"},
        job.JobOptions: {"job"},
    }
    names = []
    for cls, allowed in groups.items():
        fields = dataclasses.fields(cls)
        assert {f.metadata["group"] for f in fields} == allowed, cls
        names += [f.name for f in fields]
    assert names == [f.name for f in dataclasses.fields(Config)]


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("clip_model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(yaml.YAMLError):
        Config.load(str(path))


def test_fingerprint_changes_with_scoring_settings_only():
    base = Config()
    assert (
        base.scoring_fingerprint() == Config(fraction=0.3, det_actors_max=4).scoring_fingerprint()
    )
    assert base.scoring_fingerprint() != Config(clip_model="ViT-L-14").scoring_fingerprint()
    assert base.scoring_fingerprint() != Config(det_limit_side_len=640).scoring_fingerprint()


def test_shipped_job_configs_load():
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        cfg = Config.load(str(path))
        assert cfg.method == "tmars", path


def test_every_config_field_is_a_cli_option_of_run():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in result.output, f.name


def test_cli_reports_bad_config_without_traceback():
    result = CliRunner().invoke(main, ["run", "--input", "x", "--output", "y", "--fraction", "2"])
    assert result.exit_code == 2 and "fraction" in result.output
    assert "Traceback" not in result.output


def test_help_teaches():
    result = CliRunner().invoke(main, ["--help"])
    for command in ("run", "score", "select", "report", "inspect", "demo-pool"):
        assert command in result.output
    assert "Examples" in result.output


def test_cli_select_reselects_a_score_table(tmp_path):
    """`tmars select` on a score folder: clip-score at 30%, then a frozen threshold."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tmars_ray.data import schema

    rng = np.random.default_rng(3)
    n = 50
    uids = [f"{i:032x}" for i in rng.permutation(1000)[:n]]
    clip = np.round(rng.random(n), 2).astype(np.float32)  # ties on purpose
    status = np.where(np.arange(n) % 10 == 0, "decode_error", "ok")
    table = pa.table(
        {
            "uid": uids,
            "shard": ["s"] * n,
            "key": [str(i) for i in range(n)],
            "status": status,
            "width": pa.array([10] * n, pa.int32()),
            "height": pa.array([10] * n, pa.int32()),
            "n_text_boxes": pa.array([0] * n, pa.int32()),
            "text_area": pa.array([0.0] * n, pa.float32()),
            "boxes": pa.array([[]] * n, pa.list_(pa.list_(pa.float32()))),
            "clip_score": clip,
            "tmars_score": clip,
            "derived_uid": [False] * n,
        },
        schema=schema.SCORE_SCHEMA,
    )
    (tmp_path / "scores").mkdir()
    pq.write_table(table, tmp_path / "scores" / "part.parquet")
    out = tmp_path / "sel"
    result = CliRunner().invoke(
        main,
        [
            "select",
            "--scores",
            str(tmp_path / "scores"),
            "--output",
            str(out),
            "--method",
            "clip-score",
            "--fraction",
            "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    ok = status == "ok"
    order = np.lexsort((np.array(uids)[ok], -clip[ok]))
    k = int(0.3 * ok.sum())
    expected = sorted(np.array(uids)[ok][order[:k]])
    assert pq.read_table(out / "keep" / "keep.parquet")["uid"].to_pylist() == expected
    frozen = CliRunner().invoke(
        main,
        [
            "select",
            "--scores",
            str(tmp_path / "scores"),
            "--output",
            str(tmp_path / "sel2"),
            "--method",
            "clip-score",
            "--threshold-from",
            str(out / "keep" / "summary.json"),
        ],
    )
    assert frozen.exit_code == 0, frozen.output
    thr = clip[ok][order[k - 1]]
    assert pq.read_table(tmp_path / "sel2" / "keep" / "keep.parquet")["uid"].to_pylist() == sorted(
        np.array(uids)[ok][clip[ok] >= thr]
    )
