"""Fake CUDA on a CPU-only machine, for the `fake_cuda` tests (DESIGN 7).

Inside `fake_cuda()` torch's FakeTensorMode is on: tensors carry shapes, dtypes and devices
but no values, `cuda` tensors can be made without a GPU, and an op mixing a CPU tensor with a
CUDA one raises as it would on a GPU. Modules built on the CPU are moved with their own
`.to("cuda")`. Host work (tokenising, bucketing) must run for real: wrap it in `real`. A fake
tensor has no values, so tests stop at the code's one copy to the host (`host_copies`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily


@contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # params become fake
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)


def real(fn: Callable) -> Callable:
    """`fn` run outside the fake mode: host work keeps its values."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return run


def on_fake_cuda(t: Any) -> bool:
    return isinstance(t, FakeTensor) and t.device.type == "cuda"


@contextmanager
def host_copies(monkeypatch, module: Any, name: str = "to_host") -> Iterator[list]:
    """Replace `module.<name>` (the code's one tensor -> numpy copy) by one that records the
    tensor and returns zeros of its shape; yields the recorded tensors."""
    seen: list = []

    def copy(t: Any) -> np.ndarray:
        seen.append(t)
        return np.zeros(tuple(t.shape), np.float32)

    monkeypatch.setattr(module, name, copy)
    yield seen
