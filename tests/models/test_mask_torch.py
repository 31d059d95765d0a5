"""The torch masking equals mask.mask_text pixel for pixel, including its corner cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tmars_ray.devtools.synth import generate_sample
from tmars_ray.models.mask import mask_text
from tmars_ray.models.mask_torch import mask_text_torch


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def _same(image: np.ndarray, polygons, ring: int = 3) -> None:
    ref = mask_text(image, polygons, ring)
    got = mask_text_torch(torch.from_numpy(image), polygons, ring)
    assert got.n_text_boxes == ref.n_text_boxes
    assert got.text_area == ref.text_area
    assert np.array_equal(got.masked.numpy(), ref.masked)


def _cases():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    yield noise, []  # nothing to mask
    yield noise, [_box(40, 30, 99, 59)]
    yield noise, [_box(10, 10, 70, 40), _box(60, 30, 120, 80)]  # overlapping text
    yield noise, [_box(0, 0, 30, 20), _box(140, 100, 175, 130)]  # at / past the border
    yield noise, [_box(5, 5, 60, 60), _box(0, 0, 4, 159), _box(61, 0, 159, 119)]  # ring widens
    yield noise, [_box(0, 0, 159, 119)]  # all text: image mean
    yield noise, [np.array([[20, 50], [80, 20], [110, 60], [50, 100]], np.float32)]  # rotated
    yield noise[:, :, 0].copy(), [_box(40, 30, 99, 59)]  # gray
    yield noise, [[30.0, 30.0, 60.0, 30.0, 60.0, 50.0]]  # flat triangle
    yield noise, [_box(10, 10, 10, 10), _box(50, 50, 50.2, 50.3)]  # degenerate
    for seed in range(6):  # rendered text and the real detector's kind of boxes
        s = generate_sample(71, seed)
        yield s.image, [line.polygon for line in s.lines]


@pytest.mark.parametrize("case", list(range(16)))
def test_equals_mask_text(case: int) -> None:
    image, polygons = list(_cases())[case]
    _same(image, polygons)
    _same(image, polygons, ring=1)


def test_input_is_not_modified_and_dtype_kept() -> None:
    image = np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    t = torch.from_numpy(image.copy())
    res = mask_text_torch(t, [_box(10, 10, 30, 30)])
    assert np.array_equal(t.numpy(), image) and res.masked.dtype == torch.uint8
    assert mask_text_torch(t, []).masked is t
