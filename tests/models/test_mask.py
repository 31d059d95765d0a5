"""Masking: each polygon is filled with the mean of a ring around it that avoids all text.

The ring is recomputed here independently (scipy's binary dilation on full-size masks) so the
tests check the contract, not the implementation's own crop arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tmars_ray.models.mask import clip_polygons, mask_text


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def _noise_image(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _rect_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros(shape, bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def _ring_mean(image: np.ndarray, own: np.ndarray, union: np.ndarray, ring: int) -> np.ndarray:
    grown = ndimage.binary_dilation(own, structure=np.ones((2 * ring + 1, 2 * ring + 1), bool))
    sel = grown & ~union
    assert sel.any()
    return np.rint(image[sel].astype(np.float64).mean(axis=0)).astype(np.uint8)


def test_no_polygons_returns_the_same_object() -> None:
    img = _noise_image()
    res = mask_text(img, [], ring=3)
    assert res.masked is img
    assert res.text_area == 0.0 and res.n_text_boxes == 0 and res.union_mask is None


def test_fill_equals_ring_mean_and_outside_is_unchanged() -> None:
    img = _noise_image()
    box = (40, 30, 99, 59)
    res = mask_text(img, [_box(*box)], ring=3)
    own = _rect_mask(img.shape[:2], box)
    expected = _ring_mean(img, own, own, 3)
    assert (res.masked[own] == expected).all()
    assert (res.masked[~own] == img[~own]).all()
    assert res.n_text_boxes == 1
    assert res.text_area == pytest.approx(own.sum() / own.size)
    assert (res.union_mask == own).all()
    assert res.masked is not img and res.masked.dtype == img.dtype
    assert (img[own] != expected).any()  # the input was not modified in place


def test_ring_excludes_other_text_regions() -> None:
    # a bright neighbour touching the ring: its pixels must not leak into the fill colour
    img = np.full((100, 200, 3), 50, np.uint8)
    img[:, 100:] = 200  # right half differs, so a leaked pixel would change the mean
    a, b = (40, 40, 95, 60), (97, 40, 150, 60)  # b sits 1 px right of a (inside a's ring)
    res = mask_text(img, [_box(*a), _box(*b)], ring=4)
    ma, mb = _rect_mask(img.shape[:2], a), _rect_mask(img.shape[:2], b)
    union = ma | mb
    assert (res.masked[ma] == _ring_mean(img, ma, union, 4)).all()
    assert (res.masked[mb] == _ring_mean(img, mb, union, 4)).all()
    assert (res.masked[~union] == img[~union]).all()
    assert res.n_text_boxes == 2
    assert res.text_area == pytest.approx(union.sum() / union.size)


def test_text_colour_does_not_leak_into_fill() -> None:
    # text pixels of a polygon sit on a uniform background: the fill must be that background
    img = np.full((80, 120, 3), (10, 120, 230), np.uint8)
    img[30:45, 20:90] = (255, 255, 255)  # "ink"
    res = mask_text(img, [_box(18, 28, 92, 47)], ring=3)
    assert (res.masked == np.array((10, 120, 230), np.uint8)).all()


def test_border_polygon_uses_the_ring_that_exists() -> None:
    img = _noise_image(seed=1)
    box = (0, 0, 49, 19)  # touches the top-left corner: ring only below and to the right
    res = mask_text(img, [_box(*box)], ring=3)
    own = _rect_mask(img.shape[:2], box)
    assert (res.masked[own] == _ring_mean(img, own, own, 3)).all()
    assert (res.masked[~own] == img[~own]).all()


def test_polygons_outside_the_image_are_clipped() -> None:
    img = _noise_image(seed=2)
    res = mask_text(img, [_box(-20, -10, 30, 15)], ring=2)
    own = _rect_mask(img.shape[:2], (0, 0, 30, 15))
    assert (res.masked[own] == _ring_mean(img, own, own, 2)).all()
    assert (res.masked[~own] == img[~own]).all()
    assert clip_polygons([_box(-5, -5, 500, 500)], 120, 160)[0].max(axis=0).tolist() == [159, 119]


def test_empty_ring_widens_progressively() -> None:
    # the centre box is enclosed by a frame of text 5 px thick (all on black): ring 2 sees only
    # text, the widened ring reaches the grey background beyond the frame
    img = np.full((100, 100, 3), 90, np.uint8)
    img[40:60, 40:60] = 0
    inner = (45, 45, 54, 54)
    frame = [_box(40, 40, 59, 44), _box(40, 55, 59, 59), _box(40, 45, 44, 54), _box(55, 45, 59, 54)]
    union = _rect_mask(img.shape[:2], (40, 40, 59, 59))
    res = mask_text(img, [_box(*inner), *frame], ring=2)
    own = _rect_mask(img.shape[:2], inner)
    assert (res.masked[own] == 90).all()  # filled from the grey outside, not from the black
    assert (res.masked[~union] == img[~union]).all()


def test_all_text_image_falls_back_to_image_mean() -> None:
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 15:] = 100
    res = mask_text(img, [_box(0, 0, 29, 19)], ring=3)
    assert (res.masked == 50).all()
    assert res.text_area == pytest.approx(1.0)


def test_grayscale_and_flat_polygon_forms() -> None:
    img = _noise_image()[:, :, 0]
    box = (10, 10, 40, 30)
    flat = _box(*box).reshape(-1).tolist()  # score-table form [x0, y0, x1, y1, ...]
    res = mask_text(img, [flat], ring=3)
    own = _rect_mask(img.shape, box)
    assert res.masked.shape == img.shape
    assert (res.masked[own] == _ring_mean(img, own, own, 3)).all()
    assert (res.masked[~own] == img[~own]).all()


def test_degenerate_polygons_are_ignored() -> None:
    img = _noise_image()
    res = mask_text(img, [np.zeros((2, 2), np.float32), np.full((4, 2), np.nan)], ring=3)
    assert res.masked is img and res.n_text_boxes == 0


def test_rotated_polygon_and_cost_on_a_large_image() -> None:
    img = np.full((3000, 4000, 3), 128, np.uint8)
    poly = np.array([[1000, 1000], [1400, 900], [1420, 980], [1020, 1080]], np.float32)
    res = mask_text(img, [poly], ring=3)
    assert res.n_text_boxes == 1
    assert 0 < res.text_area < 0.01
    assert (res.masked == 128).all()
