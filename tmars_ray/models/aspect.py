"""Bounded cost for extreme aspect ratios.

CLIP's standard transform resizes the SHORT side to its input size, then centre-crops a square:
a 1 x 20000 px image becomes 224 x 4,480,000 px (GBs) before the crop throws almost all of it
away. Before that transform we keep only the centre band of the long side, at most
`MAX_ASPECT` times the short side: far more than the square the crop keeps (plus the
resampling filter's reach), so the model sees the same pixels, and the cost is bounded by the
output size whatever the input's aspect ratio. Images up to 1:MAX_ASPECT are untouched (exactly
open_clip's preprocessing); beyond it the resize's rounding of the long side could in theory
move the crop by a fraction of a pixel (tests/models/test_aspect.py: identical tensors).
Why not refuse with `bad_aspect`? A banner or a ruler is a legitimate picture; it is scored
like any other, at a bounded cost.
"""

from __future__ import annotations

from typing import Any

MAX_ASPECT = 50  # a 1:50 band resized to 224 px is 224 x 11,200 px: ~7.5 MB


def centre_band(image: Any, max_aspect: int = MAX_ASPECT) -> Any:
    """`image` (PIL image, or an H x W x C numpy array / torch tensor) with its long side cut
    to its centre `max_aspect * short side` pixels; returned as is when already within."""
    if hasattr(image, "crop") and hasattr(image, "size") and not hasattr(image, "shape"):
        w, h = image.size
    else:
        h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    keep = max(1, short) * max_aspect
    if long <= keep:
        return image
    start = (long - keep) // 2
    if hasattr(image, "crop") and not hasattr(image, "shape"):
        box = (start, 0, start + keep, h) if w > h else (0, start, w, start + keep)
        return image.crop(box)
    return image[:, start : start + keep] if w > h else image[start : start + keep]


def crops_centre_after_short_side_resize(transform: Any) -> bool:
    """Does `transform` (torchvision Compose) resize the short side and then centre-crop - the
    only transform whose cost grows with the aspect ratio, and the one `centre_band` is exact
    for? (A squash or longest-side resize never blows up and sees the whole image.)"""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    for first, second in zip(steps, steps[1:]):
        if isinstance(first, T.Resize):
            size = first.size
            short_side = isinstance(size, int) or (
                isinstance(size, (list, tuple)) and len(size) == 1
            )
            return short_side and isinstance(second, T.CenterCrop)
    return False
