"""Device honesty: --device cuda fails at model start-up unless the model really runs on CUDA;
--device auto reports what each model got. On this CPU machine every CUDA request must fail."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, TINY_CONFIG, tiny_cfg
from tmars_ray.models.clip import ClipScorer, ModelSpec
from tmars_ray.models.detect import TextDetector
from tmars_ray.models.device import DeviceUnavailable, check_session
from tmars_ray.models.recognize import TextRecognizer
from tmars_ray.models.settings import DetectorSettings, RecognizerSettings, ScorerSettings


def _has_cuda() -> bool:
    import onnxruntime as ort
    import torch

    return torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers()


pytestmark = pytest.mark.skipif(_has_cuda(), reason="a CUDA machine: cuda requests may succeed")


def test_cuda_detector_fails_at_start_up_with_a_clear_message() -> None:
    with pytest.raises(DeviceUnavailable, match=r"device=cuda.*text detector.*onnxruntime-gpu"):
        TextDetector(DetectorSettings(device="cuda"))
    with pytest.raises(DeviceUnavailable, match=r"device=cuda.*text recogniser"):
        TextRecognizer(RecognizerSettings(device="cuda"))


def test_cuda_clip_fails_at_start_up_with_a_clear_message(tiny_checkpoint) -> None:
    spec = ModelSpec(TINY_CONFIG, tiny_checkpoint)
    with pytest.raises(DeviceUnavailable, match=r"device=cuda.*CLIP.*torch.*no GPU"):
        ClipScorer(spec, ScorerSettings(device="cuda"))


def test_a_session_that_fell_back_to_cpu_is_caught(caplog) -> None:
    # the wheel may offer CUDA while the live session runs on CPU (CUDA libraries missing): the
    # check reads the real session's providers
    det = TextDetector(DetectorSettings(device="cpu", threads=1))
    providers = list(det._session.get_providers())
    assert providers == ["CPUExecutionProvider"]
    with pytest.raises(DeviceUnavailable, match=r"ONNX Runtime session runs on.*CPUExecution"):
        check_session(providers, "cuda", "cuda", "text detector")
    with caplog.at_level(logging.WARNING):
        assert check_session(providers, "auto", "cuda", "text detector") == "cpu"
    assert "running on the CPU" in caplog.text
    assert det.device_report() == {
        "device": "cpu",
        "precision": "fp32",
        "providers": ["CPUExecutionProvider"],
    }


def test_stages_report_devices_and_refuse_cuda(tiny_checkpoint) -> None:
    from tmars_ray.engine.stages import DetectStage, MaskScoreStage

    auto = tiny_cfg(clip_pretrained=tiny_checkpoint, device="auto", precision="fp16")
    assert DetectStage(auto).device_report() == {
        "detector": {"device": "cpu", "precision": "fp32", "providers": ["CPUExecutionProvider"]}
    }
    # fp16 is a CUDA precision: on the CPU the scorer runs, and reports, fp32
    assert MaskScoreStage(auto).device_report() == {
        "clip": {"device": "cpu", "precision": "fp32", "preprocess": "pil"}
    }
    cuda = tiny_cfg(clip_pretrained=tiny_checkpoint, device="cuda")
    with pytest.raises(DeviceUnavailable):
        DetectStage(cuda)
    with pytest.raises(DeviceUnavailable):
        MaskScoreStage(cuda)


def test_inspect_with_device_cuda_exits_with_the_reason(tmp_path, tiny_checkpoint) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tmars_ray", "inspect", str(tmp_path / "a.png"), "--caption", "x",
         "--clip-model", TINY_CONFIG, "--clip-pretrained", tiny_checkpoint, "--device", "cuda"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: device=cuda" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
