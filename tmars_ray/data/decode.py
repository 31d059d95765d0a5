"""Image bytes -> RGB uint8 array, or a precise failure status. Runs in CPU tasks.

Decoding happens once; stages downstream pass arrays, never re-encoded images.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

from tmars_ray.data import schema

# Truncated files must fail loudly (decode_error), not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(data: bytes, max_pixels: int) -> tuple[np.ndarray | None, str]:
    """(HxWx3 uint8 RGB array, "ok") or (None, failure status)."""
    if not data:
        return None, schema.EMPTY_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: we check ourselves
            Image.MAX_IMAGE_PIXELS = None
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return None, schema.TOO_LARGE  # checked from the header, before any pixel is read
            img.load()
            return to_rgb(img), schema.OK
    except Exception:  # noqa: BLE001 - any decoder failure is a property of the bytes
        return None, schema.DECODE_ERROR


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> RGB uint8. 16/32-bit greyscale is scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("P", "PA") and "transparency" in img.info or img.mode == "PA":
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
