"""Our ONNX path (own normalisation + DB post-processing) gives PaddleOCR's own boxes, with the
real packaged PP-OCRv5 detector, on generated images with rotated text and on real photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tmars_ray.devtools.synth import generate_sample
from tmars_ray.models import db
from tmars_ray.models.detect import TextDetector, _paddleocr_detector
from tmars_ray.models.settings import DetectorSettings


def _images() -> list[np.ndarray]:
    # a seed no other test uses; 40 images of 160-640 px, ~75% with text (some rotated)
    return [generate_sample(4242, i).image for i in range(40)]


@pytest.mark.parametrize("box_type", ["quad", "poly"])
def test_boxes_equal_paddleocr(box_type: str) -> None:
    s = DetectorSettings(device="cpu", threads=2, box_type=box_type, canvas_step=32)
    ours = TextDetector(s)
    assert ours._session is not None and ours._det is None  # the ONNX path, no PaddleX
    theirs = _paddleocr_detector(s, ours.model_name, ours.model_dir, "cpu")
    found = 0
    for image in _images():
        (mine,) = ours.detect([image])
        item = ours._prepare(0, image)
        (ref,) = theirs.predict([item.resized], batch_size=1)
        expected = ours._to_original(item, ref["dt_polys"], ref["dt_scores"])
        assert len(mine.polygons) == len(expected.polygons)
        for a, b in zip(mine.polygons, expected.polygons):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(mine.scores, expected.scores, rtol=1e-6)
        found += len(mine.polygons)
    assert found >= 20  # the comparison covered real boxes, not only empty results


def test_thresholds_and_degenerate_maps() -> None:
    prob = np.zeros((64, 96), np.float32)
    prob[20:30, 10:60] = 0.9  # a text-like bar
    prob[50:52, 80:82] = 0.9  # a speck: shorter side < MIN_SIZE
    polys, scores = db.polygons(prob, db.DBParams())
    assert len(polys) == 1 and scores[0] == pytest.approx(0.9, abs=1e-3)
    x0, y0 = polys[0].min(0)
    x1, y1 = polys[0].max(0)
    assert x0 < 10 and x1 > 59 and y0 < 20 and y1 > 29  # grown outward (unclip)
    assert db.polygons(prob, db.DBParams(box_thresh=0.95))[0] == []
    assert db.polygons(np.zeros((32, 32), np.float32), db.DBParams()) == ([], [])
    with pytest.raises(ValueError, match="box_type"):
        db.polygons(prob, db.DBParams(box_type="circle"))


def test_export_options_are_honoured(tmp_path: Path) -> None:
    from tmars_ray.models.detect import _normalisation, _yml, materialize_model_dir

    _, packaged = materialize_model_dir("PP-OCRv5_mobile_det", tmp_path)
    yml = (Path(packaged) / "inference.yml").read_text()
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(Path(packaged) / "inference.onnx", export / "inference.onnx")
    # a DB option models/db.py does not implement: PaddleOCR runs that export
    (export / "inference.yml").write_text(
        yml.replace("box_type: quad}", "box_type: quad, score_mode: slow}")
    )
    det = TextDetector(DetectorSettings(model=str(export), device="cpu", threads=1))
    assert det._session is None and det._det is not None
    assert TextDetector(DetectorSettings(model=packaged, device="cpu"))._session is not None
    # the export's own normalisation is used (here mean = std = 0.5)
    (export / "inference.yml").write_text(
        yml.replace("mean: [0.485, 0.456, 0.406]", "mean: [0.5, 0.5, 0.5]").replace(
            "std: [0.229, 0.224, 0.225]", "std: [0.5, 0.5, 0.5]"
        )
    )
    alpha, beta = _normalisation(_yml(export))
    np.testing.assert_allclose(alpha, 2 / 255, rtol=1e-6)
    np.testing.assert_allclose(beta, -1.0, rtol=1e-6)
