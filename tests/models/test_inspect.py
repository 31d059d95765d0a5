"""`tmars inspect` as a user runs it: a subprocess, offline, real detector, a local checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image

from tests.conftest import REPO, TINY_CONFIG
from tmars_ray.devtools.synth import generate_sample


def test_inspect_prints_boxes_scores_and_writes_masked_png(tmp_path, tiny_checkpoint):
    with_text = next(s for s in (generate_sample(51, i) for i in range(40)) if s.category == "text")
    plain = next(s for s in (generate_sample(51, i) for i in range(40)) if not s.lines)
    Image.fromarray(with_text.image).save(tmp_path / "sign.png")
    Image.fromarray(plain.image).save(tmp_path / "plain.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tmars_ray",
            "inspect",
            str(tmp_path / "sign.png"),
            str(tmp_path / "plain.png"),
            "--caption",
            with_text.caption,
            "--clip-model",
            TINY_CONFIG,
            "--clip-pretrained",
            tiny_checkpoint,
            "--device",
            "cpu",
            "--save-masked",
            str(tmp_path / "masked"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sign, blank = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    for key in ("image", "boxes", "n_text_boxes", "text_area", "clip_score", "tmars_score"):
        assert key in sign and key in blank
    assert sign["n_text_boxes"] >= 1 and sign["text_area"] > 0
    assert sign["tmars_score"] != sign["clip_score"]
    assert blank["n_text_boxes"] == 0 and blank["tmars_score"] == blank["clip_score"]
    masked = np.asarray(Image.open(tmp_path / "masked" / "sign.png"))
    assert masked.shape == with_text.image.shape
    ink = np.zeros(masked.shape[:2], bool)
    for line in with_text.lines:
        ink |= line.ink
    # the text's pixels changed, the rest of the picture did not
    assert np.abs(masked[ink].astype(int) - with_text.image[ink].astype(int)).mean() > 5
    # outside the printed boxes the picture is untouched
    inside = np.zeros(masked.shape[:2], np.uint8)
    for flat in sign["boxes"]:
        cv2.fillPoly(inside, [np.round(np.asarray(flat).reshape(-1, 2)).astype(np.int32)], 1)
    inside = cv2.dilate(inside, np.ones((5, 5), np.uint8)).astype(bool)
    assert np.array_equal(masked[~inside], with_text.image[~inside])
