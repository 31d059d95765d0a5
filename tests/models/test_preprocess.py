"""Torch image preprocessing vs open_clip's PIL preprocessing, on photos the tests do not make
(scikit-image's sample images): scores within the documented tolerance, same keep decisions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from tests.conftest import TINY_CONFIG
from tmars_ray.models.clip import ClipScorer, ModelSpec
from tmars_ray.models.preprocess import SCORE_TOLERANCE, TensorPreprocess
from tmars_ray.models.settings import ScorerSettings

PHOTOS = {
    "astronaut": "an astronaut in a space suit",
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket on the launch pad",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained cells under a microscope",
    "retina": "a retina",
    "cat": "a cat looking at the camera",
    "colorwheel": "a colour wheel",
    "logo": "a python logo",
    "camera": "a man with a camera",  # gray
    "coins": "old coins",  # gray
    "moon": "the surface of the moon",  # gray
    "page": "a page of printed text",  # gray
    "text": "text written on a wall",  # gray
    "horse": "a horse",  # bool silhouette
    "clock": "a clock",  # gray
    "brick": "a brick wall",  # gray
}


def _photos() -> tuple[list[np.ndarray], list[str]]:
    from skimage import data

    images, captions = [], []
    for name, caption in PHOTOS.items():
        im = getattr(data, name)()
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        images.append(np.ascontiguousarray(im[:, :, :3]).astype(np.uint8))
        captions.append(caption)
    return images, captions


@pytest.fixture(scope="module")
def both(tiny_checkpoint) -> tuple[ClipScorer, ClipScorer]:
    spec = ModelSpec(TINY_CONFIG, tiny_checkpoint)
    pil = ClipScorer(spec, ScorerSettings("cpu", preprocess="pil"))
    torch_ = ClipScorer(spec, ScorerSettings("cpu", preprocess="torch"))
    assert pil.device_report()["preprocess"] == "pil"
    assert torch_.device_report()["preprocess"] == "torch"
    return pil, torch_


def test_scores_within_tolerance_and_same_keep_decisions(both) -> None:
    pil, tensor = both
    images, captions = _photos()
    assert len({im.shape[:2] for im in images}) >= 5  # many sizes and aspect ratios
    a = pil.encode_images(images) @ pil.encode_texts(captions).T
    b = tensor.encode_images(images) @ tensor.encode_texts(captions).T
    diff = np.abs(a - b)
    assert diff.max() <= SCORE_TOLERANCE, diff.max()
    assert spearmanr(a.ravel(), b.ravel()).correlation >= 0.99
    # keep-list at fraction 0.5 over all (image, caption) pairs: every pair farther than the
    # largest score difference from the threshold gets the same decision both ways
    sa, sb = a.ravel(), b.ravel()
    threshold = np.sort(sa)[::-1][len(sa) // 2 - 1]
    keep_a, keep_b = sa >= threshold, sb >= np.sort(sb)[::-1][len(sb) // 2 - 1]
    clear = np.abs(sa - threshold) > 2 * diff.max()
    assert clear.mean() > 0.9
    assert np.array_equal(keep_a[clear], keep_b[clear])


def test_pixels_close_to_pil(both) -> None:
    pil, tensor = both
    from PIL import Image

    images, _ = _photos()
    for im in images[:6]:
        ref = pil.preprocess(Image.fromarray(im)).numpy()
        got = tensor._tensor_pre([im])[0].numpy()
        assert got.shape == ref.shape
        # normalised units: 1/255 / std ~ 0.015 is one grey level
        assert np.mean(np.abs(got - ref)) < 0.02 and np.abs(got - ref).max() < 0.5


def test_only_the_standard_transform_is_translated(both) -> None:
    from torchvision import transforms as T

    pil, _ = both
    assert TensorPreprocess.from_transform(pil.preprocess) is not None
    odd = T.Compose(
        [T.Resize((64, 64)), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    )
    assert TensorPreprocess.from_transform(odd) is None
    assert TensorPreprocess.from_transform(T.Compose([T.ToTensor()])) is None
