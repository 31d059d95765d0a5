"""The fused device step (`models.gpu_step`, the CUDA path's code) run for real on the CPU:
the same statuses, boxes and scores as the CPU path; out-of-memory splits its batch down to
one sample (status oom); any other error of a batched call is fatal, never a column of
score_error; a step whose first samples all fail the same way stops early."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tests.conftest import TINY_CONFIG
from tmars_ray.data import schema
from tmars_ray.data.decode import decode_image
from tmars_ray.devtools.bench_device import same_boxes
from tmars_ray.devtools.synth import generate_sample
from tmars_ray.models.clip import ClipScorer, ModelSpec
from tmars_ray.models.gpu_step import DeviceTmarsStep
from tmars_ray.models.settings import DetectorSettings, MaskSettings, ScorerSettings, TmarsSettings
from tmars_ray.models.tmars import FailureWatch, FatalStepError, MaskScoreStep, TmarsStep

SPEC = ModelSpec(TINY_CONFIG, None, allow_random=True, seed=3)
SCORER = ScorerSettings("cpu", "fp32", 8)


@pytest.fixture(scope="module")
def pool():
    samples = [generate_sample(23, i) for i in range(24)]
    datas = []
    for k, s in enumerate(samples):
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, format="JPEG" if k % 2 else "PNG", quality=90)
        datas.append(buf.getvalue())
    datas[5] = datas[5][:200]  # truncated: decode_error on both paths
    return datas, [s.caption for s in samples]


@pytest.fixture(scope="module")
def step():
    return DeviceTmarsStep(DetectorSettings(device="cpu", threads=2), [SPEC], SCORER, device="cpu")


def test_device_step_agrees_with_the_cpu_path(pool, step):
    datas, captions = pool
    got = step(datas, captions)
    images = [decode_image(d, 1 << 28)[0] for d in datas]
    ref_step = TmarsStep(TmarsSettings(DetectorSettings(device="cpu", threads=2), [SPEC], SCORER))
    live = [i for i, im in enumerate(images) if im is not None]
    ref = dict(zip(live, ref_step([images[i] for i in live], [captions[i] for i in live])))
    assert got[5].status == schema.DECODE_ERROR and 5 not in ref
    assert [got[i].status for i in live] == [ref[i].status for i in live] == [schema.OK] * 23
    agree = [same_boxes(got[i].boxes, ref[i].boxes) for i in live]
    assert sum(agree) >= 0.9 * len(live), agree
    assert sum(len(got[i].boxes) > 0 for i in live) >= 10  # the pool carries text
    for i in live:
        for col in ("clip_score", "tmars_score"):
            assert abs(got[i].scores[col] - ref[i].scores[col]) <= 1e-2
        if agree[live.index(i)] and not got[i].boxes:  # no text: both scores the same image's
            assert got[i].scores["tmars_score"] == got[i].scores["clip_score"]


def _oom_when(monkeypatch, poison: str):
    """ClipScorer.score runs out of memory on any batch holding the `poison` caption or more
    than two samples (what a too-large batch on a full GPU does)."""
    real = ClipScorer.score

    def score(self, originals, masked, captions):
        if poison in captions or len(captions) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, originals, masked, captions)

    monkeypatch.setattr(ClipScorer, "score", score)


def test_out_of_memory_splits_down_to_one_sample(monkeypatch, pool, step):
    datas, captions = pool
    datas, captions = datas[:8], list(captions[:8])
    whole = step(datas, captions)
    captions[3] = "poison"
    _oom_when(monkeypatch, "poison")
    split = step(datas, captions)
    ok, oom, bad = schema.OK, schema.OOM, schema.DECODE_ERROR
    assert [s.status for s in split] == [ok, ok, ok, oom, ok, bad, ok, ok]
    for k in (0, 1, 2, 4, 6, 7):  # the same scores as in one batch
        assert split[k].scores["tmars_score"] == pytest.approx(whole[k].scores["tmars_score"])


def test_out_of_memory_in_the_split_pools_scoring_half(monkeypatch):
    images = [generate_sample(29, i).image for i in range(6)]
    captions = ["a", "b", "poison", "d", "e", "f"]
    msteps = MaskScoreStep([SPEC], SCORER, MaskSettings())
    _oom_when(monkeypatch, "poison")
    out = msteps(images, [[] for _ in images], captions)
    assert [s.status for s in out] == ["ok", "ok", "oom", "ok", "ok", "ok"]


def test_other_errors_of_the_device_step_are_fatal(monkeypatch, pool, step):
    def broken(self, originals, masked, captions):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ClipScorer, "score", broken)
    with pytest.raises(FatalStepError, match="score stage on cpu: RuntimeError: CUDA error"):
        step(*pool)


def test_failure_watch_stops_a_step_whose_first_samples_all_fail_alike():
    watch = FailureWatch("score", at_least=8)
    watch.see([(schema.DECODE_ERROR, "bad bytes")] * 20)  # the inputs' fault: ignored
    watch.see([(schema.SCORE_ERROR, "RuntimeError: boom")] * 5)
    with pytest.raises(FatalStepError, match="first 8 samples all failed with RuntimeError: boom"):
        watch.see([(schema.SCORE_ERROR, "RuntimeError: boom")] * 3)
    mixed = FailureWatch("score", at_least=8)
    mixed.see([(schema.SCORE_ERROR, "a")] * 4 + [(schema.OK, None)] + [(schema.SCORE_ERROR, "a")])
    mixed.see([(schema.SCORE_ERROR, "a")] * 50)  # disarmed by the ok sample
    varied = FailureWatch("detect", at_least=8)
    varied.see([(schema.DETECT_ERROR, f"e{i}") for i in range(20)])  # bad inputs, each its own


def test_only_plain_complete_jpegs_go_to_nvjpeg():
    """The GPU decoder gets RGB/L JPEGs that are complete and within the pixel limit; CMYK,
    truncated, PNG and oversized files take the CPU decoder (its statuses unchanged)."""
    from tmars_ray.models.gpu_step import gpu_decodable

    def encode(mode: str, fmt: str = "JPEG", size=(40, 30)) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, size, 128 if mode == "L" else None).save(buf, format=fmt)
        return buf.getvalue()

    assert gpu_decodable(encode("RGB"), 1 << 20) and gpu_decodable(encode("L"), 1 << 20)
    assert not gpu_decodable(encode("CMYK"), 1 << 20)
    assert not gpu_decodable(encode("RGB")[:-40], 1 << 20)  # no end marker: truncated
    assert not gpu_decodable(encode("RGB", "PNG"), 1 << 20)
    assert not gpu_decodable(encode("RGB"), 40 * 30 - 1)  # over the pixel limit
