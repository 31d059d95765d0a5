"""Image array plumbing shared by the OCR models."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["to_bgr"]


def to_bgr(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 BGR (what PP-OCR was trained on) from RGB, RGBA, gray, gray+alpha,
    16-bit, float [0,1] or bool arrays. Alpha is dropped, as PIL's convert("RGB") does."""
    img = np.asarray(image)
    if not (img.dtype == np.bool_ or np.issubdtype(img.dtype, np.number)):
        raise ValueError(f"not an image array (dtype {img.dtype}, shape {img.shape})")
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    elif img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif np.issubdtype(img.dtype, np.floating):
        scale = 255.0 if np.nanmax(img, initial=0.0) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img * scale), 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha
        img = img[:, :, 0]
    if img.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_GRAY2BGR)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"unsupported image shape {img.shape}")
    return np.ascontiguousarray(img[:, :, 2::-1])  # RGB(A) -> BGR, alpha dropped
