"""The driver's weights check runs its child interpreter once per unchanged checkpoint: a
rerun with the same files skips it, and any change to the checkpoint or the model config - or
its removal - brings the full check (and its error) back."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import TINY_CONFIG, tiny_cfg
from tmars_ray import job
from tmars_ray.models import weights_seen


@pytest.fixture
def counted_children(monkeypatch, tmp_path):
    """Each check's child interpreter, counted; the memo in its own cache dir."""
    monkeypatch.setenv("TMARS_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[list[str]] = []
    real = subprocess.run

    def counting(cmd, *args, **kwargs):
        calls.append(cmd)
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting)
    return calls


def test_a_passed_check_is_not_run_again_until_a_file_changes(
    tiny_checkpoint, tmp_path, counted_children
):
    ckpt = tmp_path / "tiny.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    config = tmp_path / "tmars-tiny-vit.json"
    shutil.copy(TINY_CONFIG, config)
    cfg = tiny_cfg(clip_model=str(config), clip_pretrained=str(ckpt))

    assert job.check_weights_apart(cfg) == []
    assert len(counted_children) == 1
    assert job.check_weights_apart(cfg) == []
    assert len(counted_children) == 1  # remembered: no child

    spec = cfg.clip_specs()[0]
    assert weights_seen.passed([spec])
    ckpt.write_bytes(ckpt.read_bytes())  # rewritten in place: new mtime and ctime
    assert not weights_seen.passed([spec])  # so the next check runs its child again
    weights_seen.remember(spec, str(ckpt))
    config.write_text(config.read_text())  # the model config edited
    assert not weights_seen.passed([spec])
    weights_seen.remember(spec, str(ckpt))
    assert weights_seen.passed([spec])
    os.remove(ckpt)
    assert not weights_seen.passed([spec])


def test_failures_and_random_weights_are_never_remembered(tmp_path, counted_children):
    cfg = tiny_cfg(clip_pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(job.JobError, match="no checkpoint at"):
        job.check_weights_apart(cfg)
    randomly = tiny_cfg(clip_pretrained="random", allow_random_weights=True)
    assert len(job.check_weights_apart(randomly)) == 1  # the random-weights warning
    assert len(counted_children) == 2
    assert not weights_seen.passed(cfg.clip_specs() + randomly.clip_specs())
    assert not (tmp_path / "cache" / weights_seen.CACHE_FILE).exists()


def test_another_spec_does_not_inherit_a_pass(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TMARS_CACHE_DIR", str(tmp_path / "cache"))
    spec = tiny_cfg(clip_pretrained=tiny_checkpoint).clip_specs()[0]
    weights_seen.remember(spec, tiny_checkpoint)
    assert weights_seen.passed([spec])
    other = tiny_cfg(clip_model="ViT-B-32", clip_pretrained=tiny_checkpoint).clip_specs()[0]
    assert not weights_seen.passed([other])
    assert not weights_seen.passed([])
