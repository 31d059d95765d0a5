"""Config builds the models' settings; the old `torch_threads` key still loads."""

from __future__ import annotations

import pytest

from tmars_ray.config import Config
from tmars_ray.models.settings import ClipSpec, DetectorSettings, ScorerSettings


def test_settings_built_from_config(tmp_path) -> None:
    cfg = Config(
        device="cpu",
        det_limit_side_len=640,
        det_batch_size=4,
        det_min_text_chars=2,
        clip_model="m",
        clip_pretrained="p",
        clip_model_2="m2",
        clip_pretrained_2="p2",
        clip_batch_size=16,
        precision="bf16",
        score_original=False,
        recognize_text=True,
        mask_ring=5,
    )
    det = cfg.detector_settings(threads=3)
    assert isinstance(det, DetectorSettings)
    assert (det.device, det.threads, det.limit_side_len, det.batch_size, det.min_text_chars) == (
        "cpu", 3, 640, 4, 2,
    )  # fmt: skip
    assert cfg.clip_specs() == [ClipSpec("m", "p", False, 0), ClipSpec("m2", "p2", False, 1)]
    assert cfg.scoring_settings(2) == ScorerSettings(
        device="cpu", precision="bf16", batch_size=16, threads=2, score_original=False
    )
    step = cfg.tmars_settings(det_threads=1, score_threads=2)
    assert step.mask.ring == 5 and step.recognizer is not None and step.recognizer.threads == 2
    assert Config(recognize_text=False).recognizer_settings() is None
    assert Config(model_threads=0).model_thread_count(0.75) == 1
    assert Config(model_threads=0).model_thread_count(2.5) == 3
    assert Config(model_threads=4).model_thread_count(0.75) == 4


def test_torch_threads_is_an_alias_of_model_threads(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("torch_threads: 3\n")
    assert Config.load(str(path)).model_threads == 3
    assert Config.from_dict({"model_threads": 2}).model_threads == 2
    with pytest.raises(ValueError, match="not both"):
        Config.from_dict({"model_threads": 2, "torch_threads": 3})
