"""CLIP scoring: exact against a direct open_clip computation, weights policy, batch invariance."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_CONFIG, tiny_cfg
from tmars_ray.devtools.synth import generate_sample
from tmars_ray.models.clip import ClipScorer, ModelSpec, WeightsUnavailable, load_model
from tmars_ray.models.detect import TextDetector
from tmars_ray.models.mask import mask_text
from tmars_ray.models.settings import ScorerSettings


def _direct_scores(checkpoint: str, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
    """Reference: plain open_clip, one pair at a time, no tmars_ray code involved."""
    open_clip.add_model_config(TINY_CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tmars-tiny-vit", pretrained=checkpoint
    )
    tokenizer = open_clip.get_tokenizer("tmars-tiny-vit")
    model.eval()
    out = []
    with torch.no_grad():
        for image, caption in zip(images, captions):
            img = model.encode_image(preprocess(Image.fromarray(image)).unsqueeze(0))
            txt = model.encode_text(tokenizer([caption]))
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            out.append(float((img * txt).sum()))
    return np.array(out, np.float32)


def test_scores_equal_direct_open_clip_for_original_and_masked(tiny_checkpoint):
    samples = [generate_sample(11, i) for i in range(10)]
    samples = [s for s in samples if s.lines][:5] + [s for s in samples if not s.lines][:2]
    images = [s.image for s in samples]
    captions = [s.caption for s in samples]
    cfg = tiny_cfg(clip_pretrained=tiny_checkpoint)
    dets = TextDetector(cfg.detector_settings()).detect(images)
    masks = [mask_text(im, d.polygons, cfg.mask_ring) for im, d in zip(images, dets)]
    assert sum(m.n_text_boxes > 0 for m in masks) >= 4
    masked = [m.masked if m.n_text_boxes else None for m in masks]
    scorer = ClipScorer(ModelSpec(TINY_CONFIG, tiny_checkpoint), ScorerSettings("cpu", "fp32", 4))
    assert not scorer.is_random
    clip, tmars = scorer.score(images, masked, captions)
    np.testing.assert_allclose(clip, _direct_scores(tiny_checkpoint, images, captions), atol=1e-4)
    masked_or_orig = [m if m is not None else im for m, im in zip(masked, images)]
    np.testing.assert_allclose(
        tmars, _direct_scores(tiny_checkpoint, masked_or_orig, captions), atol=1e-4
    )
    for i, m in enumerate(masked):
        if m is None:
            assert tmars[i] == clip[i]  # text-free: encoded once, same score


def test_score_of_a_sample_does_not_depend_on_its_batch(tiny_checkpoint):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (60 + i, 80, 3), dtype=np.uint8) for i in range(21)]
    captions = [f"a photo of thing {i}" for i in range(21)]
    # captions of several token lengths: they run on different (bucketed) lengths
    captions = [f"a photo of thing {i}" + " and more words" * (i % 5) for i in range(21)]
    scorer = ClipScorer(
        ModelSpec(TINY_CONFIG, tiny_checkpoint), ScorerSettings("cpu", batch_size=8)
    )
    assert scorer._short_text
    full, _ = scorer.score(images, [None] * 21, captions)
    for lo, hi in [(0, 1), (3, 5), (5, 18), (20, 21)]:
        part, _ = scorer.score(images[lo:hi], [None] * (hi - lo), captions[lo:hi])
        assert np.array_equal(part, full[lo:hi])  # bit-identical, not just close


def test_caption_tower_on_the_real_token_length_equals_the_full_context(tiny_checkpoint):
    scorer = ClipScorer(
        ModelSpec(TINY_CONFIG, tiny_checkpoint), ScorerSettings("cpu", batch_size=8)
    )
    captions = [
        "",
        "a",
        "a red bus",
        "a photo of a cat sitting on a mat next to a dog",
        " ".join(["word"] * 30),
        " ".join(["long"] * 100),  # truncated by the tokenizer: the whole context
    ] + [f"caption number {i} " + "x " * i for i in range(12)]
    tokens = scorer.tokenizer(captions)
    lengths = (tokens.argmax(dim=-1) + 1).tolist()
    assert min(lengths) <= 3 and max(lengths) == 77  # short and full-length captions
    short = scorer.encode_texts(captions)
    full = scorer.encode_texts(captions, full_context=True)
    assert np.abs(short - full).max() <= 1e-5
    # the same through open_clip itself, unpadded, one caption at a time
    with torch.no_grad():
        for i, cap in enumerate(captions[:4]):
            ref = scorer.model.encode_text(scorer.tokenizer([cap]), normalize=True)[0].numpy()
            assert np.abs(short[i] - ref).max() <= 1e-5


def test_other_text_towers_run_the_full_context(tiny_checkpoint):
    scorer = ClipScorer(ModelSpec(TINY_CONFIG, tiny_checkpoint), ScorerSettings("cpu"))
    assert scorer._short_text
    scorer.model.text_pool_type = "last"  # prefix pooling would not be exact: full encode
    from tmars_ray.models.clip import _standard_text_tower

    assert not _standard_text_tower(scorer.model)
    off = ClipScorer(
        ModelSpec(TINY_CONFIG, tiny_checkpoint), ScorerSettings("cpu", text_length_step=0)
    )
    assert not off._short_text


def test_without_the_original_encode_only_tmars_scores(tiny_checkpoint):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    masked = [None, images[1] // 2, None, images[3] // 3, images[4] // 4]
    captions = [f"thing {i}" for i in range(5)]
    spec = ModelSpec(TINY_CONFIG, tiny_checkpoint)
    clip, tmars = ClipScorer(spec, ScorerSettings("cpu")).score(images, masked, captions)
    only = ClipScorer(spec, ScorerSettings("cpu", score_original=False))
    clip2, tmars2 = only.score(images, masked, captions)
    assert np.isnan(clip2).all() and np.isfinite(clip).all()
    np.testing.assert_allclose(tmars2, tmars, atol=1e-6)


def test_offline_default_weights_fail_fast_with_help():
    code = (
        "from tmars_ray.models.clip import ensure_weights, ModelSpec\n"
        "ensure_weights(ModelSpec('ViT-B-32', 'openai'))\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "", "PATH": "/usr/bin:/bin", "HOME": "/tmp/tmars-no-cache-home"},
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "WeightsUnavailable" in proc.stderr and "--clip-pretrained" in proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s: must not retry for a minute"


def test_random_weights_only_on_explicit_opt_in():
    with pytest.raises(WeightsUnavailable):
        load_model(ModelSpec("ViT-B-32", "openai"))  # offline: no download, no fallback
    with pytest.raises(WeightsUnavailable):
        load_model(ModelSpec(TINY_CONFIG, "/nonexistent/ckpt.pt"))
    a, *_, random_a = load_model(ModelSpec(TINY_CONFIG, None, allow_random=True, seed=5))
    b, *_, random_b = load_model(ModelSpec(TINY_CONFIG, None, allow_random=True, seed=5))
    assert random_a and random_b
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka  # seeded: every actor holds the same random model


def test_job_refuses_to_start_without_weights(tmp_path, small_pool):
    from tmars_ray.job import JobError, run

    cfg = tiny_cfg(
        input=small_pool,
        output=str(tmp_path / "run"),
        clip_model="ViT-B-32",
        clip_pretrained="openai",
    )
    start = time.monotonic()
    with pytest.raises(JobError, match="--clip-pretrained"):
        run(cfg)
    assert time.monotonic() - start < 20
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
