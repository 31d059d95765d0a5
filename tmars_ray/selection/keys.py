"""Uid key columns: every sort, merge and set operation on uids works on these.

Keys are a tuple of numpy arrays that orders exactly like the uid strings do (byte-wise,
ascending):
- "hex" keys, `(hi, lo)` uint64: a DataComp uid (32 lowercase hex digits) is a 128-bit number;
  its first 16 hex digits are `hi`, the last 16 `lo`. Lowercase hex strings order like the
  numbers, and two uint64 columns sort ~5x faster than 32-byte strings. These are also the two
  fields of DataComp's `np.dtype("u8,u8")` subset files.
- "str" keys, `(s,)` with `s` of numpy dtype `S<w>` (UTF-8 bytes, NUL padded): any other uid.
  numpy compares `S` values over all `w` bytes, so NUL padding orders a prefix first, as strings
  do; uids that contain NUL themselves are rejected (they would collide with padding).
Keys of both kinds meet in one operation only after converting hex keys to `S32` text.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

Keys = tuple  # tuple[np.ndarray, ...]: (hi, lo) uint64 or (s,) bytes "S<w>"

_UPPER_HEX = np.uint8(ord("A"))


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


def less(a: Keys, i: int, b: Keys, j: int) -> bool:
    a, b = unify([take(a, slice(i, i + 1)), take(b, slice(j, j + 1))])
    for ca, cb in zip(a, b):
        if ca[0] != cb[0]:
            return bool(ca[0] < cb[0])
    return False
