"""Paint detected text away: each polygon is filled with the mean colour of a thin ring around it.

T-MARS masks text so that CLIP cannot read it, while keeping the rest of the picture intact.
The ring excludes every text region (not only the polygon being filled), so the fill colour
comes from background pixels, never from neighbouring letters. All work happens on a bounding
box crop per polygon, so the cost scales with the text area, not with image area x boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = ["MaskResult", "clip_polygons", "mask_text", "rasterize", "ring_pixels", "text_union"]


@dataclass
class MaskResult:
    masked: np.ndarray  # the masked image (the input object itself when nothing was masked)
    text_area: float  # share of image pixels covered by the union of the text polygons
    n_text_boxes: int  # polygons that cover at least one pixel
    union_mask: np.ndarray | None  # HxW bool union of all text regions; None without polygons


def clip_polygons(polygons: Sequence[np.ndarray], height: int, width: int) -> list[np.ndarray]:
    """Polygons as (N, 2) float32 arrays clipped to the pixel grid; fewer than 3 points are dropped.

    Accepts (N, 2) arrays, nested lists, or flat [x0, y0, x1, y1, ...] sequences (score-table form).
    """
    out = []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float32).reshape(-1, 2)
        if len(p) < 3 or not np.isfinite(p).all():
            continue
        p = p.copy()
        np.clip(p[:, 0], 0, width - 1, out=p[:, 0])
        np.clip(p[:, 1], 0, height - 1, out=p[:, 1])
        out.append(p)
    return out


def rasterize(
    polygon: np.ndarray, shape: tuple[int, int], offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """uint8 {0,1} mask of `shape` (h, w) with `polygon` filled; `offset` (x, y) is the crop origin.

    Coordinates are pixel centres rounded to the nearest pixel (DB boxes are integral anyway).
    """
    mask = np.zeros(shape, dtype=np.uint8)
    pts = np.rint(polygon - np.asarray(offset, dtype=np.float32)).astype(np.int32)
    cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1)
    return mask


def text_union(polys: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
    """H x W bool union of the (clipped) polygons, rasterised in one call."""
    union = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(union, [np.rint(p).astype(np.int32).reshape(-1, 1, 2) for p in polys], 1)
    return union.astype(bool)


def _fill_value(mean: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(dtype)
    return mean.astype(dtype)


def ring_pixels(
    union: np.ndarray, poly: np.ndarray, bbox: tuple[int, int, int, int], ring: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The ring of width `ring` around `poly`, minus all text, as a bool mask on the crop
    around the polygon; also the polygon's own uint8 mask on that crop and the crop origin
    (x, y), so callers fill without rasterising again. Host work for both maskings."""
    h, w = union.shape
    x0, y0, x1, y1 = bbox
    cx0, cy0 = max(x0 - ring, 0), max(y0 - ring, 0)
    cx1, cy1 = min(x1 + ring + 1, w), min(y1 + ring + 1, h)
    own = rasterize(poly, (cy1 - cy0, cx1 - cx0), (cx0, cy0))
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * ring + 1, 2 * ring + 1))
    grown = cv2.dilate(own, kernel)
    # ring = dilated polygon minus every text pixel (its own pixels are part of the union)
    return (grown > 0) & ~union[cy0:cy1, cx0:cx1], own, (cx0, cy0)


def _ring_mean(
    image: np.ndarray,
    union: np.ndarray,
    poly: np.ndarray,
    bbox: tuple[int, int, int, int],
    ring: int,
) -> tuple[np.ndarray | None, np.ndarray, tuple[int, int]]:
    """Mean colour of `ring_pixels` (None if empty), the polygon's own mask, the crop origin."""
    ring_px, own, (cx0, cy0) = ring_pixels(union, poly, bbox, ring)
    if not ring_px.any():
        return None, own, (cx0, cy0)
    crop = image[cy0 : cy0 + ring_px.shape[0], cx0 : cx0 + ring_px.shape[1]]
    return crop[ring_px].mean(axis=0, dtype=np.float64), own, (cx0, cy0)


def widening_ring_mean(
    ring_mean: Callable, image: Any, union: Any, poly: np.ndarray, ring: int, max_ring: int
) -> tuple[Any, Any, tuple[int, int]]:
    """`ring_mean` (host mean or device plan) over the polygon's ring, doubled in width until the ring
    holds non-text pixels (or covers the image): (mean or None, the polygon's own pixel mask,
    its (x, y) offset). One rule for the host and the device masking."""
    ip = np.rint(poly).astype(np.int64)
    bbox = (int(ip[:, 0].min()), int(ip[:, 1].min()), int(ip[:, 0].max()), int(ip[:, 1].max()))
    r = ring
    mean, own, offset = ring_mean(image, union, poly, bbox, r)
    while mean is None and r < max_ring:
        r = min(r * 2, max_ring)
        mean, _, _ = ring_mean(image, union, poly, bbox, r)
    return mean, own, offset


def mask_text(image: np.ndarray, polygons: Sequence[np.ndarray], ring: int = 3) -> MaskResult:
    """Fill every text polygon with the mean colour of the pixels just outside it.

    `image` is HxWxC (or HxW) in any channel order; the result has the same shape and dtype.
    For each polygon the ring is `dilate(polygon, ring px) - union(all text)`. When that ring is
    empty (text at the border, text surrounded by other text) the ring is widened by doubling;
    if even an image-wide ring finds no background, the mean of all non-text pixels is used, and
    for an image that is all text, the image mean. Without polygons the input object is returned.
    """
    if ring < 1:
        raise ValueError(f"ring must be >= 1, got {ring}")
    h, w = image.shape[:2]
    polys = clip_polygons(polygons, h, w) if h and w else []
    if not polys:
        return MaskResult(image, 0.0, 0, None)

    union = text_union(polys, h, w)
    n_text = int(np.count_nonzero(union))
    if n_text == 0:
        return MaskResult(image, 0.0, 0, union)

    masked = image.copy()
    n_boxes = 0
    fallback: np.ndarray | None = None  # mean of all non-text pixels, computed once if needed
    max_ring = max(h, w)
    for poly in polys:
        mean, own, (ox, oy) = widening_ring_mean(_ring_mean, image, union, poly, ring, max_ring)
        if mean is None:
            if fallback is None:
                background = ~union
                fallback = (
                    image[background].mean(axis=0, dtype=np.float64)
                    if background.any()
                    else image.reshape(h * w, -1).mean(axis=0, dtype=np.float64).squeeze()
                )
            mean = fallback
        inside = own.astype(bool)
        if not inside.any():
            continue
        n_boxes += 1
        view = masked[oy : oy + own.shape[0], ox : ox + own.shape[1]]
        view[inside] = _fill_value(np.asarray(mean), image.dtype)
    return MaskResult(masked, n_text / float(h * w), n_boxes, union)
