"""CLIP image preprocessing in torch: the same code on CPU and CUDA, batched per call.

open_clip's own preprocessing runs PIL per image on the host (resize the shorter side with
bicubic + antialias, centre crop, scale, normalise). `TensorPreprocess` does the same steps with
torch on the scorer's device, so on a GPU the pixels are resized where the model runs. It is
not bit-identical to PIL: PIL rounds the resized image to uint8 and its bicubic filter differs
in the last bits. Measured on natural images, embeddings differ by a few 1e-3 at most and
cosine scores by <= 2e-3 (the documented tolerance; tests check it and the rank agreement on
images the tests do not generate). Only open_clip's standard eval transform is translated;
anything else stays with PIL (`from_transform` returns None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SCORE_TOLERANCE", "TensorPreprocess"]

SCORE_TOLERANCE = 2e-3  # max |score(torch preprocessing) - score(PIL preprocessing)|


class TensorPreprocess:
    """Resize (shorter side, bicubic, antialias) -> centre crop -> normalise, in torch."""

    def __init__(
        self, size: int, mean: Sequence[float], std: Sequence[float], device: str = "cpu"
    ) -> None:
        import torch

        self.size = int(size)
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)

    @classmethod
    def from_transform(cls, transform: Any, device: str = "cpu") -> TensorPreprocess | None:
        """The torch twin of open_clip's eval transform, or None when it is not the standard
        Resize(int, bicubic) -> CenterCrop(same size) -> [convert] -> ToTensor -> Normalize."""
        from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

        steps = list(getattr(transform, "transforms", []))
        kinds = [type(t).__name__ for t in steps]
        if kinds[:2] != ["Resize", "CenterCrop"] or kinds[-1] != "Normalize":
            return None
        if any(k not in ("MaybeConvertMode", "MaybeToTensor", "ToTensor") for k in kinds[2:-1]):
            return None
        resize, crop, norm = steps[0], steps[1], steps[-1]
        assert isinstance(resize, Resize) and isinstance(crop, CenterCrop)
        assert isinstance(norm, Normalize)
        size = resize.size if isinstance(resize.size, int) else None
        if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
            size = resize.size[0]
        if (
            size is None
            or resize.max_size is not None
            or resize.interpolation != InterpolationMode.BICUBIC
            or tuple(crop.size) != (size, size)
        ):
            return None
        return cls(size, norm.mean, norm.std, device)

    def _resized_shape(self, h: int, w: int) -> tuple[int, int]:
        # torchvision's rule for Resize(int): the shorter side becomes `size`, the longer one
        # is scaled and truncated
        if h <= w:
            return self.size, int(self.size * w / h)
        return int(self.size * h / w), self.size

    def one(self, image: Any) -> Any:
        """3 x size x size float32 tensor on the device, from an H x W x C uint8 RGB image
        (numpy array, or a tensor already on the device, e.g. a masked image)."""
        import torch
        import torch.nn.functional as F

        if torch.is_tensor(image):
            x = image.to(self.device, non_blocking=True)
        else:
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, non_blocking=True)
        if x.ndim == 2:
            x = x[:, :, None].expand(-1, -1, 3)
        elif x.shape[2] == 4:
            x = x[:, :, :3]
        h, w = x.shape[:2]
        x = x.permute(2, 0, 1)[None].float()
        nh, nw = self._resized_shape(h, w)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            # PIL hands the model a uint8 image: round and clamp like it
            x = x.clamp_(0, 255).round_()
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        x = x[0, :, top : top + self.size, left : left + self.size]
        return (x / 255.0 - self.mean) / self.std

    def __call__(self, images: Sequence[Any]) -> Any:
        """N x 3 x size x size float32 tensor on the device."""
        import torch

        return torch.stack([self.one(im) for im in images])
