"""The per-sample T-MARS step: one implementation behind the job's stages and `tmars inspect`."""

from __future__ import annotations

import math

import numpy as np

from tests.conftest import tiny_cfg
from tmars_ray.data import schema
from tmars_ray.devtools.synth import generate_sample
from tmars_ray.models.tmars import TmarsStep


def _samples():
    samples = [generate_sample(61, i) for i in range(30)]
    return [s for s in samples if s.lines][:3] + [s for s in samples if not s.lines][:2]


def test_step_equals_the_stages_and_maps_errors_to_statuses(tiny_checkpoint) -> None:
    from tests.engine.test_stages import _batch
    from tmars_ray.data.decode import decode_image
    from tmars_ray.engine.stages import DetectStage, MaskScoreStage

    samples = _samples()
    cfg = tiny_cfg(clip_pretrained=tiny_checkpoint)
    batch = _batch(samples)
    rows = MaskScoreStage(cfg)(DetectStage(cfg)(batch)).to_pylist()[: len(samples)]
    step = TmarsStep(cfg.tmars_settings())
    images = [decode_image(b, 10**9)[0] for b in batch["image_bytes"][: len(samples)]]
    broken = np.zeros((40, 40, 5), np.uint8)  # the detector cannot read 5 channels
    out = step([*images, broken], [s.caption for s in samples] + ["x"], keep_masked=True)
    for row, res, image in zip(rows, out, images):
        assert res.status == row["status"] == schema.OK
        assert res.n_text_boxes == row["n_text_boxes"]
        assert res.scores["clip_score"] == row["clip_score"]
        assert res.scores["tmars_score"] == row["tmars_score"]
        assert np.allclose(np.concatenate(res.boxes or [[]]), np.concatenate(row["boxes"] or [[]]))
        assert res.masked is not None and res.masked.shape == image.shape
    assert sum(r.n_text_boxes > 0 for r in out) >= 2
    assert out[-1].status == schema.DETECT_ERROR and out[-1].error
    assert not out[-1].scores


def test_without_the_original_encode_clip_score_is_null(tiny_checkpoint) -> None:
    from tests.engine.test_stages import _batch
    from tmars_ray.engine.stages import DetectStage, MaskScoreStage

    samples = _samples()
    both = tiny_cfg(clip_pretrained=tiny_checkpoint)
    only = tiny_cfg(clip_pretrained=tiny_checkpoint, score_original=False)
    assert both.scoring_fingerprint() != only.scoring_fingerprint()
    batch = DetectStage(both)(_batch(samples))
    full = MaskScoreStage(both)(batch).to_pylist()[: len(samples)]
    rows = MaskScoreStage(only)(batch).to_pylist()[: len(samples)]
    for a, b in zip(full, rows):
        assert b["status"] == schema.OK and b["clip_score"] is None
        assert math.isclose(a["tmars_score"], b["tmars_score"], abs_tol=1e-6)


def test_masking_on_the_device_path_matches_the_host_path(tiny_checkpoint) -> None:
    # with torch preprocessing the image moves to the models' device once and is masked there
    from dataclasses import replace

    from tmars_ray.models.preprocess import SCORE_TOLERANCE
    from tmars_ray.models.tmars import DetectStep, MaskScoreStep

    samples = _samples()
    cfg = tiny_cfg(clip_pretrained=tiny_checkpoint)
    images = [s.image for s in samples]
    dets = DetectStep(cfg.detector_settings())(images)
    polys = [d.polygons for d in dets]
    caps = [s.caption for s in samples]
    host = MaskScoreStep(cfg.clip_specs(), cfg.scoring_settings(), cfg.mask_settings())
    dev = MaskScoreStep(
        cfg.clip_specs(), replace(cfg.scoring_settings(), preprocess="torch"), cfg.mask_settings()
    )
    assert not host.on_device and dev.on_device
    a = host(images, polys, caps, keep_masked=True)
    b = dev(images, polys, caps, keep_masked=True)
    assert sum(r.n_text_boxes > 0 for r in a) >= 2
    for x, y in zip(a, b):
        assert y.status == x.status == schema.OK
        assert (y.n_text_boxes, y.text_area) == (x.n_text_boxes, x.text_area)
        assert np.array_equal(y.masked, x.masked)
        for name in ("clip_score", "tmars_score"):
            assert abs(y.scores[name] - x.scores[name]) <= SCORE_TOLERANCE
