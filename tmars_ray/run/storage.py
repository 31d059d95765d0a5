"""URLs -> filesystems (fsspec; s3 through s3fs), and atomic writes.

S3 endpoint and credentials come only from the standard AWS environment
(AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...), never from flags.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def _storage_options(url: str) -> dict[str, Any]:
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {
            "config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}
        }
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL."""
    fs, path = url_to_fs(url, **_storage_options(url))
    return fs, path


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a path inside `fs` back into a URL usable by `filesystem`."""
    return fs.unstrip_protocol(path) if is_remote_fs(fs) else path


def is_remote_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


# The driver's run lease (run/lease.py) installs a check here: a driver that lost its lease
# raises before it writes or deletes anything more. None in workers and outside a run.
_fence: Callable[[], None] | None = None


def set_fence(check: Callable[[], None] | None) -> None:
    global _fence
    _fence = check


def check_fence() -> None:
    """Raise if this process's run lease was lost (call before any write, delete, publish)."""
    if _fence is not None:
        _fence()


def write_bytes_atomic(url: str, data: bytes, fenced: bool = True) -> None:
    """Readers never see half a file: local files go through temp + rename; an object-store
    PUT is atomic by itself (the object appears whole or not at all). Refused once the
    driver's lease is lost (`fenced=False`: the lease's own file)."""
    if fenced:
        check_fence()
    fs, path = filesystem(url)
    if is_remote_fs(fs):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)
