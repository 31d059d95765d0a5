"""Full content hashes (SHA-256) of local model files, cached so a large checkpoint is hashed
once, not on every run.

The scoring fingerprint identifies a local checkpoint by its content; hashing a 600 MB file
costs a second or more, and a command computes the fingerprint several times. The cache is one
small JSON file per machine, `<cache dir>/file-hashes.json` (`models.modeldir.default_cache_dir`:
`$TMARS_CACHE_DIR`, else `~/.cache/tmars-ray`), not the run folder: its keys are paths on this
machine (meaningless to a driver elsewhere reading a shared run folder on S3), and one checkpoint
serves many runs, each with a new --output.

An entry is keyed by the file's real path, size, mtime, ctime, inode and device (nanoseconds):
writing the file in place changes mtime and ctime, replacing it (rename) changes the inode, and
`os.utime` can restore mtime but never ctime - so a changed file's hash is not reused. Limit:
a store that reports no real ctime/inode (some FUSE or network mounts) with size and mtime
restored would reuse the old hash. A cache that cannot be read or written only costs a rehash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tmars_ray.models.modeldir import default_cache_dir, save_atomically

CACHE_FILE = "file-hashes.json"
MAX_ENTRIES = 256  # newest kept: a few checkpoints and detector files per machine
CHUNK = 4 << 20


def file_key(path: str) -> str:
    """What must be unchanged for a cached hash to stand for the file's content."""
    st = os.stat(path)
    real = os.path.realpath(path)
    return f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"


def sha256_file(path: str) -> str:
    """SHA-256 of every byte of the file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_path(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / CACHE_FILE


def read_cache(path: Path) -> dict[str, Any]:
    """A JSON cache file of this module's kind; {} when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Atomic replace; concurrent writers may lose each other's entry (a later rehash). A
    read-only home: hashes are simply not cached."""
    save_atomically(path, json.dumps(entries, indent=0).encode())


def content_hash(path: str, cache_dir: str | Path | None = None) -> str:
    """SHA-256 of the file's content, from the cache when the file is unchanged since."""
    where = cache_path(cache_dir)
    key = file_key(path)
    cached = read_cache(where).get(key)
    if isinstance(cached, str):
        return cached
    digest = sha256_file(path)
    if file_key(path) != key:  # changed while being read: hash what is there now, uncached
        return sha256_file(path)
    entries = read_cache(where)  # again: another process may have added entries meanwhile
    entries.pop(key, None)
    entries[key] = digest  # last = newest
    write_cache(where, dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest
