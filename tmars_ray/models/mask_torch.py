"""`mask.mask_text` on a torch device (CPU or CUDA, same code), with no host sync per polygon.

Same rule, same pixels. The host plans (`plan_mask`): it rasterises the union and each
polygon's ring exactly as `mask.py` does (OpenCV on bounding-box crops) and turns them into
flat index arrays; the rule's widening needs only the masks, never the pixels. The device
applies (`apply_mask_plan`): one transfer of index arrays per image, ring sums by `index_add_`,
fills by one indexed assignment. Integer sums in float64 are exact, so for integer images the
result equals `mask_text` bit for bit whatever the summation order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tmars_ray.models.mask import clip_polygons, ring_pixels, text_union, widening_ring_mean

__all__ = ["MaskPlan", "TorchMaskResult", "apply_mask_plan", "mask_text_torch", "plan_mask"]


@dataclass
class MaskPlan:
    """What the device needs to mask one H x W image: flat pixel indices and polygon ids."""

    ring_idx: np.ndarray  # int64 ring pixels (a pixel may ring several polygons)
    ring_pid: np.ndarray  # int64 polygon of each ring pixel
    counts: np.ndarray  # float64 ring pixels per polygon (0: the fallback mean)
    fill_idx: np.ndarray  # int64 text pixels, each once: the last polygon covering it fills it
    fill_pid: np.ndarray  # int64
    background: np.ndarray | None  # H x W bool non-text pixels, only when a ring stayed empty
    text_area: float
    n_boxes: int


@dataclass
class TorchMaskResult:
    masked: Any  # H x W x C tensor on the image's device (the input itself when nothing masked)
    text_area: float
    n_text_boxes: int


def _ring_index(_image: Any, union: np.ndarray, poly: np.ndarray, bbox, ring: int):
    """`mask._ring_mean`'s shape for `widening_ring_mean`: the ring's flat indices, not its mean."""
    ring_px, own, (cx0, cy0) = ring_pixels(union, poly, bbox, ring)
    ys, xs = np.nonzero(ring_px)
    if len(ys) == 0:
        return None, own, (cx0, cy0)
    return (ys + cy0).astype(np.int64) * union.shape[1] + (xs + cx0), own, (cx0, cy0)


def plan_mask(polygons: Sequence[np.ndarray], h: int, w: int, ring: int = 3) -> MaskPlan | None:
    """`mask.mask_text`'s rule for an H x W image as index arrays (None: nothing to mask)."""
    if ring < 1:
        raise ValueError(f"ring must be >= 1, got {ring}")
    polys = clip_polygons(polygons, h, w) if h and w else []
    if not polys:
        return None
    union = text_union(polys, h, w)
    n_text = int(np.count_nonzero(union))
    if n_text == 0:
        return None
    # who fills each text pixel, on the text's bounding box only (not the whole image)
    ints = np.rint(np.concatenate(polys)).astype(np.int64)
    bx0, by0 = ints.min(axis=0)
    bw = int(ints[:, 0].max()) - int(bx0) + 1
    owner = np.full((int(ints[:, 1].max()) - int(by0) + 1) * bw, -1, np.int32)
    ring_idx, ring_pid, counts = [], [], []
    n_boxes, empty_ring = 0, False
    for k, poly in enumerate(polys):
        idx, own, (ox, oy) = widening_ring_mean(_ring_index, None, union, poly, ring, max(h, w))
        idx = np.zeros(0, np.int64) if idx is None else idx
        empty_ring |= len(idx) == 0
        counts.append(float(len(idx)))
        ring_idx.append(idx)
        ring_pid.append(np.full(len(idx), k, np.int64))
        ys, xs = np.nonzero(own)
        if len(ys):
            n_boxes += 1
            owner[(ys + (oy - by0)) * bw + (xs + (ox - bx0))] = k  # later polygons paint over
    local = np.flatnonzero(owner >= 0)
    fill_idx = (local // bw + by0) * w + (local % bw + bx0)
    return MaskPlan(
        np.concatenate(ring_idx),
        np.concatenate(ring_pid),
        np.asarray(counts, np.float64),
        fill_idx.astype(np.int64),
        owner[local].astype(np.int64),
        ~union if empty_ring else None,
        n_text / float(h * w),
        n_boxes,
    )


def apply_mask_plan(image: Any, plan: MaskPlan) -> Any:
    """The masked copy of an H x W x C tensor, on its device; no host sync."""
    import torch

    dev = image.device
    h, w, c = image.shape
    flat = image.reshape(h * w, c)

    def put(a: np.ndarray) -> Any:
        return torch.from_numpy(a).to(dev, non_blocking=True)

    counts = put(plan.counts)
    sums = torch.zeros((len(plan.counts), c), dtype=torch.float64, device=dev)
    sums.index_add_(0, put(plan.ring_pid), flat[put(plan.ring_idx)].double())
    means = sums / counts.clamp(min=1)[:, None]
    if plan.background is not None:  # rings that found no background at any width
        n_bg = int(plan.background.sum())  # host array: no sync
        weights = put(plan.background.reshape(-1) if n_bg else np.ones(h * w, bool)).double()
        fallback = (flat.double() * weights[:, None]).sum(0) / float(n_bg or h * w)
        means = torch.where((counts == 0)[:, None], fallback[None], means)
    if image.dtype.is_floating_point:
        fill = means.to(image.dtype)
    else:
        info = torch.iinfo(image.dtype)
        fill = torch.clamp(torch.round(means), info.min, info.max).to(image.dtype)
    masked = flat.clone()
    masked[put(plan.fill_idx)] = fill[put(plan.fill_pid)]
    return masked.reshape(h, w, c)


def mask_text_torch(image: Any, polygons: Sequence[np.ndarray], ring: int = 3) -> TorchMaskResult:
    """`mask_text` for an H x W x C (or H x W) tensor on any device."""
    if image.ndim == 2:
        res = mask_text_torch(image[..., None], polygons, ring)
        return TorchMaskResult(res.masked[..., 0], res.text_area, res.n_text_boxes)
    plan = plan_mask(polygons, image.shape[0], image.shape[1], ring)
    if plan is None:
        return TorchMaskResult(image, 0.0, 0)
    return TorchMaskResult(apply_mask_plan(image, plan), plan.text_area, plan.n_boxes)
