"""Image bytes -> RGB uint8 array, or a precise failure status.

Encoded bytes are what travels between the pipeline's stages; each stage decodes what it needs
at the size it needs: the reader only reads the header (`probe_image`: size, decompression-bomb
guard, is it an image at all), the detector decodes JPEGs at a reduced DCT scale when the image
is larger than its input (`decode_image(..., min_size=...)`), the scorer decodes full size.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

from tmars_ray.data import schema

# Truncated files must fail loudly (decode_error), not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def probe_image(data: bytes, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, "") from the header alone, or (0, 0, failure status). Truncated or
    corrupt pixel data is found later, by the stage that decodes."""
    if not data:
        return 0, 0, schema.EMPTY_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: we check ourselves
            Image.MAX_IMAGE_PIXELS = None
            width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - not an image we can read: a property of the bytes
        return 0, 0, schema.DECODE_ERROR
    if width * height > max_pixels:
        return 0, 0, schema.TOO_LARGE
    return width, height, ""


def decode_image(
    data: bytes, max_pixels: int, min_size: tuple[int, int] | None = None
) -> tuple[np.ndarray | None, str]:
    """(HxWx3 uint8 RGB array, "ok") or (None, failure status). With `min_size` (width,
    height), a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides
    at least that large - several times less work for a large photo that is shrunk anyway."""
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
            if min_size is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
                img.draft(img.mode, min_size)
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
