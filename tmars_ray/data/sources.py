"""Shards in, samples out: list the shards of a pool and stream one shard's samples.

A shard (a webdataset .tar or a parquet file) is the unit of work and of resume. Reading a
shard yields one `sample` row per input sample - whatever is wrong with it - followed by one
`end` row that carries the shard's sample count and shard-level status. The end row travels
through the pipeline with the samples; the writer knows a shard is complete when it has seen
the end row and as many sample rows as it announces (blocks may arrive in any order).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tmars_ray.data import schema
from tmars_ray.data.decode import probe_image
from tmars_ray.run import storage
from tmars_ray.run.manifest import shard_id_for

PREFETCH_BYTES = 256 << 20  # shard bytes a read task holds ahead of the one it parses
SMALL_SHARD = 64 << 20  # shards up to this size are fetched whole, concurrently
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_EXTS = (".tar", ".parquet")
UID_RE = re.compile(r"^[0-9a-fA-F]{32}$")


def list_shards(url: str, input_format: str = "auto") -> tuple[str, list[str]]:
    """(input root, sorted shard URLs) for a directory, prefix, glob or single file."""
    root, shards, _ = list_shards_sized(url, input_format)
    return root, shards


def list_shards_sized(url: str, input_format: str = "auto") -> tuple[str, list[str], dict]:
    """`list_shards` plus each shard's size in bytes (from the same listing)."""
    root, shards, sizes, _ = list_shards_identified(url, input_format)
    return root, shards, sizes


def shard_version(info: dict[str, Any]) -> str | None:
    """What changes when a shard is rewritten in place, from its listing entry: the ETag on
    S3 (and Azure/GCS `etag`), GCS's generation, else the modification time (local disk).
    None when the store gives none: then only the size tells a rewrite."""
    for key in ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified"):
        value = info.get(key)
        if value not in (None, ""):
            return f"{key.lower()}:{value}"
    return None


def list_shards_identified(
    url: str, input_format: str = "auto"
) -> tuple[str, list[str], dict[str, int | None], dict[str, str | None]]:
    """`list_shards_sized` plus each shard's version (`shard_version`), from one listing:
    (size, version) is the shard's identity, which resume compares with its record."""
    fs, path = storage.filesystem(url)
    exts = {"webdataset": (".tar",), "parquet": (".parquet",)}.get(input_format, SHARD_EXTS)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path, detail=True)
        root = path[: min(path.find(ch) for ch in "*?[" if ch in path)]
        root = root.rsplit("/", 1)[0] if not root.endswith("/") else root
    elif fs.isfile(path):
        found, root = {path: fs.info(path)}, posixpath.dirname(path)
    elif fs.exists(path):
        found, root = fs.find(path, detail=True), path
    else:
        raise FileNotFoundError(f"input {url!r} does not exist")
    sizes = {storage.unstrip(fs, p): info.get("size") for p, info in found.items()}
    versions = {storage.unstrip(fs, p): shard_version(info) for p, info in found.items()}
    shards = sorted(u for u in sizes if u.endswith(exts))
    if not shards:
        raise FileNotFoundError(f"no {'/'.join(exts)} shards found under {url!r}")
    return storage.unstrip(fs, root.rstrip("/")), shards, sizes, versions


def derive_uid(uid: Any, shard_rel: str, key: str) -> tuple[str, bool]:
    """(uid, derived): the DataComp uid when well-formed; otherwise a stable 32-hex hash of
    (shard, key), flagged as derived - it looks like a DataComp uid but matches none."""
    if isinstance(uid, str) and UID_RE.match(uid):
        return uid.lower(), False
    return hashlib.md5(f"{shard_rel}\x00{key}".encode()).hexdigest(), True


def _caption(raw: Any) -> tuple[str | None, str | None]:
    """(caption, failure status)."""
    if raw is None:
        return None, schema.NO_CAPTION
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, schema.BAD_CAPTION
    if not isinstance(raw, str):  # e.g. a numeric parquet caption column
        return None, schema.BAD_CAPTION
    text = raw.strip()
    return (text, None) if text else (None, schema.NO_CAPTION)


def _sample_row(
    shard: str,
    shard_id: str,
    idx: int,
    key: str,
    uid: str,
    image: bytes | None,
    caption_raw: Any,
    status: str = "",
    derived: bool = False,
    max_pixels: int = 0,
) -> dict[str, Any]:
    """A sample row; `status` pre-set means the sample is already known to be unscorable."""
    caption, caption_status = _caption(caption_raw)
    if status:
        pass
    elif image is None:
        status = schema.NO_IMAGE
    elif len(image) == 0:
        status = schema.EMPTY_IMAGE
    else:
        status = caption_status or ""
    width = height = 0
    if not status and max_pixels:
        width, height, status = probe_image(image, max_pixels)
    return {
        "kind": "sample",
        "shard": shard,
        "shard_id": shard_id,
        "idx": idx,
        "key": key,
        "uid": uid,
        "derived_uid": derived,
        "caption": caption or "",
        "image_bytes": image or b"",
        "status": status,
        "shard_status": "",
        "n_samples": -1,
        "error": "",
        "width": width,
        "height": height,
    }


def end_row(
    shard: str, shard_id: str, n: int, shard_status: str, error: str = ""
) -> dict[str, Any]:
    return {
        "kind": "end",
        "shard": shard,
        "shard_id": shard_id,
        "idx": n,
        "key": "",
        "uid": "",
        "derived_uid": False,
        "caption": "",
        "image_bytes": b"",
        "status": "",
        "shard_status": shard_status,
        "n_samples": n,
        "error": error,
        "width": 0,
        "height": 0,
    }


class _ShardProblem(Exception):
    """Raised by a row generator after its last row: the shard's status and why."""

    def __init__(self, status: str, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


class StorageError(OSError):
    """Reading the shard's bytes failed (network, permissions, vanished object): a property of
    the storage, not of the data, so the shard must not be recorded as done. Raised so the
    task is retried or the job fails, never turned into a shard status."""


class _TrackedFile:
    """File wrapper that remembers whether the storage itself failed. Parsers (tarfile,
    pyarrow) may wrap or swallow the original exception; this keeps the distinction between
    damaged data (recorded per shard) and a failing store (raised)."""

    def __init__(self, f: Any) -> None:
        self._f, self.failed = f, None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._f, name)
        if name not in ("read", "readinto", "seek", "read1", "readall"):
            return attr

        def call(*args: Any, **kw: Any) -> Any:
            try:
                return attr(*args, **kw)
            except Exception as err:
                self.failed = err
                raise

        return call


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers why reading headers stopped. tarfile treats a truncated, missing or garbled
    header after the first member as a normal end of archive, which would silently lose the
    samples behind it; only a zero block (the end-of-archive marker) is a proper end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as err:
            tar.tmars_damage = err  # type: ignore[attr-defined]
            raise


# The members a sample is made of; any other member is skipped unread (streamed past).
USED_EXTS = frozenset(IMAGE_EXTS + ("txt", "json"))


class TooLarge(bytes):
    """Stands for a member over --max-member-bytes, which is never read (b"", falsy)."""


def _tar_groups(
    fileobj: Any, max_member_bytes: int | None = None
) -> Iterator[tuple[str, dict[str, bytes], bool]]:
    """webdataset grouping: (key, {ext: bytes}, damaged) for consecutive members sharing a key
    (basename up to the first dot). Member names are only split into key/extension, never used
    as filesystem paths. Only the members a sample uses are read, and none over
    `max_member_bytes` (it stands as a `TooLarge`). The archive is read as a stream: listing
    costs no memory per member. When the archive is damaged, the group being read is yielded
    with damaged=True (it may lack members) and _ShardProblem is raised."""
    current, members = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                dirname, base = posixpath.split(info.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = posixpath.join(dirname, stem) if dirname else stem
                if key != current and current is not None:
                    yield current, members, False
                    members = {}
                current = key
                ext = ext.lower()
                if ext not in USED_EXTS:
                    continue
                if max_member_bytes is not None and info.size > max_member_bytes:
                    members[ext] = TooLarge()
                    continue
                f = tar.extractfile(info)
                members[ext] = f.read() if f is not None else b""
            damage = getattr(tar, "tmars_damage", None)
            if damage is not None:
                kind = (
                    schema.SHARD_CORRUPT
                    if isinstance(damage, tarfile.InvalidHeaderError)
                    else schema.SHARD_TRUNCATED
                )
                raise _ShardProblem(kind, f"{type(damage).__name__}: {damage} at byte {tar.offset}")
    except _ShardProblem:
        if current is not None:
            yield current, members, True
        raise
    except (tarfile.TarError, EOFError, zlib.error) as err:
        if current is None:  # nothing readable: not a tar (or damaged in its first header)
            raise _ShardProblem(schema.SHARD_UNREADABLE, f"{type(err).__name__}: {err}") from err
        yield current, members, True
        raise _ShardProblem(schema.SHARD_TRUNCATED, f"{type(err).__name__}: {err}") from err
    if current is not None:
        yield current, members, False


def _uid_of(json_bytes: bytes | None, field: str = "uid") -> Any:
    """The json's uid field, or None when the json is absent, not json, or not an object."""
    if json_bytes is None:
        return None
    try:
        meta = json.loads(json_bytes)
    except (ValueError, UnicodeDecodeError):
        return None
    return meta.get(field) if isinstance(meta, dict) else None


def _webdataset_rows(
    f: Any, uid_field: str = "uid", max_member_bytes: int | None = None
) -> Iterator[tuple]:
    if not f.read(1):
        raise _ShardProblem(schema.SHARD_EMPTY, "zero-byte file")
    f.seek(0)
    for key, members, damaged in _tar_groups(f, max_member_bytes):
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        status = schema.TRUNCATED if damaged else ""
        if any(isinstance(m, TooLarge) for m in members.values()):
            status = schema.TOO_LARGE
        yield key, _uid_of(members.get("json"), uid_field), image, members.get("txt"), status


def _image_cell(value: Any) -> bytes:
    """A parquet image cell -> bytes; a null cell is an empty image. Hugging Face's Image
    feature stores {bytes, path} structs."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) else b"" if value is None else value


def _holds_bytes(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(kind):
        idx = kind.get_field_index("bytes")
        return idx >= 0 and _holds_bytes(kind.field(idx).type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or kind == pa.binary_view()


def _parquet_rows(f: Any, cfg) -> Iterator[tuple]:
    """Rows of a parquet shard. A missing image/caption column or an image column that holds
    no bytes fails the shard (_ShardProblem, before any row)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = set(pf.schema_arrow.names)
    if cfg.image_column in names:
        kind = pf.schema_arrow.field(cfg.image_column).type
        if not _holds_bytes(kind):  # e.g. --image-column naming a url or an id column
            raise _ShardProblem(
                schema.SHARD_BAD_COLUMN,
                f"parquet image column {cfg.image_column!r} has type {kind}, not image bytes "
                f"(binary, or a struct with a binary 'bytes' field); {pf.metadata.num_rows} "
                "rows not read",
            )
    missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in names]
    if missing:  # a failed shard: none of its samples can be scored, so none is read
        raise _ShardProblem(
            schema.SHARD_MISSING_COLUMN,
            f"parquet shard lacks column(s) {', '.join(missing)} (--image-column / "
            f"--caption-column); {pf.metadata.num_rows} rows not read",
        )
    cols = [
        c
        for c in (cfg.image_column, cfg.caption_column, cfg.uid_column, cfg.key_column)
        if c in names
    ]
    n, limit = 0, getattr(cfg, "max_member_bytes", None) or float("inf")
    for batch in pf.iter_batches(batch_size=256, columns=cols or None):
        d = batch.to_pydict()
        none = [None] * batch.num_rows
        keys, uids = d.get(cfg.key_column, none), d.get(cfg.uid_column, none)
        images, captions = d.get(cfg.image_column), d.get(cfg.caption_column, none)
        for i in range(batch.num_rows):
            key = str(keys[i]) if keys[i] is not None else f"{n:09d}"
            image = _image_cell(images[i]) if images is not None else None
            if image is not None and len(image) > limit:  # already read: not carried further
                yield key, uids[i], None, captions[i], schema.TOO_LARGE
            else:
                yield key, uids[i], image, captions[i], ""
            n += 1


def read_shards(items: list[dict[str, Any]], cfg, threads: int = 8) -> Iterator[dict[str, Any]]:
    """Rows of several shards, in order. Small shards in object storage are fetched ahead,
    concurrently (within PREFETCH_BYTES): one GET after another would leave a read task idle
    on latency when shards are small; large shards stream as they are read."""
    ahead: deque = deque()
    pool = ThreadPoolExecutor(threads)
    todo = iter(items)
    budget = [PREFETCH_BYTES]

    def fill() -> None:
        while len(ahead) < threads:
            item = next(todo, None)
            if item is None:
                return
            size = item.get("size") or SMALL_SHARD + 1
            if storage.is_remote(item["shard"]) and size <= SMALL_SHARD and size <= budget[0]:
                budget[0] -= size
                ahead.append((item, pool.submit(storage.read_bytes, item["shard"])))
            else:
                ahead.append((item, None))
                if size > SMALL_SHARD:
                    return  # read it alone before fetching further ahead

    try:
        fill()
        while ahead:
            item, future = ahead.popleft()
            data = None
            if future is not None:
                try:
                    data = future.result()
                except FileNotFoundError:
                    data = None  # read_shard retries the open, then records a missing shard
                except Exception as err:
                    raise StorageError(f"reading {item['shard']} failed: {err}") from err
                budget[0] += item.get("size") or 0
            yield from read_shard(item, cfg, data)
            fill()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def read_shard(item: dict[str, Any], cfg, data: bytes | None = None) -> Iterator[dict[str, Any]]:
    """All rows of one shard (from storage, or from its bytes `data` when already fetched): a
    row per sample, then the end row. Damaged data never raises (it becomes statuses); a
    failing store does (StorageError), so nothing half-read is ever recorded as done."""
    shard, shard_id, shard_rel = item["shard"], item["shard_id"], item["shard_rel"]
    is_parquet = cfg.input_format == "parquet" or (
        cfg.input_format == "auto" and shard.endswith(".parquet")
    )
    n, seen = 0, set()
    status, error = schema.SHARD_OK, ""
    if data is not None:
        opened: Any = io.BytesIO(data)
    else:
        opened = _open_shard(shard)
        if opened is None:
            yield end_row(shard, shard_id, 0, schema.SHARD_MISSING, "the shard no longer exists")
            return
    with opened as raw:
        f = _TrackedFile(raw)
        try:
            rows = (
                _parquet_rows(f, cfg)
                if is_parquet
                else _webdataset_rows(f, cfg.uid_column, getattr(cfg, "max_member_bytes", None))
            )
            for key, raw_uid, image, caption, pre_status in rows:
                uid, derived = derive_uid(raw_uid, shard_rel, key)
                row = _sample_row(
                    shard, shard_id, n, key, uid, image, caption, pre_status, derived,
                    cfg.max_image_pixels,
                )  # fmt: skip
                # only a sample that will be scored claims its uid: a later copy of a uid whose
                # earlier copy already failed (no caption, no image...) is scored, and can win
                if not row["status"]:
                    if uid in seen:
                        row["status"] = schema.DUPLICATE_UID
                    seen.add(uid)
                yield row
                n += 1
        except _ShardProblem as problem:
            status, error = problem.status, problem.error
        except Exception as err:
            if f.failed is not None:
                raise StorageError(f"reading {shard} failed: {f.failed}") from err
            # the parser gave up on the data (e.g. a parquet file that is not parquet)
            status = schema.SHARD_TRUNCATED if n else schema.SHARD_UNREADABLE
            error = f"{type(err).__name__}: {err}"
        if f.failed is not None:
            raise StorageError(f"reading {shard} failed: {f.failed}")
    if n == 0 and status == schema.SHARD_OK:
        status = schema.SHARD_EMPTY
    yield end_row(shard, shard_id, n, status, error)


MISSING_RETRIES = (0.5, 1.0, 2.0)  # a listed shard that is not found: look again, then fail it


def _open_shard(shard: str) -> Any:
    """The shard opened for reading, or None when it is not there after bounded retries (a
    listing that raced a deletion). Other storage errors propagate: s3fs/botocore already
    retry those with backoff, then the read task is retried."""
    fs, path = storage.filesystem(shard)
    for delay in (*MISSING_RETRIES, None):
        try:
            return fs.open(path, "rb")
        except FileNotFoundError:
            if delay is None:
                return None
            time.sleep(delay)
            fs.invalidate_cache(path)
    return None


def shard_items(
    root: str,
    shards: list[str],
    sizes: dict[str, int] | None = None,
    versions: dict[str, str | None] | None = None,
) -> list[dict[str, Any]]:
    items = []
    for s in shards:
        rel = s[len(root) :].lstrip("/") if s.startswith(root) else posixpath.basename(s)
        item: dict[str, Any] = {"shard": s, "shard_id": shard_id_for(s, root), "shard_rel": rel}
        if sizes is not None:
            item["size"] = sizes.get(s)
        if versions is not None:
            item["version"] = versions.get(s)
        items.append(item)
    return items


def uid_coverage(item: dict[str, Any], cfg, samples: int = 256) -> tuple[int, int]:
    """(samples read, samples with a valid DataComp uid) among the first `samples` of a shard:
    a cheap check, before any work, that `uid_column` names something the pool has."""
    n = valid = 0
    for row in read_shard(item, cfg):
        if row["kind"] != "sample":
            break
        n += 1
        valid += not row["derived_uid"]
        if n >= samples:
            break
    return n, valid


def read_bytes_of(shard: str, key: str, cfg) -> bytes | None:
    """The image bytes of one sample (for reports); None when not found."""
    item = {"shard": shard, "shard_id": "", "shard_rel": ""}
    for row in read_shard(item, cfg):
        if row["kind"] == "sample" and row["key"] == key:
            return row["image_bytes"] or None
    return None
