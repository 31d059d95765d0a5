"""Packed selection records: one per score row, (uid key columns, score key[, derived flag]).

Score keys map float32 to uint32 preserving order. They also carry why a row is no candidate:
every finite float32 maps to a key >= 0x00800000, so 0 and 1 are free (they would be negative
NaN bit patterns, and NaN never gets a key): SKEY_NOT_OK, SKEY_NON_FINITE.

Record dtypes: hex uids -> (hi, lo, skey) = 20 bytes; other uids -> (s: S<w>, skey). Records of
a pool that has derived uids (uids made from shard and key) carry one more uint32 field,
`derived`, so the flag travels with the row through sort, merge and dedup at no cost to pools
without them. Records of different kinds meet only after `convert` to their `common_dtype`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tmars_ray.selection import keys as K
from tmars_ray.selection.keys import Keys

PASS_ROWS = 1 << 19  # records per read in the passes over the candidates
SKEY_NOT_OK = 0
SKEY_NON_FINITE = 1
HEX_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("skey", "<u4")])
DERIVED = "derived"


# --------------------------------------------------------------------------- score keys
def score_keys(score: np.ndarray) -> np.ndarray:
    """float32 -> uint32 with the same order (NaN excluded by the caller); -0.0 == +0.0."""
    bits = (np.asarray(score, np.float32) + np.float32(0.0)).view(np.uint32)
    neg = (bits & np.uint32(0x80000000)) != 0
    return np.where(neg, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def key_to_score(key: int) -> float:
    key = np.uint32(key)
    bits = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def threshold_key(threshold: float) -> int:
    """Smallest score key whose float32 value is >= threshold (a float64)."""
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, not NaN")
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf
        f = np.float32(threshold)
    if float(f) < threshold:
        f = np.nextafter(f, np.float32(np.inf))
    return int(score_keys(np.array([f], np.float32))[0])


def row_skeys(ok: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Score key per row; SKEY_NOT_OK / SKEY_NON_FINITE for rows that are no candidates."""
    finite = np.isfinite(score)
    skey = score_keys(np.where(finite, score, np.float32(0)))
    return np.where(ok, np.where(finite, skey, SKEY_NON_FINITE), SKEY_NOT_OK).astype(np.uint32)


# ------------------------------------------------------------------------- record dtypes
def record_dtype(width: int | None, derived: bool = False) -> np.dtype:
    """width None: hex records; else str records of `width` bytes."""
    fields = [("hi", "<u8"), ("lo", "<u8")] if width is None else [("s", f"S{width}")]
    fields.append(("skey", "<u4"))
    if derived:
        fields.append((DERIVED, "<u4"))
    return np.dtype(fields)


def is_hex_dtype(dtype: np.dtype) -> bool:
    return "hi" in dtype.names


def has_derived(dtype: np.dtype) -> bool:
    return DERIVED in dtype.names


def str_width(dtype: np.dtype) -> int:
    return dtype["s"].itemsize


def common_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """The dtype records of all these dtypes convert to without changing their order: hex when
    all are hex, else str of the widest width (at least 32: hex text); derived when any is."""
    dtypes = list(dtypes) or [HEX_RECORD]
    derived = any(has_derived(d) for d in dtypes)
    if all(is_hex_dtype(d) for d in dtypes):
        return record_dtype(None, derived)
    width = max([32] + [str_width(d) for d in dtypes if not is_hex_dtype(d)])
    return record_dtype(width, derived)


def make_records(keys: Keys, skey: np.ndarray, derived: np.ndarray | None = None) -> np.ndarray:
    width = None if K.is_hex(keys) else keys[0].dtype.itemsize
    rec = np.empty(len(skey), record_dtype(width, derived is not None))
    for name, col in zip(rec.dtype.names, keys):
        rec[name] = col
    rec["skey"] = skey
    if derived is not None:
        rec[DERIVED] = derived
    return rec


def rec_keys(rec: np.ndarray) -> Keys:
    return tuple(rec[n] for n in rec.dtype.names if n not in ("skey", DERIVED))


def rec_derived(rec: np.ndarray) -> np.ndarray:
    """Derived-uid flag per record (all False for records without the field)."""
    if has_derived(rec.dtype):
        return rec[DERIVED] != 0
    return np.zeros(len(rec), bool)


def convert(rec: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Records as `dtype` (a common_dtype of theirs): hex keys become their 32-digit text."""
    if rec.dtype == dtype:
        return rec
    keys = rec_keys(rec)
    if not is_hex_dtype(dtype):
        keys = K.to_str_keys(keys, str_width(dtype))
    derived = rec_derived(rec).astype(np.uint32) if has_derived(dtype) else None
    return make_records(keys, rec["skey"], derived)


def _words(rec: np.ndarray) -> np.ndarray:
    size = rec.dtype.itemsize
    word = np.uint32 if size % 4 == 0 else np.uint8
    return rec.view(word).reshape(len(rec), size // np.dtype(word).itemsize)


def take(rec: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """rec[idx] for an index array: np.take on a 2-d word view copies each record as a block,
    several times faster than numpy's per-field gather for structured dtypes."""
    rec = np.ascontiguousarray(rec)
    if out is None:
        return np.take(_words(rec), idx, axis=0).view(rec.dtype).reshape(-1)
    np.take(_words(rec), idx, axis=0, out=_words(out))
    return out


class Scratch:
    """Reusable big arrays: a fresh 20 MB array costs more in page faults than the copy into
    it. A buffer handed out is valid until the next `get` of the same name."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, dtype: np.dtype, n: int) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None or arr.dtype != dtype or len(arr) < n:
            arr = self._arrays[name] = np.empty(max(n, 1), dtype)
        return arr[:n]


# --------------------------------------------------------------------------- record runs
# A "run" is a uid-sorted sequence of records read by index range: a temp file on local disk
# (single node) or an array in memory / the object store (a partition on a cluster).
class RecordWriter:
    def __init__(self, path: str):
        self.path, self.rows, self.dtype = path, 0, None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._f = open(path, "wb")

    def write(self, rec: np.ndarray) -> None:
        if self.dtype is None:
            self.dtype = rec.dtype
        elif rec.dtype != self.dtype:
            raise AssertionError(f"record dtype {rec.dtype} != {self.dtype}")
        rec.tofile(self._f)
        self.rows += len(rec)

    def close(self) -> RecordFile:
        self._f.close()
        return RecordFile(self.path, self.rows, self.dtype or HEX_RECORD)


@dataclass
class RecordFile:
    path: str
    rows: int
    dtype: np.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        # read(), not mmap: mapped file pages would count as this process's memory
        return np.fromfile(
            self.path,
            dtype=self.dtype,
            count=max(0, stop - start),
            offset=start * self.dtype.itemsize,
        )

    def chunks(self, rows: int = 0) -> Iterator[np.ndarray]:
        rows = rows or PASS_ROWS
        for start in range(0, self.rows, rows):
            yield self.read(start, min(self.rows, start + rows))

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


class ArrayRun:
    """A run held in memory (e.g. a partition slice fetched from the object store)."""

    def __init__(self, rec: np.ndarray):
        self.rec, self.rows, self.dtype = rec, len(rec), rec.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.rec[start:stop]

    def chunks(self, rows: int = 0) -> Iterator[np.ndarray]:
        rows = rows or PASS_ROWS
        for start in range(0, self.rows, rows):
            yield self.rec[start : start + rows]

    def remove(self) -> None:
        self.rec = self.rec[:0]


class RecordSink:
    """Collects records in memory (a partition's candidates on a cluster worker)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.rows = 0

    def write(self, rec: np.ndarray) -> None:
        self.parts.append(rec)  # callers hand over fresh arrays (Dedup writes rec[mask])
        self.rows += len(rec)

    def close(self) -> ArrayRun:
        if not self.parts:
            return ArrayRun(np.empty(0, HEX_RECORD))
        return ArrayRun(np.concatenate(self.parts))
