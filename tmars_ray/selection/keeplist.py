"""Keep-lists: uid sort keys, the `keep/` output (keep.parquet, keep.npy, summary.json), reading
other keep-lists, and streaming set algebra over sorted uid streams.

Uid keys. Every sort, merge and set operation on uids works on *key columns*, a tuple of numpy
arrays that orders exactly like the uid strings do (byte-wise, ascending):
- "hex" keys, `(hi, lo)` uint64: a DataComp uid (32 lowercase hex digits) is a 128-bit number;
  its first 16 hex digits are `hi`, the last 16 `lo`. Lowercase hex strings order like the
  numbers, and two uint64 columns sort ~5x faster than 32-byte strings. These are also the two
  fields of DataComp's `np.dtype("u8,u8")` subset files.
- "str" keys, `(s,)` with `s` of numpy dtype `S<w>` (UTF-8 bytes, NUL padded): any other uid.
  numpy compares `S` values over all `w` bytes, so NUL padding orders a prefix first, as strings
  do; uids that contain NUL themselves are rejected (they would collide with padding).
Streams of both kinds meet in one operation only after converting hex keys to `S32` text.

Keep-list streams are iterators of key-column chunks, each strictly ascending, the whole stream
strictly ascending (sorted, unique); `checked()` enforces this for input that we did not write.
"""

from __future__ import annotations

import binascii
import io
import json
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

Keys = tuple  # tuple[np.ndarray, ...]: (hi, lo) uint64 or (s,) bytes "S<w>"

KEEP_DIR = "keep"
KEEP_PARQUET = "keep.parquet"
KEEP_NPY = "keep.npy"
SUMMARY_JSON = "summary.json"
DATACOMP_DTYPE = np.dtype("u8,u8")  # DataComp subset file: (first, last) 64 bits of the uid
KEEP_SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False)])
# Fixed row groups make keep.parquet's bytes independent of how the input was split.
KEEP_ROW_GROUP = 1 << 20
# zstd halves hex text; the background writer thread hides most of its cost
KEEP_COMPRESSION = "zstd"
_UPPER_HEX = np.uint8(ord("A"))


# ------------------------------------------------------------------------------- uid keys
def is_hex(keys: Keys) -> bool:
    return len(keys) == 2


def encode_uids(arr: pa.Array | pa.ChunkedArray) -> Keys:
    """Uid strings -> key columns: hex keys when every uid is 32 lowercase hex digits,
    str keys otherwise. Raises on null uids and on uids containing NUL."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.type not in (pa.string(), pa.large_string()):
        arr = arr.cast(pa.string())
    if arr.null_count:
        raise ValueError(f"{arr.null_count} null uid(s): every score row needs a uid")
    keys = _encode_hex(arr)
    return keys if keys is not None else _encode_str(arr)


def _offsets(arr: pa.Array) -> np.ndarray:
    dtype = np.int64 if arr.type == pa.large_string() else np.int32
    return np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr) + 1]


def _encode_hex(arr: pa.Array) -> Keys | None:
    n = len(arr)
    if n == 0:
        return (np.empty(0, np.uint64), np.empty(0, np.uint64))
    off = _offsets(arr)
    if off[-1] - off[0] != 32 * n or not np.all(np.diff(off) == 32):
        return None
    data = memoryview(arr.buffers()[2])[int(off[0]) : int(off[-1])]
    try:
        raw = binascii.unhexlify(data)  # C speed; rejects every non-hex character
    except binascii.Error:
        return None
    # unhexlify accepts upper case; DataComp uids (and our keep.npy round trip) are lower case.
    # Checked in cache-sized slices: one 32-byte-per-row temporary costs more in page faults.
    text = np.frombuffer(data, np.uint8)
    step = 1 << 18
    if any(np.any(text[i : i + step] - _UPPER_HEX < 6) for i in range(0, len(text), step)):
        return None
    both = np.frombuffer(raw, dtype=">u8").reshape(n, 2)
    return (both[:, 0].astype(np.uint64), both[:, 1].astype(np.uint64))


def _encode_str(arr: pa.Array) -> Keys:
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    n = len(arr)
    off = _offsets(arr).astype(np.int64)
    lens = np.diff(off)
    # width rounded up to 4 bytes: NUL padding does not change the order, and word-sized
    # records copy faster
    width = -(-max(1, int(lens.max()) if n else 1) // 4) * 4
    data = (
        np.frombuffer(arr.buffers()[2], np.uint8)[off[0] : off[-1]] if n else np.empty(0, np.uint8)
    )
    if np.any(data == 0):
        raise ValueError("a uid contains a NUL character; uids must be text without NUL")
    out = np.zeros((n, width), np.uint8)
    # scatter every string's bytes to the start of its fixed-width row
    starts = np.repeat(np.arange(n, dtype=np.int64) * width - (off[:-1] - off[0]), lens)
    out.ravel()[starts + np.arange(len(data), dtype=np.int64)] = data
    return (out.view(f"S{width}").ravel(),)


def decode_keys(keys: Keys) -> pa.Array:
    """Key columns -> arrow uid strings (the inverse of `encode_uids`)."""
    if is_hex(keys):
        n = len(keys[0])
        big = 32 * n >= 2**31  # int32 offsets cannot address the text
        offsets = np.arange(n + 1, dtype=np.int64 if big else np.int32) * 32
        arr = pa.Array.from_buffers(
            pa.large_string() if big else pa.string(),
            n,
            [None, pa.py_buffer(offsets), pa.py_buffer(_hex_text(keys))],
        )
        return arr.cast(pa.string()) if big else arr
    (s,) = keys
    n = len(s)
    width = s.dtype.itemsize
    raw = np.ascontiguousarray(s).view(np.uint8).reshape(n, width)
    nonzero = raw != 0  # no NUL inside a uid: the non-NUL bytes are the string
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(nonzero.sum(axis=1), out=offsets[1:])
    data = raw[nonzero]
    return pa.Array.from_buffers(
        pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())]
    ).cast(pa.string())


def _hex_text(keys: Keys) -> bytes:
    """Hex keys -> their uids as one run of 32-character lowercase hex strings."""
    both = np.empty((len(keys[0]), 2), dtype=">u8")
    both[:, 0], both[:, 1] = keys
    return binascii.hexlify(both.tobytes())


def hex_keys_from_datacomp(arr: np.ndarray) -> Keys:
    return (np.ascontiguousarray(arr["f0"], np.uint64), np.ascontiguousarray(arr["f1"], np.uint64))


def to_str_keys(keys: Keys, width: int | None = None) -> Keys:
    """Any keys -> str keys of at least `width` bytes (order preserved)."""
    if is_hex(keys):
        s = np.frombuffer(_hex_text(keys), "S32") if len(keys[0]) else np.empty(0, "S32")
    else:
        (s,) = keys
    if width and s.dtype.itemsize < width:
        s = s.astype(f"S{width}")
    return (s,)


def unify(parts: Sequence[Keys]) -> list[Keys]:
    """Bring key chunks to one kind: hex if all are hex, else str of the widest width."""
    if all(is_hex(p) for p in parts):
        return list(parts)
    strs = [to_str_keys(p) for p in parts]
    width = max(p[0].dtype.itemsize for p in strs)
    return [to_str_keys(p, width) for p in strs]


def concat(parts: Sequence[Keys]) -> Keys:
    parts = unify(parts)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


def take(keys: Keys, idx: Any) -> Keys:
    return tuple(c[idx] for c in keys)


def order(keys: Keys, nearly_sorted: bool = False) -> np.ndarray:
    """Stable ascending order of the keys (equal keys keep their input order).

    Sorting on the first column alone is the fast path; the full lexsort runs only when the
    first column has ties (duplicate uids, or the rare shared top 64 bits)."""
    first = np.ascontiguousarray(keys[0])  # record fields are strided views
    if len(keys) == 1:
        return np.argsort(first, kind="stable")
    o = np.argsort(first, kind="stable" if nearly_sorted else "quicksort")
    s = first[o]
    if len(s) > 1 and np.any(s[1:] == s[:-1]):
        o = np.lexsort(keys[::-1])
    return o


def same_as_prev(keys: Keys) -> np.ndarray:
    """eq[i] = keys[i] == keys[i-1] (eq[0] False), for sorted keys."""
    eq = np.zeros(len(keys[0]), bool)
    if len(eq) > 1:
        eq[1:] = keys[0][1:] == keys[0][:-1]
        for c in keys[1:]:
            eq[1:] &= c[1:] == c[:-1]
    return eq


def equal_at(a: Keys, i: int, b: Keys, j: int) -> bool:
    return all(ca[i] == cb[j] for ca, cb in zip(a, b))


def count_le(keys: Keys, bound: Keys) -> int:
    """Number of leading elements of sorted `keys` that are <= bound[0]."""
    first = keys[0]
    b0 = bound[0][0]
    if len(keys) == 1:
        return int(np.searchsorted(first, b0, "right"))
    lo_i = int(np.searchsorted(first, b0, "left"))
    hi_i = int(np.searchsorted(first, b0, "right"))
    return lo_i + int(np.searchsorted(keys[1][lo_i:hi_i], bound[1][0], "right"))


def is_strictly_ascending(keys: Keys) -> bool:
    if len(keys[0]) < 2:
        return True
    if len(keys) == 1:
        return bool(np.all(keys[0][1:] > keys[0][:-1]))
    hi, lo = keys
    gt = hi[1:] > hi[:-1]
    return bool(np.all(gt | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))))


def _less(a: Keys, i: int, b: Keys, j: int) -> bool:
    a, b = unify([take(a, slice(i, i + 1)), take(b, slice(j, j + 1))])
    for ca, cb in zip(a, b):
        if ca[0] != cb[0]:
            return bool(ca[0] < cb[0])
    return False


# --------------------------------------------------------------------- sorted stream algebra
def checked(stream: Iterable[Keys], name: str) -> Iterator[Keys]:
    """Pass chunks through, raising if the stream is not strictly ascending (sorted, unique)."""
    last: Keys | None = None
    for chunk in stream:
        if len(chunk[0]) == 0:
            continue
        if not is_strictly_ascending(chunk) or (last is not None and not _less(last, 0, chunk, 0)):
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


def read_keeplist(url: str, chunk_rows: int = 1 << 20) -> Iterator[Keys]:
    """Stream a keep-list's uids as sorted key chunks (checked sorted and unique)."""
    fmt, url = resolve_keeplist(url)
    fs, path = storage.filesystem(url)
    return checked(
        _read_npy(fs, path, chunk_rows) if fmt == "npy" else _read_parquet(fs, path, chunk_rows),
        url,
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


# ----------------------------------------------------------------------- writing the keep/ dir
class KeepListWriter:
    """Streams sorted unique key chunks into keep.parquet, and into keep.npy as long as every
    uid is a DataComp uid (`write_npy=False` turns the npy off).

    Rows are regrouped into row groups of exactly KEEP_ROW_GROUP rows (the file's bytes do not
    depend on how the stream was chunked), and encoded + compressed by a background thread
    while the caller produces the next chunk. Files are built in a local temp folder and
    published only by `close()`: locally by rename (atomic), remotely by one upload each (an
    object appears whole or not at all). summary.json is written last, by `write_summary`, so
    a reader that sees it sees a finished keep-list."""

    def __init__(self, output: str, tmpdir: str | None = None, write_npy: bool | None = None):
        self.keep_url = storage.join(output, KEEP_DIR)
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
        self._npy = write_npy is not False
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
        if self._pending_rows >= KEEP_ROW_GROUP:
            keys = concat(self._pending)
            full = (self._pending_rows // KEEP_ROW_GROUP) * KEEP_ROW_GROUP
            for start in range(0, full, KEEP_ROW_GROUP):
                self._queue.put(take(keys, slice(start, start + KEEP_ROW_GROUP)))
            rest = take(keys, slice(full, None))
            self._pending = [rest] if len(rest[0]) else []
            self._pending_rows -= full

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
                self._body.write(both.tobytes())
        else:
            self._npy = False
        uids = decode_keys(keys)
        self._writer.write_table(
            pa.table({"uid": uids}, schema=KEEP_SCHEMA), row_group_size=len(uids)
        )

    def _finish_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> dict[str, Any]:
        """Finish and publish; returns {rows, parquet, npy (url or None)}."""
        if self._pending_rows:
            self._queue.put(concat(self._pending))
            self._pending, self._pending_rows = [], 0
        self._finish_thread()
        if self._error:
            self.abort()
            raise self._error
        self._writer.close()
        self._body.close()
        pq_url = storage.join(self.keep_url, KEEP_PARQUET)
        npy_url = storage.join(self.keep_url, KEEP_NPY)
        self._publish(self._pq_path, pq_url)
        if self._npy:
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
            self._publish(self._npy_path, npy_url)
        elif storage.exists(npy_url):
            # a stale keep.npy from an earlier selection must not outlive its keep.parquet
            fs, path = storage.filesystem(npy_url)
            fs.rm(path)
        os.unlink(self._npy_body)
        if self.remote:
            shutil.rmtree(self._dir, ignore_errors=True)
        return {"rows": self.rows, "parquet": pq_url, "npy": npy_url if self._npy else None}

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

    def _publish(self, local: str, url: str) -> None:
        if self.remote:
            fs, path = storage.filesystem(url)
            fs.put_file(local, path)
            os.unlink(local)
        else:
            with open(local, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(local, url)


def write_summary(output: str, summary: dict[str, Any]) -> str:
    url = storage.join(output, KEEP_DIR, SUMMARY_JSON)
    storage.write_bytes_atomic(url, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return url


def read_summary(url: str) -> dict[str, Any]:
    """A summary.json given as the file, a `keep/` folder or a run folder."""
    fs, path = storage.filesystem(url)
    if not path.endswith(".json"):
        for cand in (
            posixpath.join(path, SUMMARY_JSON),
            posixpath.join(path, KEEP_DIR, SUMMARY_JSON),
        ):
            if fs.exists(cand):
                path = cand
                break
    if not fs.exists(path):
        raise FileNotFoundError(f"no summary.json at {url}")
    with fs.open(path, "rb") as f:
        return json.load(io.TextIOWrapper(f, encoding="utf-8"))


def load_keep_uids(url: str) -> list[str]:
    """All uids of a keep-list as Python strings (small lists: tests, inspection)."""
    return [u for keys in read_keeplist(url) for u in decode_keys(keys).to_pylist()]
