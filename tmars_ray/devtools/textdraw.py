"""Text drawing for the synthetic pools: fonts, legible colours, placement of a rotated line
clear of the others, and exact compositing (so a line's ink mask is exactly the pixels it
changed). Coordinates are continuous pixel-edge coordinates, as in synth."""

from __future__ import annotations

import math
import os
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXT_COLOURS = (
    (0, 0, 0),
    (255, 255, 255),
    (230, 30, 30),
    (255, 220, 0),
    (20, 60, 200),
    (0, 150, 70),
    (255, 120, 0),
    (250, 250, 190),
)
ALPHA_CUTOFF = 48  # faint anti-aliasing below this is dropped so `ink` == changed pixels
MARGIN = 4  # px kept free between lines and around the image border


@cache
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib  # its DejaVu TTFs are the one font set guaranteed offline

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    # BASIC layout: identical glyph placement whether or not libraqm is installed.
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def text_masks(
    text: str, font: ImageFont.FreeTypeFont, stroke: int
) -> tuple[Image.Image, Image.Image | None, tuple[int, int, int, int]]:
    """Unrotated coverage masks (fill, stroke or None) and the tight ink box inside them."""
    x0, y0, x1, y1 = font.getbbox(text, stroke_width=stroke)
    pad = 2
    size = (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad)
    origin = (pad - x0, pad - y0)
    fill = Image.new("L", size, 0)
    ImageDraw.Draw(fill).text(origin, text, fill=255, font=font)
    outline = None
    if stroke:
        # The stroke mask covers glyph + outline; the fill is drawn on top of it.
        outline = Image.new("L", size, 0)
        ImageDraw.Draw(outline).text(
            origin, text, fill=255, font=font, stroke_width=stroke, stroke_fill=255
        )
    coverage = np.asarray(outline if outline is not None else fill) > 0
    ys, xs = np.nonzero(coverage)
    return fill, outline, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG relative luminance of RGB values in 0..255 (last axis)."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return c @ np.array([0.2126, 0.7152, 0.0722])


def contrast(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """WCAG contrast ratio between luminances (1 = none, 21 = black on white)."""
    return (np.maximum(a, b) + 0.05) / (np.minimum(a, b) + 0.05)


TEXT_LUM = luminance(np.array(TEXT_COLOURS))


def pick_colour(rng: np.random.Generator, window: np.ndarray) -> tuple[tuple[int, int, int], bool]:
    """A random text colour that stands out from both the dark and the light end of the
    background under the line, and whether it does so well enough without an outline."""
    lum = luminance(window.reshape(-1, 3))
    lo, hi = np.percentile(lum, [10, 90])
    worst = np.minimum(contrast(TEXT_LUM, lo), contrast(TEXT_LUM, hi))
    good = np.flatnonzero(worst >= 3.0)
    if good.size:
        return TEXT_COLOURS[int(rng.choice(good))], True
    return TEXT_COLOURS[int(np.argmax(worst))], False


def rotation(angle: float) -> np.ndarray:
    # Counter-clockwise on screen (y points down), like PIL's Image.rotate.
    t = math.radians(angle)
    return np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])


def place(
    rng: np.random.Generator,
    box: tuple[int, int, int, int],
    angle: float,
    width: int,
    height: int,
    taken: list[tuple[int, int, int, int]],
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]] | None:
    """A random centre for the rotated box that keeps it inside the image and clear of `taken`.

    The centre leans toward the middle of the image (mean of two uniform draws), as overlaid
    text mostly does, so that CLIP's centre crop sees most lines."""
    bx0, by0, bx1, by1 = box
    rot = rotation(angle)
    half = np.array([bx1 - bx0, by1 - by0], np.float64) / 2
    extent = np.abs(rot) @ half  # half size of the rotated box's axis-aligned bounds
    lo = extent + MARGIN
    hi = np.array([width, height], np.float64) - extent - MARGIN
    if np.any(hi < lo):
        return None
    centre = (rng.uniform(lo, hi) + rng.uniform(lo, hi)) / 2
    box_centre = np.array([bx0 + bx1, by0 + by1], np.float64) / 2
    if angle == 0.0:
        centre = box_centre + np.round(centre - box_centre)  # integer shift: no resampling blur
    corners = np.array([[bx0, by0], [bx1, by0], [bx1, by1], [bx0, by1]], np.float64)
    polygon = centre + (corners - box_centre) @ rot.T
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int)
    bbox = (max(int(x0), 0), max(int(y0), 0), min(int(x1), width), min(int(y1), height))
    for tx0, ty0, tx1, ty1 in taken:
        if (
            bbox[0] < tx1 + MARGIN
            and tx0 < bbox[2] + MARGIN
            and bbox[1] < ty1 + MARGIN
            and ty0 < bbox[3] + MARGIN
        ):
            return None
    return centre, polygon.astype(np.float32), bbox


def warp(
    mask: Image.Image,
    box: tuple[int, int, int, int],
    angle: float,
    centre: np.ndarray,
    window: tuple[int, int, int, int],
) -> np.ndarray:
    """Float alpha over image `window`: the mask rotated about its tight box's centre, moved
    to `centre`. Rendering only the window keeps the ink inside the recorded bbox."""
    rot = rotation(angle)
    box_centre = np.array([box[0] + box[2], box[1] + box[3]], np.float64) / 2
    inv = rot.T  # rotation matrices are orthonormal
    # PIL's AFFINE maps each output pixel back to the source: src = inv @ out + offset, with
    # `out` relative to the window's top-left corner.
    offset = box_centre + inv @ (np.array(window[:2], np.float64) - centre)
    data = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    size = (window[2] - window[0], window[3] - window[1])
    warped = mask.transform(size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    alpha = np.asarray(warped, np.float32)
    alpha[alpha < ALPHA_CUTOFF] = 0
    return alpha[..., None] / 255.0


def composite(image: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int]) -> None:
    blended = image * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    image[...] = np.rint(blended).astype(np.uint8)
