"""summary.json: the record of one selection, and the seal of its keep/ folder.

keep/ is published as a set: the writer removes summary.json first, publishes keep.parquet
(and keep.npy), then writes summary.json LAST. The summary names every keep file it belongs to
under `keep.files` (`{name: {"bytes": N, "sha256": HEX}}`), so a reader can tell a finished set
from a half-replaced one:
- no summary.json in a keep/ folder: a selection is being written (or died while writing);
- a keep file whose size or hash differs from the summary, or a keep file the summary does
  not name: the files belong to different selections.
Both are refused (`KeepListMismatch`). Other fields (method, counts, threshold, ...) are the
selection's; this module only reads, writes and checks the file.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from tmars_ray.run import storage
from tmars_ray.run.layout import KEEP_DIR, KEEP_NPY, KEEP_PARQUET, SUMMARY_JSON
from tmars_ray.run.redact import redact_obj

KEEP_FILES = (KEEP_PARQUET, KEEP_NPY)
_CHUNK = 1 << 22


class KeepListMismatch(ValueError):
    """A keep/ folder whose files do not all belong to the selection its summary.json names."""


def file_digest(url: str) -> dict[str, Any]:
    """{"bytes", "sha256"} of a file (streamed: memory stays small for large keep-lists)."""
    fs, path = storage.filesystem(url)
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def clear(keep_dir: str) -> None:
    """First step of publishing: from now until `write`, readers refuse this keep/ folder."""
    storage.check_fence()  # a driver that lost its run lease publishes nothing
    fs, path = storage.filesystem(storage.join(keep_dir, SUMMARY_JSON))
    if fs.exists(path):
        fs.rm(path)


def write(keep_dir: str, summary: dict[str, Any]) -> str:
    """Last step of publishing. `summary["keep"]["files"]` must name the published files."""
    files = summary.get("keep", {}).get("files")
    if not isinstance(files, dict):
        raise ValueError("summary['keep']['files'] must name the keep files it belongs to")
    url = storage.join(keep_dir, SUMMARY_JSON)
    summary = redact_obj(summary)  # URLs, commands and config values may carry credentials
    storage.write_bytes_atomic(url, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return url


def locate(url: str) -> str:
    """summary.json given as the file, a keep/ folder or a run folder."""
    fs, path = storage.filesystem(url)
    if not path.endswith(".json"):
        for cand in (
            posixpath.join(path, SUMMARY_JSON),
            posixpath.join(path, KEEP_DIR, SUMMARY_JSON),
        ):
            if fs.exists(cand):
                return storage.unstrip(fs, cand)
    if not fs.exists(path):
        raise FileNotFoundError(f"no summary.json at {url}")
    return storage.unstrip(fs, path)


def read(url: str) -> dict[str, Any]:
    """The summary (file, keep/ folder or run folder), unverified: for fields only."""
    return json.loads(storage.read_bytes(locate(url)))


def keep_dir_of(url: str) -> str:
    """The keep/ folder of a run folder, keep/ folder, keep file or summary.json."""
    fs, path = storage.filesystem(url)
    if fs.isdir(path):
        sub = posixpath.join(path, KEEP_DIR)
        if posixpath.basename(path.rstrip("/")) != KEEP_DIR and fs.isdir(sub):
            path = sub
    else:
        path = posixpath.dirname(path)
    return storage.unstrip(fs, path)


def _listed(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = (summary.get("keep") or {}).get("files")
    if not isinstance(files, dict):
        raise KeepListMismatch(
            "summary.json names no keep files (written by an older tmars-ray?): "
            "select again to publish a verifiable keep/"
        )
    return files


def verify(keep_dir: str, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check keep files of a keep/ folder against its summary.json; returns the summary.

    `names`: only these files (each must be named by the summary); default: every keep file
    present or named. Raises KeepListMismatch on a missing summary, a differing size/hash,
    a named file that is missing, or a present keep file the summary does not name."""
    fs, root = storage.filesystem(keep_dir)
    summary_path = posixpath.join(root, SUMMARY_JSON)
    if not fs.exists(summary_path):
        raise KeepListMismatch(
            f"{keep_dir}: keep/ folder without summary.json - a selection is being written "
            "there or died while writing it; wait for it or select again"
        )
    with fs.open(summary_path, "rb") as f:
        summary = json.loads(f.read())
    listed = _listed(summary)
    present = {n for n in KEEP_FILES if fs.exists(posixpath.join(root, n))}
    check = names if names is not None else tuple(sorted(present | set(listed)))
    for name in check:
        url = storage.unstrip(fs, posixpath.join(root, name))
        if name not in listed:
            raise KeepListMismatch(
                f"{url}: not named by {SUMMARY_JSON} beside it - it belongs to another selection"
            )
        if name not in present:
            raise KeepListMismatch(f"{url}: named by {SUMMARY_JSON} but missing")
        got, want = file_digest(url), listed[name]
        if got["bytes"] != want.get("bytes") or got["sha256"] != want.get("sha256"):
            raise KeepListMismatch(
                f"{url}: {got['bytes']} bytes sha256 {got['sha256'][:12]}..., but "
                f"{SUMMARY_JSON} names {want.get('bytes')} bytes sha256 "
                f"{str(want.get('sha256'))[:12]}... - the files belong to different selections"
            )
    return summary


def verify_keep(url: str) -> dict[str, Any]:
    """Verify a published keep/ (given as run folder, keep/ folder, a keep file or its
    summary.json): every keep file belongs to the summary. Returns the summary."""
    return verify(keep_dir_of(url))
