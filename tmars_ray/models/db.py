"""DB (Differentiable Binarization) post-processing: a text probability map -> text polygons.

The rule is PaddleOCR's DBPostProcess (score mode "fast", no dilation), reproduced here so the
detector needs neither PaddleX's import (~3-4 s per actor) nor its per-image Python pipeline;
`tests/models/test_db.py` checks the polygons equal PaddleX's on real detector output.

Per map: threshold -> contours -> for each contour its minimum-area box (quad) or simplified
outline (poly), kept when the mean probability inside reaches `box_thresh`, grown by
area * unclip_ratio / perimeter (Vatti offset, round joins: pyclipper) and rounded to whole
pixels of the map. Coordinates come back in map pixels (the caller maps them to the original).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import pyclipper

MIN_SIZE = 3  # boxes with a shorter side (map pixels) are noise


@dataclass(frozen=True)
class DBParams:
    thresh: float = 0.3
    box_thresh: float = 0.6
    unclip_ratio: float = 1.5
    box_type: str = "quad"  # or "poly"
    max_candidates: int = 1000


def polygons(prob: np.ndarray, p: DBParams) -> tuple[list[np.ndarray], list[float]]:
    """Text polygons ((K, 2) float32, map pixels) and their scores for one (H, W) map."""
    if p.box_type not in ("quad", "poly"):
        raise ValueError(f"box_type must be quad or poly, got {p.box_type!r}")
    bitmap = (prob > p.thresh).astype(np.uint8) * 255
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    h, w = prob.shape
    out, scores = [], []
    for contour in contours[: p.max_candidates]:
        if p.box_type == "quad":
            shape, short = _min_box(contour)
            if short < MIN_SIZE:
                continue
        else:
            eps = 0.002 * cv2.arcLength(contour, True)
            shape = cv2.approxPolyDP(contour, eps, True).reshape(-1, 2)
            if len(shape) < 4:
                continue
        score = _mean_inside(prob, shape)
        if score < p.box_thresh:
            continue
        grown = _unclip(shape, p.unclip_ratio)
        if grown is None:
            continue
        box, short = _min_box(grown)
        if short < MIN_SIZE + 2:
            continue
        if p.box_type == "poly":
            box = grown.astype(np.float32)
        else:  # PaddleOCR's float32 arithmetic (x / w * w is not always x): equal boxes
            box = np.stack([box[:, 0] / w * w, box[:, 1] / h * h], axis=1)
        # whole map pixels, inside [0, size] (PaddleOCR's rounding: half to even)
        out.append(np.clip(np.round(box), 0, [w, h]).astype(np.float32))
        scores.append(score)
    return out, scores


def _min_box(points: np.ndarray) -> tuple[np.ndarray, float]:
    """The minimum-area rectangle around `points`: its corners (top-left first, clockwise for
    an upright box) and its shorter side."""
    rect = cv2.minAreaRect(points.reshape(-1, 1, 2))
    pts = cv2.boxPoints(rect)
    pts = pts[np.argsort(pts[:, 0], kind="stable")]  # left pair, right pair
    left = pts[:2] if pts[1, 1] > pts[0, 1] else pts[1::-1]  # (top, bottom)
    right = pts[2:] if pts[3, 1] > pts[2, 1] else pts[:1:-1]
    return np.stack([left[0], right[0], right[1], left[1]]), min(rect[1])


def _mean_inside(prob: np.ndarray, shape: np.ndarray) -> float:
    """Mean probability inside a polygon (within its clipped bounding box)."""
    h, w = prob.shape
    xs, ys = shape[:, 0], shape[:, 1]
    x0 = min(max(math.floor(xs.min()), 0), w - 1)
    x1 = min(max(math.ceil(xs.max()), 0), w - 1)
    y0 = min(max(math.floor(ys.min()), 0), h - 1)
    y1 = min(max(math.ceil(ys.max()), 0), h - 1)
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    local = (shape - np.array([x0, y0], shape.dtype)).astype(np.int32)
    cv2.fillPoly(mask, local.reshape(1, -1, 2), 1)
    return cv2.mean(prob[y0 : y1 + 1, x0 : x1 + 1], mask)[0]


def _unclip(shape: np.ndarray, ratio: float) -> np.ndarray | None:
    """The polygon grown outward by area * ratio / perimeter; None when that is not one
    polygon."""
    area = cv2.contourArea(shape)
    length = cv2.arcLength(shape, True)
    if length <= 0:
        return None
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(shape.tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    paths = offset.Execute(area * ratio / length)
    if len(paths) != 1 or len(paths[0]) < 3:
        return None
    return np.asarray(paths[0], np.int32)
