"""Text detection on real rendered images with the real packaged PP-OCRv5 detector (no mocks)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tmars_ray.models.detect import (
    DetResult,
    TextDetector,
    _Item,
    canvas_shape,
    flatten_polygons,
    materialize_model_dir,
    target_shape,
    to_bgr,
)
from tmars_ray.models.mask import mask_text, rasterize
from tmars_ray.models.settings import DetectorSettings, RecognizerSettings

FONT = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
FONT_BOLD = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")


def _gradient(w: int, h: int, c0=(40, 90, 160), c1=(220, 200, 120)) -> Image.Image:
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    row = (1 - t) * np.array(c0, np.float32) + t * np.array(c1, np.float32)
    return Image.fromarray(np.repeat(row, h, axis=0).round().astype(np.uint8))


def _render(
    bg: Image.Image, lines: list[tuple[str, tuple[int, int], int, tuple]]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw (text, (x, y), size, colour) lines; return the image and each line's ink mask."""
    img = bg.copy()
    draw = ImageDraw.Draw(img)
    inks = []
    for text, xy, size, colour in lines:
        font = ImageFont.truetype(FONT_BOLD if size < 30 else FONT, size)
        layer = Image.new("L", img.size, 0)
        ImageDraw.Draw(layer).text(xy, text, font=font, fill=255)
        inks.append(np.asarray(layer) > 0)
        draw.text(xy, text, font=font, fill=colour)
    return np.asarray(img), inks


def _covered(result: DetResult, ink: np.ndarray) -> float:
    union = np.zeros(ink.shape, bool)
    for p in result.polygons:
        union |= rasterize(p, ink.shape).astype(bool)
    return float((union & ink).sum() / ink.sum())


@pytest.fixture(scope="module")
def detector() -> TextDetector:
    return TextDetector(DetectorSettings(device="cpu", threads=2, batch_size=4))


@pytest.fixture(scope="module")
def text_image() -> tuple[np.ndarray, list[np.ndarray]]:
    return _render(
        _gradient(640, 480),
        [
            ("Summer Sale 50% off", (40, 40), 44, (255, 255, 255)),
            ("visit www.example.com today", (60, 220), 26, (10, 10, 10)),
            ("Open 9-17", (300, 380), 36, (120, 0, 0)),
        ],
    )


def test_boxes_found_where_text_was_drawn(detector: TextDetector, text_image) -> None:
    img, inks = text_image
    (res,) = detector.detect([img])
    assert res.error is None
    assert 3 <= len(res.polygons) <= 10  # DB may split a line into words
    for ink in inks:
        assert _covered(res, ink) >= 0.95
    for p in res.polygons:  # every box sits on some drawn text
        own = rasterize(p, img.shape[:2]).astype(bool)
        assert any((own & ink).any() for ink in inks)
        assert p.dtype == np.float32 and p.shape[1] == 2
    assert res.scores.shape == (len(res.polygons),) and (res.scores > 0.6).all()
    boxes = flatten_polygons(res.polygons)
    assert all(len(b) == 2 * len(p) for b, p in zip(boxes, res.polygons))


def _solid_shapes() -> np.ndarray:
    img = _gradient(640, 480, (250, 240, 230), (60, 60, 120))
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 60, 260, 260), fill=(200, 40, 40))
    draw.rectangle((360, 120, 560, 400), fill=(20, 120, 60))
    draw.polygon([(100, 420), (300, 300), (330, 460)], fill=(250, 220, 0))
    return np.asarray(img)


@pytest.mark.parametrize("step", [32, 128])
def test_no_boxes_on_text_free_images(detector: TextDetector, step: int) -> None:
    from skimage import data

    plain = np.full((300, 400, 3), (30, 160, 90), np.uint8)
    shapes = _gradient(640, 480, (250, 240, 230), (60, 60, 120))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((60, 60, 260, 260), outline=(200, 40, 40), width=4)
    draw.rectangle((360, 120, 560, 400), outline=(20, 120, 60), width=4)
    draw.line((100, 420, 330, 300), fill=(0, 0, 0), width=3)
    for k in range(6):
        draw.ellipse((50 + 90 * k, 200, 120 + 90 * k, 270), fill=(30 * k, 200 - 30 * k, 120))
    photos = [data.chelsea(), data.hubble_deep_field()]
    saved, detector.canvas_step = detector.canvas_step, step
    try:
        results = detector.detect([plain, np.asarray(shapes), *photos])
    finally:
        detector.canvas_step = saved
    assert [r.polygons for r in results] == [[]] * 4
    assert all(r.error is None for r in results)


def test_ocr_verification_drops_solid_shapes(detector: TextDetector, text_image) -> None:
    # DB alone fires on big solid blobs (the recogniser reads them as "O", "-" or a square);
    # verification keeps only boxes in which it reads >= 2 letters or digits
    shapes = _solid_shapes()
    assert len(detector.detect([shapes])[0].polygons) >= 2  # a known DB limitation
    verified = TextDetector(DetectorSettings(device="cpu", threads=2, min_text_chars=2))
    img, inks = text_image
    res_shapes, res_text = verified.detect([shapes, img])
    assert res_shapes.polygons == [] and res_shapes.error is None
    for ink in inks:
        assert _covered(res_text, ink) >= 0.95


def test_polygons_in_original_coordinates_after_resize(detector: TextDetector) -> None:
    img, (ink,) = _render(_gradient(2000, 1500), [("FRESH BREAD", (1100, 1150), 110, (0, 0, 0))])
    assert target_shape(1500, 2000, 960, "max") == (704, 960)  # the detector sees it shrunk
    (res,) = detector.detect([img])
    assert res.error is None and res.polygons
    assert _covered(res, ink) >= 0.95
    ys, xs = np.nonzero(ink)
    best = max(res.polygons, key=lambda p: rasterize(p, ink.shape)[ink].sum())
    assert abs(best[:, 0].min() - xs.min()) < 40 and abs(best[:, 0].max() - xs.max()) < 40
    assert abs(best[:, 1].min() - ys.min()) < 40 and abs(best[:, 1].max() - ys.max()) < 40


def _sized_text_images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    imgs, inks = [], []
    for w, h in [(320, 240), (700, 300), (300, 640), (500, 500), (1280, 720), (330, 250)]:
        img, (ink,) = _render(_gradient(w, h), [("Hello 2024", (20, h // 3), 40, (0, 0, 0))])
        imgs.append(img)
        inks.append(ink)
    return imgs, inks


def test_canvas_is_chosen_per_image_from_a_small_set() -> None:
    assert canvas_shape((224, 320), 32) == (224, 320)  # CPU: the network size itself
    assert canvas_shape((224, 320), 128) == (256, 384)
    shapes = {
        canvas_shape(target_shape(h, w, 960, "max"), 128)
        for h in range(8, 2000, 37)
        for w in range(8, 2000, 41)
    }
    assert len(shapes) <= 64 and all(h % 128 == 0 and w % 128 == 0 for h, w in shapes)


@pytest.mark.parametrize(("step", "pad_rows"), [(32, False), (128, False), (128, True)])
def test_boxes_of_a_sample_do_not_depend_on_its_batch(
    detector: TextDetector, step: int, pad_rows: bool
) -> None:
    # mixed sizes, several batch compositions: each image is stretched to its own canvas, so it
    # gets the same boxes alone and in any company (step 128 and blank rows up to the batch
    # size: the GPU defaults)
    imgs, inks = _sized_text_images()
    saved = detector.canvas_step, detector.pad_rows
    detector.canvas_step, detector.pad_rows = step, pad_rows
    try:
        alone = [detector.detect([im])[0] for im in imgs]
        batches = [[0, 1, 2, 3, 4, 5], [5, 3, 0], [4, 2], [1, 5, 0, 3, 2]]
        together = [(order, detector.detect([imgs[i] for i in order])) for order in batches]
    finally:
        detector.canvas_step, detector.pad_rows = saved
    for res, ink in zip(alone, inks):
        assert res.error is None and _covered(res, ink) >= 0.95
        for p in res.polygons:  # the canvas adds no box of its own (a padded one did)
            assert (rasterize(p, ink.shape).astype(bool) & ink).any()
    for order, results in together:
        for i, res in zip(order, results):
            assert len(res.polygons) == len(alone[i].polygons), (step, order, i)
            for p, q in zip(res.polygons, alone[i].polygons):
                assert np.array_equal(p, q), (step, order, i)
            np.testing.assert_allclose(res.scores, alone[i].scores, atol=1e-6)


def test_odd_inputs_do_not_crash(detector: TextDetector, text_image) -> None:
    img, inks = text_image
    gray = img.mean(axis=2).astype(np.uint8)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    deep = img.astype(np.uint16) * 257
    huge = np.zeros((4000, 6000, 3), np.uint8)
    huge[1000:1100, 500:1500] = 255
    tiny = [
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((5, 300, 3), np.uint8),
        np.zeros((0, 0, 3), np.uint8),
    ]
    results = detector.detect([gray, rgba, deep, huge, *tiny, img[::2, ::2]])
    for res in results[:3]:
        assert res.error is None
        assert _covered(res, inks[0]) >= 0.9
    assert results[3].error is None
    for res in results[4:7]:
        assert res.error is None and res.polygons == []
    assert results[7].error is None and results[7].polygons
    assert (
        to_bgr(gray).shape == img.shape and to_bgr(rgba)[0, 0].tolist() == img[0, 0, ::-1].tolist()
    )


def test_broken_images_do_not_lose_the_batch(detector: TextDetector, text_image) -> None:
    img, inks = text_image
    results = detector.detect([img, None, "not an image", np.zeros((4, 4, 4, 4)), img])
    assert len(results) == 5
    for k in (0, 4):
        assert results[k].error is None and _covered(results[k], inks[0]) >= 0.95
    for k in (1, 2, 3):
        assert results[k].error and results[k].polygons == []


def test_a_failing_detector_call_is_retried_image_by_image(
    detector: TextDetector, text_image
) -> None:
    # a 5-channel array makes the real network call fail for the whole group; the retry keeps
    # the good image's result and blames only the bad one
    img, inks = text_image
    good = to_bgr(img)
    bad = np.zeros((480, 640, 5), np.uint8)
    results = detector._run_group(
        [_Item(0, (480, 640), (480, 640), good), _Item(1, (480, 640), (480, 640), bad)]
    )
    assert results[0].error is None and _covered(results[0], inks[0]) >= 0.95
    assert results[1].error is not None and results[1].polygons == []


def test_detected_text_masks_away(detector: TextDetector, text_image) -> None:
    img, inks = text_image
    (res,) = detector.detect([img])
    masked = mask_text(img, res.polygons, ring=3)
    assert masked.n_text_boxes == len(res.polygons)
    assert 0.02 < masked.text_area < 0.3
    (after,) = detector.detect([masked.masked])
    assert after.polygons == []


def test_poly_box_type() -> None:
    det = TextDetector(DetectorSettings(device="cpu", threads=2, box_type="poly"))
    img, (ink,) = _render(_gradient(500, 200), [("curvy words here", (30, 70), 40, (0, 0, 0))])
    (res,) = det.detect([img])
    assert res.polygons and all(len(p) >= 4 for p in res.polygons)
    assert _covered(res, ink) >= 0.95


def test_materialize_model_dir(tmp_path: Path) -> None:
    name, d = materialize_model_dir("PP-OCRv5_mobile_det", tmp_path)
    assert name == "PP-OCRv5_mobile_det"
    assert {p.name for p in Path(d).iterdir()} == {"inference.onnx", "inference.yml"}
    # concurrent actors on one node end up with one directory and no leftovers
    out: list[tuple[str, str | None]] = []
    threads = [
        threading.Thread(
            target=lambda: out.append(materialize_model_dir("PP-OCRv5_mobile_det", tmp_path / "c"))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({o[1] for o in out}) == 1
    assert len(list((tmp_path / "c" / "det").iterdir())) == 1
    # a directory holding just an ONNX DB model is materialised with our yml
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((Path(d) / "inference.onnx").read_bytes())
    name2, d2 = materialize_model_dir(str(bare), tmp_path)
    assert (Path(d2) / "inference.yml").is_file() and name2 == "PP-OCRv5_mobile_det"
    # a PaddleOCR export (inference.yml present) is used in place
    assert materialize_model_dir(d, tmp_path) == ("PP-OCRv5_mobile_det", d)
    # other names go to PaddleOCR (download); a missing path is an error, not a name
    assert materialize_model_dir("PP-OCRv5_server_det") == ("PP-OCRv5_server_det", None)
    with pytest.raises(FileNotFoundError):
        materialize_model_dir(str(tmp_path / "missing" / "model.onnx"))


def test_paddle_engine_needs_paddle() -> None:
    import importlib.util

    if importlib.util.find_spec("paddle") is not None:
        pytest.skip("paddlepaddle is installed")
    with pytest.raises(RuntimeError, match="paddlepaddle"):
        TextDetector(DetectorSettings(engine="paddle"))


def test_recognize_reads_detected_text_and_not_masked_text(
    detector: TextDetector, text_image
) -> None:
    from tmars_ray.models.recognize import TextRecognizer

    rec = TextRecognizer(RecognizerSettings(device="cpu", threads=2))
    img, _ = text_image
    (res,) = detector.detect([img])
    text = rec.recognize(img, res.polygons).lower()
    for word in ("summer", "sale", "example.com", "open"):
        assert word in text
    masked = mask_text(img, res.polygons, ring=3).masked
    assert not any(w in rec.recognize(masked, res.polygons).lower() for w in ("summer", "sale"))
    assert rec.recognize(img, []) == ""


def test_the_normalised_graph_is_built_once_and_later_actors_skip_onnx(tmp_path: Path) -> None:
    """The detector graph with normalisation in front is cached by the hash of its inputs: a
    second detector reads the same bytes and never imports `onnx` (seconds of actor start)."""
    import subprocess
    import sys

    from tmars_ray.models.detect import (
        _normalisation,
        _normalised_graph,
        _onnx_file,
        _with_normalisation,
        _yml,
    )

    _, d = materialize_model_dir("PP-OCRv5_mobile_det", tmp_path)
    onnx, norm = _onnx_file(Path(d)), _normalisation(_yml(Path(d)))
    built = _normalised_graph(onnx, *norm, tmp_path)
    assert built == _with_normalisation(onnx, *norm)
    assert [p.suffix for p in (tmp_path / "detector-graphs").iterdir()] == [".onnx"]
    assert _normalised_graph(onnx, *norm, tmp_path) == built
    other = _normalised_graph(onnx, norm[0] * 2, norm[1], tmp_path)  # other inputs: other entry
    assert other != built and len(list((tmp_path / "detector-graphs").iterdir())) == 2

    fresh = tmp_path / "fresh-cache"
    probe = (
        "import sys; from tmars_ray.models.detect import TextDetector;"
        "from tmars_ray.models.settings import DetectorSettings;"
        f"TextDetector(DetectorSettings(device='cpu', threads=1, cache_dir={str(fresh)!r}));"
        "print('onnx' in sys.modules)"
    )
    run = [sys.executable, "-c", probe]
    first = subprocess.run(run, capture_output=True, text=True, check=True, cwd=tmp_path)
    second = subprocess.run(run, capture_output=True, text=True, check=True, cwd=tmp_path)
    # the first built the graph (a new cache), the second read it
    assert (first.stdout.split()[-1], second.stdout.split()[-1]) == ("True", "False")
