"""`cv2.resize(img, (w, h))` (INTER_LINEAR, uint8) reproduced in torch, bit for bit.

The CPU path resizes each image to its detector canvas with OpenCV; the device path must feed
the detector the same pixels, or DB's threshold turns the difference into shifted boxes
(issue 23: `F.interpolate(bilinear)` rounded to uint8 moved 3 % of the boxes). OpenCV's uint8
linear resize is fixed point; every detail below was found against cv2 4.10 (SIMD on and off,
`tests/models/test_resize.py` checks it):

- per output coordinate `f = float32((d + 0.5) * scale - 0.5)`, `s = floor(f)`, `f -= s`,
  `scale = 1 / (dst / src)` in float64; weights `rint((1 - f) * 2048)` and `rint(f * 2048)`;
- along x, `s < 0` -> `s = 0, f = 0` and `s >= src - 1` -> `s = src - 1, f = 0`; along y only
  the two row indices are clamped (the border rows keep both weights, on one row);
- a horizontal pass into int32 (exact), then the vertical one as OpenCV's SIMD loop computes it:
  `(((top >> 4) * b0 >> 16) + ((bottom >> 4) * b1 >> 16) + 2) >> 2` (not the textbook
  `(top * b0 + bottom * b1 + 2**21) >> 22`, which is off by one on some pixels);
- both sides exactly halved: INTER_AREA instead, `(sum of the 2 x 2 block + 2) >> 2`, except
  with 2 channels where the mean is rounded half to even.

The index and weight tables depend on the shapes alone: built on the host (cached), copied to
the image's device; no host sync, so it runs on CUDA (and on fake tensors in the tests).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["resize_linear_u8"]

_BITS = 11  # INTER_RESIZE_COEF_BITS
_ONE = 1 << _BITS


def _axis(src: int, dst: int, x: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first index, second index, first weight, second weight) per output coordinate. Along
    x the border coordinates take one pixel; along y only the row indices are clamped."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    f = (f - s).astype(np.float32)
    s = s.astype(np.int64)
    if x:
        low, high = s < 0, s >= src - 1
        s[low], f[low] = 0, 0
        s[high], f[high] = src - 1, 0
    w0 = np.rint((np.float32(1) - f) * np.float32(_ONE)).astype(np.int32)
    w1 = np.rint(f * np.float32(_ONE)).astype(np.int32)
    return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), w0, w1


@lru_cache(maxsize=256)
def _tables(src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Row indices (top rows, then bottom rows), row weights, column indices and weights, in
    one int32 array: one copy to the device per image."""
    ys0, ys1, wy0, wy1 = _axis(src[0], dst[0], x=False)
    xs0, xs1, wx0, wx1 = _axis(src[1], dst[1], x=True)
    return np.concatenate([ys0, ys1, wy0, wy1, xs0, xs1, wx0, wx1]).astype(np.int32)


def resize_linear_u8(image: Any, size: tuple[int, int]) -> Any:
    """`image` (... x C x H x W uint8 tensor) resized to `size` (h, w) as `cv2.resize` does on
    its H x W x C array with INTER_LINEAR; uint8, on the image's device."""
    import torch

    *_, c, h, w = image.shape
    dh, dw = int(size[0]), int(size[1])
    if (h, w) == (dh, dw):
        return image.clone()
    if h == 2 * dh and w == 2 * dw:  # cv2 takes INTER_AREA for an exact halving
        s = image.to(torch.int32).reshape(*image.shape[:-2], dh, 2, dw, 2).sum((-3, -1))
        if c == 2:  # its 2-channel loop rounds the mean half to even
            return ((s + 1 + ((s >> 2) & 1)) >> 2).to(torch.uint8)
        return ((s + 2) >> 2).to(torch.uint8)
    table = torch.from_numpy(_tables((h, w), (dh, dw))).to(image.device, non_blocking=True)
    ys, wy0, wy1, xs0, xs1, wx0, wx1 = table.split([2 * dh, dh, dh, dw, dw, dw, dw])
    wy0, wy1 = wy0[:, None], wy1[:, None]

    def horizontal(rows: Any) -> Any:  # exact in int32: at most 255 * 2048
        return (
            rows.index_select(-1, xs0).to(torch.int32) * wx0
            + rows.index_select(-1, xs1).to(torch.int32) * wx1
        )

    if h < 2 * dh:  # fewer source rows than rows taken: along x first, then pick the rows
        rows = horizontal(image).index_select(-2, ys)
    else:
        rows = horizontal(image.index_select(-2, ys))
    top, bottom = rows.split(dh, dim=-2)
    out = (((top >> 4) * wy0 >> 16) + ((bottom >> 4) * wy1 >> 16) + 2) >> 2
    return out.clamp_(0, 255).to(torch.uint8)
