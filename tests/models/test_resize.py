"""`resize.resize_linear_u8` against `cv2.resize` (INTER_LINEAR, uint8): equal bit for bit on
every shape tried - upscales, downscales, odd and tiny sizes, one axis only, exact halvings
(cv2's INTER_AREA switch) and doublings, 1-4 channels, the canvases the job resizes to, random
noise and real photos - with OpenCV's SIMD on and off."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from tests.fake_cuda import fake_cuda, on_fake_cuda
from tmars_ray.devtools.synth import generate_sample
from tmars_ray.models.detect import canvas_shape, target_shape
from tmars_ray.models.resize import resize_linear_u8


def _ours(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    chw = torch.from_numpy(np.ascontiguousarray(img.reshape(*img.shape[:2], -1))).permute(2, 0, 1)
    return resize_linear_u8(chw, size).permute(1, 2, 0).numpy().reshape(*size, *img.shape[2:])


def _assert_exact(img: np.ndarray, size: tuple[int, int]) -> None:
    ref = cv2.resize(img, (size[1], size[0]))
    got = _ours(img, size)
    assert got.shape == ref.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() == 0, f"{img.shape} -> {size}: {int((diff > 0).sum())} pixels off"


def _noise(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c == 1 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


EDGE_CASES = [
    ((1, 1), (5, 7)),
    ((1, 9), (4, 3)),
    ((9, 1), (3, 4)),
    ((5, 7), (1, 1)),
    ((7, 9), (14, 18)),  # doubling
    ((100, 100), (50, 50)),  # exact halving: cv2 takes INTER_AREA
    ((64, 130), (32, 65)),
    ((301, 200), (150, 100)),  # not an exact halving
    ((100, 100), (50, 100)),  # halving one axis only: still linear
    ((100, 100), (100, 37)),  # one axis unchanged
    ((37, 301), (96, 960)),
    ((480, 640), (33, 17)),  # strong downscale
]


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize(("src", "dst"), EDGE_CASES)
def test_resize_exact_on_edge_cases(src, dst, channels):
    _assert_exact(_noise(*src, channels), dst)


@pytest.mark.parametrize("optimized", [True, False])
def test_resize_exact_on_random_shapes(optimized):
    rng = np.random.default_rng(7)
    before = cv2.useOptimized()
    cv2.setUseOptimized(optimized)  # SIMD / IPP paths on and off: the same pixels
    try:
        for k in range(120):
            h, w, dh, dw = (int(v) for v in rng.integers(1, 260, 4))
            _assert_exact(_noise(h, w, int(rng.integers(1, 4)), seed=k), (dh, dw))
    finally:
        cv2.setUseOptimized(before)


def _photos() -> list[np.ndarray]:
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    photos.append(skimage.data.camera())  # one channel
    photos += [generate_sample(11, i).image for i in range(4)]
    return photos


@pytest.mark.parametrize("step", [32, 128])  # the CPU and the GPU canvas steps
def test_resize_exact_on_job_canvases(step):
    """Real and synthetic pictures (and noise at common camera sizes) to the canvases the
    detector gets: `canvas_shape(target_shape(h, w, 960, "max"), step)`."""
    images = _photos() + [_noise(h, w, 3, seed=h) for h, w in [(1080, 1920), (333, 500), (97, 61)]]
    resized = 0
    for img in images:
        h, w = img.shape[:2]
        canvas = canvas_shape(target_shape(h, w, 960, "max"), step)
        if canvas != (h, w):  # the device step resizes only these
            _assert_exact(img, canvas)
            resized += 1
        _assert_exact(img, (h // 2, w // 2))
    assert resized >= 8


def test_resize_batched_equals_one_by_one():
    batch = torch.from_numpy(np.stack([_noise(45, 70, 3, seed=s) for s in range(3)]))
    batch = batch.permute(0, 3, 1, 2)
    got = resize_linear_u8(batch, (64, 96))
    assert got.shape == (3, 3, 64, 96)
    for i in range(3):
        assert torch.equal(got[i], resize_linear_u8(batch[i], (64, 96)))


def test_resize_same_size_is_a_copy():
    x = torch.from_numpy(_noise(8, 9, 3)).permute(2, 0, 1)
    y = resize_linear_u8(x, (8, 9))
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("size", [(64, 96), (20, 35)])  # linear; exact halving (area)
def test_fake_cuda_resize_stays_on_the_device(size):
    """No host sync, no CPU/CUDA mix: the tables follow the image to its device."""
    with fake_cuda():
        x = torch.zeros((3, 40, 70), dtype=torch.uint8, device="cuda")
        y = resize_linear_u8(x, size)
        assert on_fake_cuda(y) and y.shape == (3, *size) and y.dtype == torch.uint8
