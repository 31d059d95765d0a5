"""Keep-lists: the `keep/` output (keep.parquet, keep.npy; summary.json via run/summary.py),
reading other keep-lists, and streaming set algebra over sorted uid streams.

Keep-list streams are iterators of key-column chunks (see keys.py), each strictly ascending,
the whole stream strictly ascending (sorted, unique); `checked()` enforces this for input that
we did not write.

Reading a keep-list checks that it is a finished one: a keep/ folder (or a file inside a
folder called keep/) must carry summary.json, and the file read must be the one it names
(size and sha256). A plain keep.parquet / keep.npy elsewhere is read as it is.
"""

from __future__ import annotations

import os
import posixpath
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tmars_ray.run import storage
from tmars_ray.run import summary as run_summary
from tmars_ray.run.layout import KEEP_DIR, KEEP_NPY, KEEP_PARQUET, SUMMARY_JSON
from tmars_ray.selection.keys import (
    Keys,
    concat,
    count_le,
    decode_keys,
    encode_uids,
    hex_keys_from_datacomp,
    is_hex,
    is_strictly_ascending,
    less,
    order,
    same_as_prev,
    take,
    unify,
)

DATACOMP_DTYPE = np.dtype("u8,u8")  # DataComp subset file: (first, last) 64 bits of the uid
KEEP_SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False)])
# Fixed row groups make keep.parquet's bytes independent of how the input was split.
KEEP_ROW_GROUP = 1 << 20
DECODE_ROWS = 1 << 17  # a multiple of the parquet writer's 1024-row batches: same pages
# zstd halves hex text; the background writer thread hides most of its cost
KEEP_COMPRESSION = "zstd"
NOT_HEX_REASON = "some kept uids are not DataComp uids (32 lowercase hex digits)"


# --------------------------------------------------------------------- sorted stream algebra
def checked(stream: Iterable[Keys], name: str) -> Iterator[Keys]:
    """Pass chunks through, raising if the stream is not strictly ascending (sorted, unique)."""
    last: Keys | None = None
    for chunk in stream:
        if len(chunk[0]) == 0:
            continue
        if not is_strictly_ascending(chunk) or (last is not None and not less(last, 0, chunk, 0)):
            raise ValueError(f"{name}: uids are not sorted ascending and unique")
        last = take(chunk, slice(-1, None))
        yield chunk


def merge_sorted(streams: Sequence[Iterable[Keys]], how: str) -> Iterator[Keys]:
    """Union (how="or") or intersection (how="and") of sorted unique key streams, streamed:
    each round takes from every buffer the keys <= the smallest buffered maximum, so memory
    is bounded by the buffers, never by the stream lengths."""
    iters = [iter(s) for s in streams]
    bufs: list[Keys | None] = [None] * len(iters)
    done = [False] * len(iters)
    while True:
        for i, it in enumerate(iters):
            while bufs[i] is None and not done[i]:
                chunk = next(it, None)
                if chunk is None:
                    done[i] = True
                elif len(chunk[0]):
                    bufs[i] = chunk
        live = [i for i in range(len(iters)) if bufs[i] is not None]
        if not live or (how == "and" and len(live) < len(iters)):
            return
        lasts = concat([take(bufs[i], slice(-1, None)) for i in live])
        b = order(lasts)[0]
        bound = take(lasts, slice(b, b + 1))
        parts = []
        for i in live:
            buf, bnd = unify([bufs[i], bound])
            m = count_le(buf, bnd)
            parts.append(take(buf, slice(0, m)))
            bufs[i] = take(buf, slice(m, None)) if m < len(buf[0]) else None
        merged = concat(parts)
        merged = take(merged, order(merged, nearly_sorted=True))
        eq = same_as_prev(merged)
        if how == "or":
            out = take(merged, ~eq)
        else:  # every stream is unique: a key present in all k streams appears k times
            starts = np.flatnonzero(~eq)
            lengths = np.diff(np.append(starts, len(eq)))
            out = take(merged, starts[lengths == len(iters)])
        if len(out[0]):
            yield out


def only_hex(stream: Iterable[Keys]) -> Iterator[Keys]:
    """Keep only DataComp uids of a sorted stream, as hex keys (order is preserved: lowercase
    hex strings order like their numbers)."""
    for chunk in stream:
        if is_hex(chunk):
            yield chunk
            continue
        uids = decode_keys(chunk)
        uids = uids.filter(pc.match_substring_regex(uids, "^[0-9a-f]{32}$"))
        if len(uids):
            yield encode_uids(uids)


# ----------------------------------------------------------------------- reading keep-lists
def resolve_keeplist(url: str) -> tuple[str, str]:
    """(format, url) of a keep-list given as a `keep/` folder, a run folder, or a file."""
    fs, path = storage.filesystem(url)
    if fs.isdir(path):
        for sub in ("", KEEP_DIR):
            for name, fmt in ((KEEP_PARQUET, "parquet"), (KEEP_NPY, "npy")):
                cand = posixpath.join(path, sub, name) if sub else posixpath.join(path, name)
                if fs.exists(cand):
                    return fmt, storage.unstrip(fs, cand)
        raise FileNotFoundError(
            f"{url}: no {KEEP_PARQUET} or {KEEP_NPY} in this folder or its keep/"
        )
    if not fs.exists(path):
        raise FileNotFoundError(f"keep-list {url} does not exist")
    if path.endswith(".npy"):
        return "npy", url
    if path.endswith(".parquet"):
        return "parquet", url
    raise ValueError(f"{url}: a keep-list is a keep/ folder, a .parquet or a .npy file")


def check_published(url: str, file_url: str) -> None:
    """Refuse a keep-list that is not a finished selection's: `file_url` (resolved from `url`)
    is verified against the summary.json beside it; a keep/ folder without one is refused.
    A lone file outside a keep/ folder, without a summary beside it, is taken as it is."""
    fs, path = storage.filesystem(file_url)
    folder = posixpath.dirname(path)
    given_folder = fs.isdir(storage.filesystem(url)[1])
    has_summary = fs.exists(posixpath.join(folder, SUMMARY_JSON))
    if has_summary or given_folder or posixpath.basename(folder) == KEEP_DIR:
        # a folder is read as a whole set; a file given by name is checked on its own
        names = None if given_folder else (posixpath.basename(path),)
        run_summary.verify(storage.unstrip(fs, folder), names)


def read_keeplist(url: str, chunk_rows: int = 1 << 20) -> Iterator[Keys]:
    """Stream a keep-list's uids as sorted key chunks (checked sorted and unique). The
    published-set check runs now, before the first chunk is asked for."""
    fmt, file_url = resolve_keeplist(url)
    check_published(url, file_url)
    fs, path = storage.filesystem(file_url)
    return checked(
        _read_npy(fs, path, chunk_rows) if fmt == "npy" else _read_parquet(fs, path, chunk_rows),
        file_url,
    )


def _read_npy(fs: Any, path: str, chunk_rows: int) -> Iterator[Keys]:
    with fs.open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _fortran, dtype = read_header(f)
        if len(dtype) != 2 or any(dtype[i].kind != "u" or dtype[i].itemsize != 8 for i in range(2)):
            raise ValueError(f"{path}: a keep.npy holds np.dtype('u8,u8'), not {dtype}")
        if len(shape) != 1:
            raise ValueError(f"{path}: expected a 1-d array, got shape {shape}")
        left = shape[0]
        while left:
            n = min(chunk_rows, left)
            buf = f.read(n * 16)
            if len(buf) != n * 16:
                raise ValueError(f"{path}: truncated .npy file")
            yield hex_keys_from_datacomp(np.frombuffer(buf, dtype=dtype))
            left -= n


def _read_parquet(fs: Any, path: str, chunk_rows: int) -> Iterator[Keys]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if "uid" not in pf.schema_arrow.names:
            raise ValueError(f"{path}: a keep.parquet needs a `uid` column")
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=["uid"]):
            yield encode_uids(batch.column(0))


def keeplist_is_hex(url: str) -> bool:
    """True when every uid of the keep-list is 32 lowercase hex digits (npy: always)."""
    fmt, url = resolve_keeplist(url)
    if fmt == "npy":
        return True
    fs, path = storage.filesystem(url)
    return all(is_hex(k) for k in _read_parquet(fs, path, 1 << 20))


def load_keep_uids(url: str) -> list[str]:
    """All uids of a keep-list as Python strings (small lists: tests, inspection)."""
    return [u for keys in read_keeplist(url) for u in decode_keys(keys).to_pylist()]


# ----------------------------------------------------------------------- writing the keep/ dir
class KeepListWriter:
    """Streams sorted unique key chunks into keep.parquet, and into keep.npy as long as every
    uid is a DataComp uid.

    Publishing is a set: the constructor removes keep/summary.json first (readers refuse the
    folder from then on), `close()` publishes keep.parquet and keep.npy and returns their sizes
    and hashes, and the caller writes summary.json last (`write_summary`), naming them.
    Rows are regrouped into row groups of exactly KEEP_ROW_GROUP rows (the file's bytes do not
    depend on how the stream was chunked), and encoded + compressed by a background thread
    while the caller produces the next chunk. Files are built in a local temp folder and each
    is published whole: locally by rename, remotely by one upload."""

    def __init__(self, output: str, tmpdir: str | None = None):
        self.keep_url = storage.join(output, KEEP_DIR)
        run_summary.clear(self.keep_url)
        self.remote = storage.is_remote(output)
        if self.remote:
            self._dir = tempfile.mkdtemp(prefix="keep-", dir=tmpdir)
        else:
            os.makedirs(self.keep_url, exist_ok=True)
            self._dir = self.keep_url
        tag = uuid.uuid4().hex[:8]
        self._pq_path = os.path.join(self._dir, f".{KEEP_PARQUET}.tmp-{tag}")
        self._npy_body = os.path.join(self._dir, f".{KEEP_NPY}.body-{tag}")
        self._npy_path = os.path.join(self._dir, f".{KEEP_NPY}.tmp-{tag}")
        self._writer = pq.ParquetWriter(
            self._pq_path,
            KEEP_SCHEMA,
            compression=KEEP_COMPRESSION,
            compression_level=1,
            use_dictionary=False,
            write_statistics=True,
        )
        self._body = open(self._npy_body, "wb")
        self._npy = True  # every uid so far is a DataComp uid
        self._pending: list[Keys] = []
        self._pending_rows = 0
        self.rows = 0
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # bounded: back-pressure on the caller
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="keep-writer", daemon=True)
        self._thread.start()

    def write(self, keys: Keys) -> None:
        if self._error:
            raise self._error
        n = len(keys[0])
        if n == 0:
            return
        self._pending.append(keys)
        self._pending_rows += n
        self.rows += n
        while self._pending_rows >= KEEP_ROW_GROUP:
            self._queue.put(self._take_group())

    def _take_group(self) -> Keys:
        """The first KEEP_ROW_GROUP pending rows as one array of their own (a queued group
        is no view into a bigger concatenation that would stay alive with it)."""
        parts, need = [], KEEP_ROW_GROUP
        while need:
            head = self._pending[0]
            if len(head[0]) <= need:
                parts.append(self._pending.pop(0))
                need -= len(head[0])
            else:
                parts.append(take(head, slice(0, need)))
                self._pending[0] = take(head, slice(need, None))
                need = 0
        self._pending_rows -= KEEP_ROW_GROUP
        return concat(parts)

    def _work(self) -> None:
        while True:
            keys = self._queue.get()
            if keys is None:
                return
            if self._error:
                continue  # drain, so that the producer never blocks
            try:
                self._write_group(keys)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e

    def _write_group(self, keys: Keys) -> None:
        if not is_hex(keys) and self._npy:
            # text keys can still be DataComp uids (e.g. after a union with a text keep-list)
            recoded = encode_uids(decode_keys(keys))
            keys = recoded if is_hex(recoded) else keys
        if is_hex(keys):
            if self._npy:
                both = np.empty(len(keys[0]), DATACOMP_DTYPE)
                both["f0"], both["f1"] = keys
                both.tofile(self._body)  # no bytes copy of the group
                del both
        else:
            self._npy = False
        # decoded in slices: the text is needed whole, the temporaries of decoding are not
        # (a row group's bytes do not depend on how its column is chunked)
        n = len(keys[0])
        uids = pa.chunked_array(
            [decode_keys(take(keys, slice(s, s + DECODE_ROWS))) for s in range(0, n, DECODE_ROWS)],
            pa.string(),
        )
        self._writer.write_table(
            pa.table({"uid": uids}, schema=KEEP_SCHEMA), row_group_size=len(uids)
        )

    def _finish_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self, npy_skip_reason: str | None = None) -> dict[str, Any]:
        """Finish and publish. keep.npy is published when every uid is a DataComp uid and no
        `npy_skip_reason` is given. Returns {rows, parquet, npy (url or None),
        npy_skipped_reason, files: {name: {bytes, sha256}}} for the summary."""
        if self._pending_rows:
            self._queue.put(concat(self._pending))
            self._pending, self._pending_rows = [], 0
        self._finish_thread()
        if self._error:
            self.abort()
            raise self._error
        self._writer.close()
        self._body.close()
        if not self._npy:
            npy_skip_reason = NOT_HEX_REASON
        pq_url = storage.join(self.keep_url, KEEP_PARQUET)
        npy_url = storage.join(self.keep_url, KEEP_NPY)
        files = {KEEP_PARQUET: self._publish(self._pq_path, pq_url)}
        if npy_skip_reason is None:
            with open(self._npy_path, "wb") as out, open(self._npy_body, "rb") as body:
                # exactly what np.save writes for this array (format 1.0 header)
                np.lib.format.write_array_header_1_0(
                    out,
                    {
                        "descr": np.lib.format.dtype_to_descr(DATACOMP_DTYPE),
                        "fortran_order": False,
                        "shape": (self.rows,),
                    },
                )
                shutil.copyfileobj(body, out, 1 << 22)
            files[KEEP_NPY] = self._publish(self._npy_path, npy_url)
        elif storage.exists(npy_url):
            # a stale keep.npy from an earlier selection must not outlive its keep.parquet
            fs, path = storage.filesystem(npy_url)
            fs.rm(path)
        os.unlink(self._npy_body)
        if self.remote:
            shutil.rmtree(self._dir, ignore_errors=True)
        return {
            "rows": self.rows,
            "parquet": pq_url,
            "npy": npy_url if npy_skip_reason is None else None,
            "npy_skipped_reason": npy_skip_reason,
            "files": files,
        }

    def abort(self) -> None:
        """Drop everything written so far (after an error elsewhere)."""
        self._error = self._error or RuntimeError("aborted")
        self._finish_thread()
        for closer in (self._writer.close, self._body.close):
            try:
                closer()
            except Exception:  # noqa: BLE001 - best-effort cleanup after another error
                pass
        for p in (self._pq_path, self._npy_body, self._npy_path):
            if os.path.exists(p):
                os.unlink(p)
        if self.remote:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _publish(self, local: str, url: str) -> dict[str, Any]:
        storage.check_fence()  # a driver that lost its run lease publishes nothing
        digest = run_summary.file_digest(local)
        if self.remote:
            fs, path = storage.filesystem(url)
            fs.put_file(local, path)
            os.unlink(local)
        else:
            with open(local, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(local, url)
        return digest


def write_summary(output: str, summary: dict[str, Any]) -> str:
    """Seal `<output>/keep/`: summary.json, written last (names the keep files)."""
    return run_summary.write(storage.join(output, KEEP_DIR), summary)


def read_summary(url: str) -> dict[str, Any]:
    """A summary.json given as the file, a `keep/` folder or a run folder (unverified)."""
    return run_summary.read(url)


verify_keep = run_summary.verify_keep

__all__ = [
    "DATACOMP_DTYPE",
    "KEEP_ROW_GROUP",
    "KEEP_SCHEMA",
    "KeepListWriter",
    "Keys",
    "checked",
    "keeplist_is_hex",
    "load_keep_uids",
    "merge_sorted",
    "only_hex",
    "read_keeplist",
    "read_summary",
    "resolve_keeplist",
    "verify_keep",
    "write_summary",
]
