"""A custom model-config JSON named like a builtin open_clip model is an error (issue 25 item
5): open_clip keeps its own config of that name and would silently ignore the file."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import TINY_CONFIG
from tmars_ray.models import clip
from tmars_ray.models.settings import ClipSpec


def test_custom_config_shadowing_a_builtin_name_is_an_error(tmp_path):
    shadow = tmp_path / "ViT-B-32.json"
    shutil.copy(TINY_CONFIG, shadow)
    with pytest.raises(ValueError, match="shadows another open_clip model config"):
        clip.ensure_weights(ClipSpec(str(shadow), None, True, 0))
    # the same file under its own name registers, and registers again without complaint
    own = tmp_path / "tmars-tiny-shadow-test.json"
    shutil.copy(TINY_CONFIG, own)
    for _ in range(2):
        with pytest.raises(clip.WeightsUnavailable):  # no weights given: the next check
            clip.ensure_weights(ClipSpec(str(own), None, False, 0))
