"""Shards in, samples out: list the shards of a pool and stream one shard's samples.

A shard (a webdataset .tar or a parquet file) is the unit of work and of resume. Reading a
shard yields one `sample` row per input sample - whatever is wrong with it - followed by one
`end` row that carries the shard's sample count and shard-level status. The end row travels
through the pipeline with the samples; the writer knows a shard is complete when it has seen
the end row and as many sample rows as it announces (blocks may arrive in any order).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from . import schema, storage
from .manifest import shard_id_for

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_EXTS = (".tar", ".parquet")
UID_RE = re.compile(r"^[0-9a-fA-F]{32}$")


def list_shards(url: str, input_format: str = "auto") -> tuple[str, list[str]]:
    """(input root, sorted shard URLs) for a directory, prefix, glob or single file."""
    fs, path = storage.filesystem(url)
    exts = {"webdataset": (".tar",), "parquet": (".parquet",)}.get(input_format, SHARD_EXTS)
    if any(ch in path for ch in "*?["):
        paths = fs.glob(path)
        root = path[: min(path.find(ch) for ch in "*?[" if ch in path)]
        root = root.rsplit("/", 1)[0] if not root.endswith("/") else root
    elif fs.isfile(path):
        paths, root = [path], posixpath.dirname(path)
    elif fs.exists(path):
        paths, root = fs.find(path), path
    else:
        raise FileNotFoundError(f"input {url!r} does not exist")
    shards = sorted(storage.unstrip(fs, p) for p in paths if p.endswith(exts))
    if not shards:
        raise FileNotFoundError(f"no {'/'.join(exts)} shards found under {url!r}")
    return storage.unstrip(fs, root.rstrip("/")), shards


def derive_uid(uid: Any, shard_rel: str, key: str) -> str:
    """The DataComp uid when well-formed; otherwise a stable 32-hex hash of (shard, key)."""
    if isinstance(uid, str) and UID_RE.match(uid):
        return uid.lower()
    return hashlib.md5(f"{shard_rel}\x00{key}".encode()).hexdigest()


def _caption(raw: bytes | str | None) -> tuple[str | None, str | None]:
    """(caption, failure status)."""
    if raw is None:
        return None, schema.NO_CAPTION
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, schema.BAD_CAPTION
    text = raw.strip()
    return (text, None) if text else (None, schema.NO_CAPTION)


def _sample_row(shard: str, shard_id: str, idx: int, key: str, uid: str, image: bytes | None,
                caption_raw: bytes | str | None) -> dict[str, Any]:
    caption, status = _caption(caption_raw)
    if image is None:
        status = schema.NO_IMAGE
    elif len(image) == 0:
        status = schema.EMPTY_IMAGE
    return {
        "kind": "sample", "shard": shard, "shard_id": shard_id, "idx": idx, "key": key,
        "uid": uid, "caption": caption or "", "image_bytes": image or b"",
        "status": status or "", "shard_status": "", "n_samples": -1, "error": "",
    }


def end_row(shard: str, shard_id: str, n: int, shard_status: str, error: str = "") -> dict[str, Any]:
    return {
        "kind": "end", "shard": shard, "shard_id": shard_id, "idx": n, "key": "", "uid": "",
        "caption": "", "image_bytes": b"", "status": "", "shard_status": shard_status,
        "n_samples": n, "error": error,
    }


def _tar_groups(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """webdataset grouping: consecutive members sharing a key (basename up to the first dot).
    Member names are only split into key/extension, never used as filesystem paths."""
    current, members = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            dirname, base = posixpath.split(info.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = posixpath.join(dirname, stem) if dirname else stem
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext.lower()] = data
    if current is not None:
        yield current, members


def _webdataset_rows(shard: str) -> Iterator[tuple]:
    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f:
        for key, members in _tar_groups(f):
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            meta = {}
            if "json" in members:
                try:
                    meta = json.loads(members["json"])
                    meta = meta if isinstance(meta, dict) else {}
                except (ValueError, UnicodeDecodeError):
                    meta = {}
            yield key, meta.get("uid"), image, members.get("txt")


def _parquet_rows(shard: str, cfg) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in names]
        if missing:
            raise _MissingColumn(f"parquet shard lacks column(s) {', '.join(missing)}")
        cols = [c for c in (cfg.image_column, cfg.caption_column, cfg.uid_column, cfg.key_column)
                if c in names]
        n = 0
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            d = batch.to_pydict()
            for i in range(batch.num_rows):
                key = d.get(cfg.key_column, [None] * batch.num_rows)[i]
                key = str(key) if key is not None else f"{n:09d}"
                uid = d.get(cfg.uid_column, [None] * batch.num_rows)[i]
                yield key, uid, d[cfg.image_column][i], d[cfg.caption_column][i]
                n += 1


class _MissingColumn(ValueError):
    pass


def read_shard(item: dict[str, Any], cfg) -> Iterator[dict[str, Any]]:
    """All rows of one shard: a row per sample, then the end row. Never raises for bad data."""
    shard, shard_id, shard_rel = item["shard"], item["shard_id"], item["shard_rel"]
    is_parquet = cfg.input_format == "parquet" or (
        cfg.input_format == "auto" and shard.endswith(".parquet")
    )
    n, seen = 0, set()
    status, error = schema.SHARD_OK, ""
    try:
        rows = _parquet_rows(shard, cfg) if is_parquet else _webdataset_rows(shard)
        for key, raw_uid, image, caption in rows:
            uid = derive_uid(raw_uid, shard_rel, key)
            row = _sample_row(shard, shard_id, n, key, uid, image, caption)
            if uid in seen and not row["status"]:
                row["status"] = schema.DUPLICATE_UID
            seen.add(uid)
            yield row
            n += 1
    except _MissingColumn as err:
        status, error = schema.SHARD_MISSING_COLUMN, str(err)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        status = schema.SHARD_TRUNCATED if n else schema.SHARD_UNREADABLE
        error = f"{type(err).__name__}: {err}"
    if n == 0 and status == schema.SHARD_OK:
        status = schema.SHARD_EMPTY
    yield end_row(shard, shard_id, n, status, error)


def shard_items(root: str, shards: list[str]) -> list[dict[str, str]]:
    items = []
    for s in shards:
        rel = s[len(root):].lstrip("/") if s.startswith(root) else posixpath.basename(s)
        items.append({"shard": s, "shard_id": shard_id_for(s, root), "shard_rel": rel})
    return items


def read_bytes_of(shard: str, key: str, cfg) -> bytes | None:
    """The image bytes of one sample (for reports); None when not found."""
    item = {"shard": shard, "shard_id": "", "shard_rel": ""}
    for row in read_shard(item, cfg):
        if row["kind"] == "sample" and row["key"] == key:
            return row["image_bytes"] or None
    return None

