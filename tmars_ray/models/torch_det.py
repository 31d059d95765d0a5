"""The DB text detector as a torch module, made from the same ONNX weights as the CPU path.

On a GPU both models run in one runtime (torch): no onnxruntime-gpu and its CUDA/cuDNN wheel
coupling. onnx2torch 1.5.15 cannot convert the packaged PP-OCRv5 det as shipped (its weights
are Constant nodes); once those become graph initializers it converts in ~1.3 s on one CPU core
(measured here), so the module is converted once per actor at load and not cached on disk.
Measured on CPU (max abs difference of the probability map): 1.4e-7 from ONNX Runtime on random
input, up to 5.2e-5 on real images - where ONNX Runtime differs from itself (optimised graph vs
none) by up to 2.9e-5. `tests/models/test_torch_det.py` holds it to 3x that self-difference, to
1e-4, and to the same boxes.

Input: N x 3 x H x W uint8 BGR (the CPU session's channel order); PaddleOCR's normalisation is
applied here, on the module's device. Output: N x H x W float32 probability maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tmars_ray.models.device import move_module

__all__ = ["TorchDBDetector", "constants_to_initializers", "load_torch_detector"]


def constants_to_initializers(model: Any) -> int:
    """Move every tensor-valued Constant node of `model.graph` into graph.initializer and fold
    Reshapes of constants (in place), the form onnx2torch converts; returns how many nodes
    became initializers."""
    from onnx import numpy_helper

    graph = model.graph
    keep, moved = [], 0
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        attrs = list(node.attribute)
        if node.op_type == "Constant" and len(attrs) == 1 and attrs[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(attrs[0].t)
        elif (
            node.op_type == "Reshape"
            and all(i in values for i in node.input)
            and all(a.name == "allowzero" and a.i == 0 for a in attrs)
        ):
            # reshaped weights: folded here, else the module reads the shape tensor on every
            # call (a device->host sync on CUDA, and impossible on fake tensors)
            data, shape = values[node.input[0]], values[node.input[1]]
            dims = [data.shape[k] if d == 0 else int(d) for k, d in enumerate(shape)]
            values[node.output[0]] = data.reshape(dims)
        else:
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(values[node.output[0]], node.output[0]))
        moved += 1
    used = {i for n in keep for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    del graph.node[:]
    graph.node.extend(keep)
    return moved


def load_torch_detector(onnx_file: str | Path) -> Any:
    """The ONNX DB detector converted to a torch module (eval mode, CPU, fp32)."""
    import onnx
    from onnx2torch import convert

    model = onnx.load(str(onnx_file))
    constants_to_initializers(model)
    return _fixed_resizes(convert(model).eval())


def _fixed_resizes(module: Any) -> Any:
    """Replace onnx2torch's Resize modules whose scales are constants by a fixed-scale
    interpolate: theirs read the scales tensor on every call (`.tolist()`: a device->host sync
    per upsampling on CUDA, impossible on fake tensors)."""
    import torch
    import torch.nn.functional as F

    class FixedResize(torch.nn.Module):
        def __init__(self, mode: str, scales: list[float]) -> None:
            super().__init__()
            self.mode, self.scales = mode, scales

        def forward(self, x: Any) -> Any:
            return F.interpolate(x, scale_factor=self.scales, mode=self.mode)

    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        sub = module.get_submodule(node.target)
        if type(sub).__name__ != "OnnxResize" or len(node.args) != 3:
            continue
        scales_node = node.args[2]
        if getattr(scales_node, "op", None) != "get_attr" or sub.onnx_mode != "nearest":
            continue
        owner, _, name = scales_node.target.rpartition(".")
        value = getattr(module.get_submodule(owner) if owner else module, name)
        scales = [float(v) for v in value.tolist()]
        if scales[:2] != [1.0, 1.0]:
            continue
        module.add_submodule(node.target, FixedResize("nearest", scales[2:]))
        node.args = (node.args[0],)
    graph.eliminate_dead_code()
    module.recompile()
    return module


class TorchDBDetector:
    """uint8 BGR batches -> probability maps, on `device` ("cpu" or "cuda"), in `precision`
    (fp32, or fp16/bf16 autocast on CUDA)."""

    def __init__(
        self,
        onnx_file: str | Path,
        alpha: np.ndarray,
        beta: np.ndarray,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        self.module = load_torch_detector(onnx_file)
        self.alpha_np, self.beta_np = np.asarray(alpha, np.float32), np.asarray(beta, np.float32)
        self.to(device, precision)

    def to(self, device: str, precision: str | None = None) -> TorchDBDetector:
        """Move to `device` (conversion always runs on real CPU tensors, so the fake-CUDA tests
        build on CPU and move inside FakeTensorMode)."""
        import torch

        self.device = device
        self.module = move_module(self.module, device)
        self.alpha = torch.tensor(self.alpha_np, device=device).view(1, 3, 1, 1)
        self.beta = torch.tensor(self.beta_np, device=device).view(1, 3, 1, 1)
        precision = precision or getattr(self, "precision", "fp32")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.autocast_dtype = dtype if device == "cuda" else None
        self.precision = precision if self.autocast_dtype is not None else "fp32"
        return self

    def __call__(self, bgr_u8: Any) -> Any:
        """N x 3 x H x W uint8 BGR tensor (on the device) -> N x H x W float32 maps there."""
        import torch

        x = bgr_u8.float() * self.alpha + self.beta  # a host tensor here raises: no hidden copy
        with (
            torch.no_grad(),
            torch.autocast(
                "cuda",
                dtype=self.autocast_dtype or torch.float16,
                enabled=self.autocast_dtype is not None,
            ),
        ):
            prob = self.module(x)
        return prob[:, 0].float()
