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
