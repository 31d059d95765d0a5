"""Where a model runs: one resolver for torch (CLIP) and the OCR engines (ONNX Runtime, Paddle).

`device="cuda"` is a promise: a model that cannot really run on CUDA fails at start-up with a
message saying why, instead of silently running on the CPU. Asking the wheel whether it offers
CUDA is not enough - ONNX Runtime quietly drops its CUDA provider when the CUDA libraries do not
load - so the providers of the live session are checked too (`check_session`). `device="auto"`
takes CUDA where it really works and reports what it got (`DeviceUse`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "DeviceUnavailable",
    "DeviceUse",
    "check_session",
    "engine_device",
    "move_module",
    "paddlex_device",
    "session_providers",
    "torch_device",
]

CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class DeviceUnavailable(RuntimeError):
    """device=cuda was asked for and a model cannot run there."""


@dataclass(frozen=True)
class DeviceUse:
    """What a model really runs on, for logs and summary.json."""

    device: str  # "cpu" | "cuda"
    precision: str = "fp32"
    providers: tuple[str, ...] = field(default=())  # ONNX Runtime session providers, in order

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "precision": self.precision}
        if self.providers:
            out["providers"] = list(self.providers)
        return out


def _check_request(requested: str) -> None:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")


def torch_device(requested: str, what: str = "CLIP") -> str:
    """The device ("cpu" or "cuda") of a torch model; raises DeviceUnavailable when cuda is asked for and
    torch sees no GPU."""
    _check_request(requested)
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise DeviceUnavailable(
            f"device=cuda but {what} cannot run on CUDA: torch {torch.__version__} sees no GPU "
            f"(torch.cuda.is_available() is False; built for CUDA {torch.version.cuda}). "
            "Install a CUDA build of torch on a GPU node, or use --device cpu / auto."
        )
    return "cpu"


def engine_device(engine: str, requested: str, what: str = "text detector") -> str:
    """The device ("cpu" or "cuda") of an OCR engine (onnxruntime or paddle), from what it offers."""
    _check_request(requested)
    if requested == "cpu":
        return "cpu"
    if engine == "onnxruntime":
        import onnxruntime as ort

        offered = ort.get_available_providers()
        has_cuda = any(p in offered for p in CUDA_PROVIDERS)
        why = f"onnxruntime {ort.__version__} offers only {offered}"
        hint = "install the gpu extra (onnxruntime-gpu instead of onnxruntime)"
    elif engine == "paddle":
        import paddle

        has_cuda = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
        why = "paddle is not built with CUDA or sees no GPU"
        hint = "install paddlepaddle-gpu"
    else:
        raise ValueError(f"unknown inference engine {engine!r}")
    if has_cuda:
        return "cuda"
    if requested == "cuda":
        raise DeviceUnavailable(
            f"device=cuda but the {what} ({engine}) cannot run on CUDA: {why}. "
            f"{hint}, or use --device cpu / auto."
        )
    return "cpu"


def paddlex_device(device: str) -> str:
    """PaddleX's device string for a resolved device."""
    return "gpu:0" if device == "cuda" else "cpu"


def session_providers(paddle_model: Any) -> list[str] | None:
    """Providers of the live ONNX Runtime session inside a PaddleOCR model (None: not ONNX, or
    this paddleocr version hides its session)."""
    predictor = getattr(paddle_model, "paddlex_predictor", paddle_model)
    session = getattr(getattr(predictor, "runner", None), "session", None)
    get = getattr(session, "get_providers", None)
    return list(get()) if get is not None else None


def check_session(providers: Sequence[str] | None, requested: str, resolved: str, what: str) -> str:
    """The device an ONNX session really runs on, given its providers. Raises DeviceUnavailable
    when cuda was asked for and the session fell back to the CPU; warns when auto did."""
    if providers is None:  # no session to look at (paddle engine): trust the engine's answer
        return resolved
    on_cuda = any(p in providers for p in CUDA_PROVIDERS)
    if resolved == "cuda" and not on_cuda:
        msg = (
            f"the {what} was asked to run on CUDA but its ONNX Runtime session runs on "
            f"{list(providers)}: the CUDA provider failed to start (CUDA / cuDNN libraries "
            "missing or mismatched with onnxruntime-gpu?)"
        )
        if requested == "cuda":
            raise DeviceUnavailable(
                f"device=cuda: {msg}. Fix the CUDA install or use --device cpu."
            )
        log.warning("%s; running on the CPU", msg)
    return "cuda" if on_cuda else "cpu"


def move_module(module: Any, device: str) -> Any:
    """`module.to(device)` by replacing each parameter and buffer. `Module.to` swaps tensors in
    place, which fails under FakeTensorMode once anything holds a weak reference to them, so
    the fake-CUDA tests could not move a loaded model. (No tied weights in our models.)"""
    import torch

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(p.detach().to(device), False)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = b.to(device)
    return module
