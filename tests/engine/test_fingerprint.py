"""The scoring fingerprint covers what changes a score - models and weights, detector settings,
device type, precision, batch size where it matters - and a mismatch names the field."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from tmars_ray.config import Config
from tmars_ray.engine.fingerprint import warn_version_changes
from tmars_ray.engine.pipeline import check_fingerprints
from tmars_ray.run import manifest
from tmars_ray.run.manifest import ManifestWriter, RunState, ShardRecord


def fp(**kw) -> str:
    return Config(**kw).scoring_fingerprint()


def test_device_precision_and_batch_size_change_the_fingerprint():
    cpu = fp(device="cpu")
    assert fp(device="cuda") != cpu
    assert fp(device="cuda", precision="fp16") != fp(device="cuda", precision="fp32")
    assert fp(device="cuda", clip_batch_size=64) != fp(device="cuda", clip_batch_size=32)
    # on CPU scores are batch-invariant and autocast is off: neither changes a score
    assert fp(device="cpu", clip_batch_size=64) == cpu == fp(device="cpu", precision="fp16")
    assert fp(device="auto", score_num_gpus=0.5, det_num_gpus=0.5) == fp(device="cuda")
    assert fp(det_thresh=0.2) != fp(det_thresh=0.3)


def test_checkpoints_are_identified_by_content_not_path(tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x" * 100)
    shutil.copy(a, tmp_path / "copy.safetensors")
    assert fp(clip_pretrained=str(a)) != fp(clip_pretrained=str(tmp_path / "copy.safetensors"))
    (tmp_path / "sub").mkdir()
    shutil.copy(a, tmp_path / "sub" / "a.safetensors")
    assert fp(clip_pretrained=str(a)) == fp(clip_pretrained=str(tmp_path / "sub" / "a.safetensors"))
    a.write_bytes(b"y" * 100)  # same path, other weights
    assert fp(clip_pretrained=str(a)) != fp(clip_pretrained=str(tmp_path / "sub" / "a.safetensors"))


def _run_with(tmp_path, cfg: Config) -> str:
    run = str(tmp_path / "run")
    fingerprint = cfg.scoring_fingerprint()
    manifest.write_fingerprint(run, fingerprint, cfg.fingerprint_fields())
    w = ManifestWriter(run)
    w.add(ShardRecord("s.tar", "s-1", ["scores/s-1/p.parquet"], 1, fingerprint))
    w.close()
    return run


def test_a_mismatch_refuses_and_names_the_fields(tmp_path):
    run = _run_with(tmp_path, Config(device="cpu"))
    check_fingerprints(Config(device="cpu"), RunState.load(run), run)  # same settings: fine
    with pytest.raises(RuntimeError) as err:
        check_fingerprints(Config(device="cuda", precision="fp16"), RunState.load(run), run)
    msg = str(err.value)
    assert "clip_device: 'cpu' there, 'cuda' now" in msg and "precision: 'fp32'" in msg


def test_a_version_only_change_warns(tmp_path, caplog):
    cfg = Config(device="cpu")
    run = _run_with(tmp_path, cfg)
    path = tmp_path / "run" / "fingerprints" / f"{cfg.scoring_fingerprint()}.json"
    stored = json.loads(path.read_text())
    stored["versions"]["torch"] = "1.0.0"
    path.write_text(json.dumps(stored))
    with caplog.at_level(logging.WARNING):
        diffs = warn_version_changes(cfg, run, cfg.scoring_fingerprint())
    assert diffs and "torch: '1.0.0' there" in diffs[0]
    assert "library version changed" in caplog.text
    check_fingerprints(cfg, RunState.load(run), run)  # versions alone never refuse
