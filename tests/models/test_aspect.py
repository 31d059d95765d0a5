"""Extreme aspect ratios: the CLIP input is bounded by the output size, and what the model
sees is what open_clip's own transform gives."""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from PIL import Image

from tmars_ray.models.aspect import MAX_ASPECT, centre_band


def test_band_bounds_every_form_and_leaves_normal_images_alone():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 255, (3, 20000, 3), np.uint8)
    for image in (wide, torch.from_numpy(wide), Image.fromarray(wide)):
        band = centre_band(image)
        size = band.size if isinstance(band, Image.Image) else band.shape[1::-1]
        assert size == (3 * MAX_ASPECT, 3)
    tall = rng.integers(0, 255, (20000, 1, 3), np.uint8)
    assert centre_band(tall).shape == (MAX_ASPECT, 1, 3)
    assert np.array_equal(centre_band(tall)[0], tall[(20000 - MAX_ASPECT) // 2])
    normal = rng.integers(0, 255, (300, 900, 3), np.uint8)
    assert centre_band(normal) is normal


def test_model_sees_the_same_centre_as_open_clips_transform():
    """A 1:200 image: open_clip's transform on the whole image vs on the band."""
    _, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, device="cpu")
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (4, 4, 3), np.uint8)  # smooth content, upsampled
    image = Image.fromarray(np.asarray(Image.fromarray(small).resize((800, 4))))
    full, banded = pre(image), pre(centre_band(image))
    assert full.shape == banded.shape
    assert torch.allclose(full, banded, atol=1e-5)


def test_only_short_side_resize_then_centre_crop_is_banded():
    from torchvision import transforms as T

    _, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, device="cpu")
    from tmars_ray.models.aspect import crops_centre_after_short_side_resize as banded

    assert banded(pre)
    assert not banded(T.Compose([T.Resize((224, 224)), T.ToTensor()]))  # squash sees it all
    assert not banded(T.Compose([T.Resize(224), T.ToTensor()]))  # no crop: nothing to cut
