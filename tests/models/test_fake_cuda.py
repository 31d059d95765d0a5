"""The CUDA path on fake `cuda` tensors (torch FakeTensorMode; no GPU needed, DESIGN 7): the
detector, the masking, CLIP scoring and the fused device step run their tensor code on `cuda`
up to the one copy to the host, and any CPU/CUDA mix raises as on a GPU. `pytest -k fake_cuda`.

Before the fix in `clip.encode_texts` (a CPU table filled from CUDA rows) the scoring tests
failed with "Mismatching aten.index_put_.default device between self (cpu) and values
(cuda:0)" - on a GPU that error made every row `score_error`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_CONFIG
from tests.fake_cuda import fake_cuda, host_copies, on_fake_cuda, real
from tmars_ray.data import schema
from tmars_ray.devtools.synth import generate_sample
from tmars_ray.models import clip
from tmars_ray.models.clip import ClipScorer, ModelSpec
from tmars_ray.models.gpu_step import DeviceTmarsStep, decode_batch
from tmars_ray.models.mask_torch import mask_text_torch
from tmars_ray.models.settings import DetectorSettings, ScorerSettings
from tmars_ray.models.tmars import MaskScoreStep, SampleScore

CAPTIONS = ["a cat", "a red double-decker bus on a rainy london street at night", "x", "sale"]


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def _spec() -> ModelSpec:
    return ModelSpec(TINY_CONFIG, None, allow_random=True, seed=3)


def _cpu_scorer(precision: str = "fp16") -> ClipScorer:
    return ClipScorer(_spec(), ScorerSettings("cpu", precision, 8, preprocess="torch"))


def _on_cuda(scorer: ClipScorer) -> ClipScorer:
    """A CPU-built scorer moved to (fake) cuda, with real host tokenising."""
    gpu = scorer.to("cuda")
    gpu.host_tokens = real(gpu.host_tokens)
    return gpu


def _pictures(n: int) -> list[np.ndarray]:
    return [generate_sample(17, i).image for i in range(n)]


def test_fake_cuda_harness_catches_a_device_mix():
    """The guard itself: a host tensor filled from a cuda tensor raises (it could not pass)."""
    with fake_cuda():
        rows = torch.zeros(3, 4, device="cuda")
        with pytest.raises(RuntimeError, match="device"):
            torch.zeros(3, 4)[torch.tensor([0, 1, 2])] = rows


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_fake_cuda_clip_scoring(monkeypatch, precision):
    images, cpu = _pictures(4), _cpu_scorer(precision)
    with fake_cuda(), host_copies(monkeypatch, clip) as copies:
        scorer = _on_cuda(cpu)
        assert scorer.tensor_input and on_fake_cuda(next(scorer.model.parameters()))
        originals = [torch.from_numpy(im).to("cuda") for im in images]
        masked = [None, originals[1].clone(), None, originals[3].clone()]
        clip_s, tmars_s = scorer.score(originals, masked, CAPTIONS)
    assert clip_s.shape == tmars_s.shape == (4,)
    # captions of several lengths: several prefix buckets gathered into one device table
    assert len(scorer.host_tokens(CAPTIONS)[1]) >= 2
    assert copies and all(on_fake_cuda(t) for t in copies)
    assert [tuple(t.shape) for t in copies] == [(4, 32), (6, 32)]  # texts; 4 originals + 2 masked


def test_fake_cuda_masking():
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    cases = [
        [_box(10, 10, 60, 40), _box(50, 30, 110, 80)],  # overlapping text
        [_box(0, 0, 119, 89)],  # all text: the fallback mean, still no host sync
        [_box(5, 5, 60, 60), _box(0, 0, 4, 89), _box(61, 0, 119, 89)],  # ring widens
    ]
    with fake_cuda():
        t = torch.from_numpy(image).to("cuda")
        for polys in cases:
            res = mask_text_torch(t, polys)
            assert on_fake_cuda(res.masked) and tuple(res.masked.shape) == image.shape
            assert res.n_text_boxes == len(polys)
        gray = mask_text_torch(t[..., 0], cases[0])
        assert on_fake_cuda(gray.masked) and tuple(gray.masked.shape) == (90, 120)


def test_fake_cuda_mask_score_step(monkeypatch):
    """The split pools' scoring half: host images moved once, masked and scored on cuda."""
    images = _pictures(4)
    polys = [[_box(5, 5, 40, 20)], [], [_box(10, 10, 30, 30), _box(20, 20, 50, 40)], []]
    step = MaskScoreStep([_spec()], ScorerSettings("cpu", "fp16", 8, preprocess="torch"))
    with fake_cuda(), host_copies(monkeypatch, clip) as copies:
        step.scorers = [_on_cuda(step.scorers[0])]
        assert step.scorers[0].device == "cuda"
        out = step(images, polys, CAPTIONS)
    assert [s.n_text_boxes for s in out] == [1, 0, 2, 0]
    assert all(s.status == schema.OK for s in out), [s.error for s in out]
    assert copies and all(on_fake_cuda(t) for t in copies)


@pytest.fixture
def device_step():  # per test: moving it to fake cuda leaves fake parameters behind
    return DeviceTmarsStep(
        DetectorSettings(device="cpu", threads=1),
        [_spec()],
        ScorerSettings("cpu", "fp16", 8, preprocess="torch"),
        device="cpu",
    )


def test_fake_cuda_detector(device_step):
    images = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in _pictures(3)]
    with fake_cuda():
        device_step.detector.to("cuda", "fp16")
        maps = device_step.prob_maps([im.to("cuda") for im in images])
    assert sum(len(idx) for idx, _ in maps.values()) == 3
    for (h, w), (idx, prob) in maps.items():
        assert on_fake_cuda(prob) and tuple(prob.shape) == (len(idx), h, w)


def test_fake_cuda_fused_step(monkeypatch, device_step):
    """Decode (the CPU-decoded formats moved to cuda), detect, mask and score on cuda; the
    polygons come from the same step run for real on the CPU (DB post-processing is host work
    on the copied maps)."""
    images = _pictures(4)
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    cpu_images, _ = decode_batch(pngs, 1 << 28, "cpu")
    polys = device_step.polygons(cpu_images, device_step.prob_maps(cpu_images))
    assert sum(len(p) for p in polys) >= 2  # the synthetic pictures carry text
    samples = [SampleScore(schema.OK) for _ in images]
    with fake_cuda(), host_copies(monkeypatch, clip) as copies:
        step = device_step.to("cuda")
        step.scorers = [_on_cuda(sc) for sc in step.scorers]
        imgs, status = decode_batch(pngs, 1 << 28, "cuda")
        assert status == [schema.OK] * 4 and all(on_fake_cuda(t) for t in imgs)
        maps = step.prob_maps(imgs)
        assert all(on_fake_cuda(prob) for _, prob in maps.values())
        kept, originals, masked = step.mask_images(imgs, polys, samples)
        assert kept == samples
        assert all(on_fake_cuda(t) for t in originals + [m for m in masked if m is not None])
        step.score(samples, originals, masked, CAPTIONS)
    assert [s.n_text_boxes > 0 for s in samples] == [len(p) > 0 for p in polys]
    assert copies and all(on_fake_cuda(t) for t in copies)
