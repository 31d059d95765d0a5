"""What a fingerprint is made of besides option values: local model files by content, and the
installed versions of the libraries a score depends on (`models.versions`)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from tmars_ray.models.file_hash import content_hash
from tmars_ray.models.versions import SCORE_LIBRARIES, library_versions

__all__ = ["SCORE_LIBRARIES", "identity", "library_versions"]


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
