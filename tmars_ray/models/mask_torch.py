"""`mask.mask_text` in torch: the image stays on the scorer's device (CPU or CUDA, same code).

Same rule, same pixels: each polygon is filled with the rounded mean of the ring
`dilate(polygon, ring) - union(all text)`, widened by doubling while empty, then the mean of all
non-text pixels, then the image mean. Polygons are rasterised on the host with OpenCV exactly as
`mask.py` does (on their bounding-box crops only, a few KB); dilation, ring means and fills run in
torch. For integer images the result equals `mask_text` bit for bit (sums of integers are exact
in float64 whatever the summation order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from tmars_ray.models.mask import clip_polygons, rasterize, widening_ring_mean

__all__ = ["TorchMaskResult", "mask_text_torch"]


@dataclass
class TorchMaskResult:
    masked: Any  # H x W x C tensor on the image's device (the input itself when nothing masked)
    text_area: float
    n_text_boxes: int


def _ring_mean(image, union, poly: np.ndarray, bbox: tuple[int, int, int, int], ring: int):
    """Mean (float64, per channel) of the ring around `poly`, or None; the polygon's own mask
    (bool tensor) on the crop and the crop origin."""
    import torch
    import torch.nn.functional as F

    h, w = union.shape
    x0, y0, x1, y1 = bbox
    cx0, cy0 = max(x0 - ring, 0), max(y0 - ring, 0)
    cx1, cy1 = min(x1 + ring + 1, w), min(y1 + ring + 1, h)
    own_np = rasterize(poly, (cy1 - cy0, cx1 - cx0), (cx0, cy0))
    own = torch.from_numpy(own_np).to(image.device, non_blocking=True)
    # a square max filter is OpenCV's rectangular dilation (the padding never wins)
    grown = F.max_pool2d(own[None, None].float(), 2 * ring + 1, stride=1, padding=ring)[0, 0]
    ring_px = (grown > 0) & ~union[cy0:cy1, cx0:cx1]
    count = int(ring_px.sum())
    if count == 0:
        return None, own.bool(), (cx0, cy0)
    crop = image[cy0:cy1, cx0:cx1]
    total = (crop.double() * ring_px[..., None]).sum(dim=(0, 1))
    return total / count, own.bool(), (cx0, cy0)


def _fill_value(mean, dtype):
    import torch

    if dtype.is_floating_point:
        return mean.to(dtype)
    info = torch.iinfo(dtype)
    return torch.clamp(torch.round(mean), info.min, info.max).to(dtype)


def mask_text_torch(image: Any, polygons: Sequence[np.ndarray], ring: int = 3) -> TorchMaskResult:
    """`mask_text` for an H x W x C tensor (any device); polygons in pixel coordinates."""
    import torch

    if ring < 1:
        raise ValueError(f"ring must be >= 1, got {ring}")
    if image.ndim == 2:
        res = mask_text_torch(image[..., None], polygons, ring)
        return TorchMaskResult(res.masked[..., 0], res.text_area, res.n_text_boxes)
    h, w = image.shape[:2]
    polys = clip_polygons(polygons, h, w) if h and w else []
    if not polys:
        return TorchMaskResult(image, 0.0, 0)
    # the union of all text, rasterised in one call like mask.py, on the polygons' bounding box
    ints = [np.rint(p).astype(np.int32) for p in polys]
    ux0 = min(int(p[:, 0].min()) for p in ints)
    uy0 = min(int(p[:, 1].min()) for p in ints)
    ux1 = max(int(p[:, 0].max()) for p in ints) + 1
    uy1 = max(int(p[:, 1].max()) for p in ints) + 1
    crop = np.zeros((uy1 - uy0, ux1 - ux0), np.uint8)
    offset = np.array([ux0, uy0], np.int32)
    cv2.fillPoly(crop, [(p - offset).reshape(-1, 1, 2) for p in ints], 1)
    n_text = int(np.count_nonzero(crop))
    if n_text == 0:
        return TorchMaskResult(image, 0.0, 0)
    union = torch.zeros((h, w), dtype=torch.bool, device=image.device)
    union[uy0:uy1, ux0:ux1] = torch.from_numpy(crop.astype(bool)).to(image.device)

    masked = image.clone()
    n_boxes = 0
    fallback = None
    max_ring = max(h, w)
    for poly in polys:
        mean, own, (ox, oy) = widening_ring_mean(_ring_mean, image, union, poly, ring, max_ring)
        if mean is None:
            if fallback is None:
                flat = image.reshape(h * w, -1).double()
                background = ~union.reshape(-1)
                fallback = (
                    flat[background].sum(dim=0) / int(background.sum())
                    if bool(background.any())
                    else flat.sum(dim=0) / (h * w)
                )
            mean = fallback
        if not bool(own.any()):
            continue
        n_boxes += 1
        view = masked[oy : oy + own.shape[0], ox : ox + own.shape[1]]
        view[own] = _fill_value(mean, image.dtype)
    return TorchMaskResult(masked, n_text / float(h * w), n_boxes)
