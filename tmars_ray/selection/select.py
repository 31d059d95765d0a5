"""Global selection: score tables -> one exact, deterministic keep-list (DESIGN 3, 5, 7).

Semantics
---------
Candidates are rows with status `ok`, a finite selection score, and a uid not seen before (see
duplicates). With `fraction=F`, `k = floor(F * n_candidates)` (F taken as the decimal it prints
as, so 0.29 * 100 keeps 29) and the keep-list is the first k candidates ordered by
(score descending, uid ascending); the summary's `threshold` is the k-th row's score (None when
k == 0). With `threshold=T`, every candidate with score >= T is kept. Set algebra follows:
`((selected ∩ I1 ∩ I2 ...) ∪ U1 ∪ U2 ...)`.

Selection scores, by method (`Method` below): tmars -> tmars_score; clip-score / laion ->
clip_score; c-ssft / c-rho -> clip_score_2 - clip_score (float32), see `METHODS`; text-match ->
see `text_match_keep`.

Duplicate uids: rows are ordered deterministically (sources in the order given, files within a
source by manifest shard id / path, rows in file order); the first row of a uid is its only
representative, whatever its status, and every later row with that uid is counted in
`duplicate_rows` and is never a candidate. NaN, +-inf and null scores of `ok` rows are counted
in `non_finite` and are never candidates.

How (memory does not grow with the pool: an external sort by uid, then two cheap passes)
-----------------------------------------------------------------------------------------
1. `scan(task)`: a pure function of a group of score files (mappable over workers): reads only
   uid, status and the score columns batch by batch, turns every row into a 20-byte record
   (uid key, score key) and writes uid-sorted *runs* of <= RUN_ROWS records to local temp disk.
   Score keys map float32 to uint32 preserving order (two free values mark "not ok" and
   "non-finite"); uid keys are two uint64 for DataComp uids (keeplist.py).
2. Merge: the uid key space is cut into `workers` ranges (splitters sampled from the runs); each
   range is a stable k-way merge of the runs' slices (equal uids stay in source order), done
   by its own thread, which keeps the first row per uid and writes the candidates, uid-sorted,
   to a temp file while counting a 65,536-bucket histogram of the score keys' top 16 bits.
3. One pass over the candidates counts the low 16 bits inside the buckets that hold the wanted
   ranks (the k-th row and the summary quantiles): that gives the exact uint32 key of each.
4. One pass in uid order writes the keep-list: keys above the threshold key, plus the first
   `k - count(above)` rows *at* the threshold key, which in uid order are exactly the ties with
   the smallest uids. The output is already sorted and unique.
Memory per worker is bounded by RUN_ROWS and MERGE_BUFFER_ROWS; temp disk is ~20 bytes per row
(runs, then candidates), under `tmpdir`.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tmars_ray import __version__
from tmars_ray.data import schema
from tmars_ray.run import manifest, storage
from tmars_ray.selection import keeplist
from tmars_ray.selection.keeplist import Keys

log = logging.getLogger(__name__)

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
RUN_ROWS = 1 << 20  # rows per sorted run (bounds scan memory)
MERGE_BUFFER_ROWS = 1 << 20  # records buffered over all runs during a merge
MERGE_FANIN = 64  # more runs than this are merged in groups first
MERGE_MIN_BLOCK = 1 << 12  # records read from a run at a time, at least
PASS_ROWS = 1 << 19  # records per read in the passes over the candidates


# ------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    name: str
    columns: tuple[str, ...]  # score-table columns the score needs
    score: str  # how the selection score is formed (recorded in the summary)
    default_fraction: float | None = None
    default_threshold: float | None = None
    note: str | None = None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("tmars", ("tmars_score",), "tmars_score", default_fraction=0.5),
        Method("clip-score", ("clip_score",), "clip_score", default_fraction=0.5),
        Method(
            "laion",
            ("clip_score",),
            "clip_score",
            default_threshold=0.281,
            note="LAION-400M's rule (clip_score >= 0.281) is meaningful only with OpenAI "
            "ViT-B/32 scores (--clip-model ViT-B-32 --clip-pretrained openai).",
        ),
        # C-SSFT: model 1 (--clip-model) is the pool-trained/pretrained checkpoint, model 2
        # (--clip-model-2) the same after fine-tuning on a second, clean split. Samples whose
        # similarity drops (forgotten) are mislabeled: keep the high clip_score_2 - clip_score.
        Method(
            "c-ssft",
            ("clip_score", "clip_score_2"),
            "clip_score_2 - clip_score",
            default_fraction=0.5,
            note="c-ssft: score = clip_score_2 - clip_score; --clip-model is the checkpoint "
            "before second-split fine-tuning, --clip-model-2 the one after it; the least "
            "forgotten samples are kept.",
        ),
        # C-RHO (RHO-LOSS): reducible holdout loss = loss(pool-trained model) - loss(model
        # trained on clean holdout data). With loss = -cosine similarity this is
        # clip_score_2 - clip_score, model 1 = pool-trained, model 2 = clean-trained.
        Method(
            "c-rho",
            ("clip_score", "clip_score_2"),
            "clip_score_2 - clip_score",
            default_fraction=0.5,
            note="c-rho: score = clip_score_2 - clip_score (reducible holdout loss with "
            "loss = -cosine); --clip-model is trained on the pool, --clip-model-2 on a clean "
            "holdout set; high reducible loss is kept.",
        ),
        Method(
            "text-match",
            ("ocr_text", "caption"),
            "1 if kept by text_match_keep else 0",
            note="text-match: drops a sample when the share of its OCR words (>= 2 characters) "
            "found among its caption's words is >= text_match_threshold; samples without OCR "
            "text are kept.",
        ),
    )
}

_WORD = re.compile(r"[^\W_]+")  # runs of Unicode letters and digits


def words(text: str | None) -> list[str]:
    """Normalised words: lower-cased maximal runs of letters/digits (punctuation, spaces and
    underscores separate words)."""
    return _WORD.findall(text.lower()) if text else []


def text_match_overlap(ocr_text: str | None, caption: str | None) -> float | None:
    """Share of the OCR words (normalised by `words`, only those of >= 2 characters, counted
    with repetition) that also occur among the caption's normalised words; None when the
    sample has no such OCR word."""
    ocr = [w for w in words(ocr_text) if len(w) >= 2]
    if not ocr:
        return None
    cap = set(words(caption))
    return sum(w in cap for w in ocr) / len(ocr)


def text_match_keep(ocr_text: str | None, caption: str | None, threshold: float) -> bool:
    """The text-match rule: keep unless `text_match_overlap >= threshold`. Samples without OCR
    text (null, empty, or only 1-character words) are kept. Every ok row is a candidate; the
    selection score is 1.0 (keep) or 0.0 (drop), selected with threshold 1.0."""
    share = text_match_overlap(ocr_text, caption)
    return share is None or share < threshold


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


# ------------------------------------------------------------------ temp record files
# One packed record per row: the uid key columns + the score key. The score key also carries
# why a row is no candidate: every finite float32 maps to a key >= 0x00800000, so 0 and 1 are
# free (they would be negative NaN bit patterns, and NaN never gets a key).
SKEY_NOT_OK = 0
SKEY_NON_FINITE = 1
HEX_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("skey", "<u4")])


def _record_dtype(keys: Keys) -> np.dtype:
    if keeplist.is_hex(keys):
        return HEX_RECORD
    return np.dtype([("s", keys[0].dtype), ("skey", "<u4")])


def _records(keys: Keys, skey: np.ndarray) -> np.ndarray:
    rec = np.empty(len(skey), _record_dtype(keys))
    for name, col in zip(rec.dtype.names, keys):
        rec[name] = col
    rec["skey"] = skey
    return rec


def _words(rec: np.ndarray) -> np.ndarray:
    size = rec.dtype.itemsize
    word = np.uint32 if size % 4 == 0 else np.uint8
    return rec.view(word).reshape(len(rec), size // np.dtype(word).itemsize)


def _take(rec: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """rec[idx] for an index array: np.take on a 2-d word view copies each record as a block,
    several times faster than numpy's per-field gather for structured dtypes."""
    rec = np.ascontiguousarray(rec)
    if out is None:
        return np.take(_words(rec), idx, axis=0).view(rec.dtype).reshape(-1)
    np.take(_words(rec), idx, axis=0, out=_words(out))
    return out


class _Scratch:
    """Reusable big arrays: a fresh 20 MB array costs more in page faults than the copy into
    it. A buffer handed out is valid until the next `get` of the same name."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, dtype: np.dtype, n: int) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None or arr.dtype != dtype or len(arr) < n:
            arr = self._arrays[name] = np.empty(max(n, 1), dtype)
        return arr[:n]


def _rec_keys(rec: np.ndarray) -> Keys:
    return tuple(rec[n] for n in rec.dtype.names if n != "skey")


def _str_records(rec: np.ndarray, width: int) -> np.ndarray:
    """Records with str keys of `width` bytes (hex keys become their 32-digit text)."""
    keys = keeplist.to_str_keys(_rec_keys(rec), width)
    return _records(keys, rec["skey"])


class _RecordWriter:
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

    def close(self) -> _RecordFile:
        self._f.close()
        return _RecordFile(self.path, self.rows, self.dtype or HEX_RECORD)


@dataclass
class _RecordFile:
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

    @property
    def is_hex(self) -> bool:
        return self.dtype == HEX_RECORD

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


# ------------------------------------------------------------------------ score sources
@dataclass
class ScoreFile:
    url: str
    rows: int
    source: str


@dataclass
class Sources:
    files: list[ScoreFile] = field(default_factory=list)
    ignored_partial: list[str] = field(default_factory=list)
    shard_status: Counter = field(default_factory=Counter)
    fingerprints: Counter = field(default_factory=Counter)
    shards: int = 0


def _parquet_meta(fs: Any, path: str) -> pq.FileMetaData:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


def _is_run(fs: Any, path: str) -> bool:
    return fs.isdir(path) and (
        fs.isdir(posixpath.join(path, manifest.MANIFEST_DIR))
        or fs.isdir(posixpath.join(path, manifest.SCORES_DIR))
    )


def _parquet_files(fs: Any, path: str) -> list[str]:
    return sorted(
        p
        for p in fs.find(path)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
    )


def resolve_sources(sources: Sequence[str], needed: Sequence[str] = ()) -> Sources:
    """Score files of every source, in the deterministic order that decides duplicate uids.

    A *run* (a folder with manifest/ or scores/) contributes exactly the files its manifest
    records list; a record's row count must match its file(s); two records of one source shard
    (in one run or across runs) are an error; score files no record names are partial output
    of an interrupted run: ignored, with a warning. Anything else is a parquet file, a folder
    of them (recursive), or a glob."""
    out = Sources()
    seen_shards: dict[str, str] = {}
    for source in sources:
        fs, path = storage.filesystem(source)
        if _is_run(fs, path):
            _resolve_run(source, fs, path, out, seen_shards, needed)
        else:
            if any(c in path for c in "*?["):
                paths = sorted(p for p in fs.glob(path) if p.endswith(".parquet"))
            elif fs.isdir(path):
                paths = _parquet_files(fs, path)
            elif fs.exists(path):
                paths = [path]
            else:
                raise FileNotFoundError(f"score source {source} does not exist")
            for p in paths:
                meta = _parquet_meta(fs, p)
                out.files.append(ScoreFile(storage.unstrip(fs, p), meta.num_rows, source))
                _check_columns(storage.unstrip(fs, p), meta, needed)
    return out


def _resolve_run(
    source: str, fs: Any, root: str, out: Sources, seen: dict[str, str], needed: Sequence[str]
) -> None:
    records = manifest.read_records(source)
    named: set[str] = set()
    for rec in records:
        where = f"{source} (record {rec.shard_id})"
        if rec.shard in seen:
            raise ValueError(
                f"shard written twice: {rec.shard} has completion records {seen[rec.shard]} "
                f"and {where}; remove one of them (or the duplicate run) and select again"
            )
        seen[rec.shard] = where
        out.shards += 1
        out.shard_status[rec.shard_status] += 1
        out.fingerprints[rec.fingerprint] += 1
        rel = rec.score_file.strip("/")
        parts = rel.split("/")
        named.add(parts[1] if len(parts) > 1 and parts[0] == manifest.SCORES_DIR else rel)
        path = posixpath.join(root, rel)
        if fs.isfile(path):
            paths = [path]
        elif fs.isdir(path):
            paths = _parquet_files(fs, path)
        elif rec.rows == 0:
            continue  # a shard with no samples (unreadable, empty) needs no score file
        else:
            raise FileNotFoundError(
                f"{where}: score file {rec.score_file} for shard {rec.shard} is missing "
                f"({rec.rows} rows recorded); the run is damaged - rescore that shard"
            )
        metas = [_parquet_meta(fs, p) for p in paths]
        rows = sum(m.num_rows for m in metas)
        if rows != rec.rows:
            raise ValueError(
                f"{where}: {rec.score_file} has {rows} rows but the manifest records {rec.rows}"
            )
        for p, m in zip(paths, metas):
            out.files.append(ScoreFile(storage.unstrip(fs, p), m.num_rows, source))
            _check_columns(storage.unstrip(fs, p), m, needed)
    scores_dir = posixpath.join(root, manifest.SCORES_DIR)
    if fs.isdir(scores_dir):
        for entry in sorted(fs.ls(scores_dir, detail=False)):
            name = posixpath.basename(entry.rstrip("/"))
            if name not in named:
                log.warning("ignoring %s: no completion record (partial output)", entry)
                out.ignored_partial.append(storage.unstrip(fs, entry))


def _check_columns(url: str, meta: pq.FileMetaData, needed: Sequence[str]) -> None:
    names = set(meta.schema.to_arrow_schema().names)
    missing = [c for c in needed if c not in names]
    if missing:
        hint = ""
        if "clip_score_2" in missing:
            hint = " (score with --clip-model-2 to get clip_score_2)"
        elif "ocr_text" in missing or "caption" in missing:
            hint = " (text-match needs ocr_text and caption: score with --recognize-text)"
        raise ValueError(f"{url}: score table lacks column(s) {', '.join(missing)}{hint}")


# ------------------------------------------------------------------------- 1. scan (map)
@dataclass(frozen=True)
class ScanTask:
    files: tuple[str, ...]
    method: str
    out_dir: str  # local folder for this task's runs
    text_match_threshold: float = 0.5
    run_rows: int = RUN_ROWS


@dataclass
class ScanResult:
    runs: list[_RecordFile]
    rows: int
    status: dict[str, int]


def _selection_score(batch: pa.RecordBatch, method: str, tm_threshold: float) -> np.ndarray:
    """float32 selection score per row (NaN where it is missing)."""

    def col(name: str) -> np.ndarray:
        return _float32(batch.column(name))

    if method in ("c-ssft", "c-rho"):
        with np.errstate(invalid="ignore"):  # inf - inf = NaN: counted as non-finite
            return col("clip_score_2") - col("clip_score")
    if method == "text-match":
        ocr = batch.column("ocr_text").to_pylist()
        cap = batch.column("caption").to_pylist()
        return np.fromiter(
            (1.0 if text_match_keep(o, c, tm_threshold) else 0.0 for o, c in zip(ocr, cap)),
            np.float32,
            len(ocr),
        )
    return col(METHODS[method].columns[0])


# Arrow -> numpy through the buffers: pyarrow's own conversions and compute calls import
# pandas on first use (~1 s of CPU per process) and we need neither.
def _valid(arr: pa.Array) -> np.ndarray | None:
    if not arr.null_count:
        return None
    bits = np.frombuffer(arr.buffers()[0], np.uint8)
    return np.unpackbits(bits, bitorder="little")[arr.offset : arr.offset + len(arr)].astype(bool)


def _float32(arr: pa.Array) -> np.ndarray:
    """A float column as float32 with NaN for nulls."""
    if arr.type != pa.float32():
        arr = arr.cast(pa.float32())
    values = np.frombuffer(arr.buffers()[1], np.float32, count=len(arr), offset=arr.offset * 4)
    valid = _valid(arr)
    return values if valid is None else np.where(valid, values, np.float32(np.nan))


def _status_ok(batch: pa.RecordBatch, counts: Counter) -> np.ndarray:
    status = batch.column("status")
    if not pa.types.is_dictionary(status.type):
        status = status.dictionary_encode()
    names = status.dictionary.to_pylist()
    ok_index = names.index(schema.OK) if schema.OK in names else -1
    indices = status.indices
    itype = np.dtype(indices.type.to_pandas_dtype())
    idx = np.frombuffer(
        indices.buffers()[1], itype, count=len(indices), offset=indices.offset * itype.itemsize
    ).astype(np.int64)
    valid = _valid(indices)
    if valid is not None:
        idx = np.where(valid, idx, len(names))
        names = [*names, "<null>"]
    for name, n in zip(names, np.bincount(idx, minlength=len(names))):
        if n:
            counts[name] += int(n)
    return idx == ok_index


def row_skeys(ok: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Score key per row; SKEY_NOT_OK / SKEY_NON_FINITE for rows that are no candidates."""
    finite = np.isfinite(score)
    skey = score_keys(np.where(finite, score, np.float32(0)))
    return np.where(ok, np.where(finite, skey, SKEY_NON_FINITE), SKEY_NOT_OK).astype(np.uint32)


def scan(task: ScanTask) -> ScanResult:
    """Score files -> uid-sorted runs of (uid key, score key) records on local disk, plus
    counts. A pure function of its task, so it can be mapped over workers. Equal uids keep
    their file order (stable sort), which decides duplicates later."""
    method = METHODS[task.method]
    columns = ["uid", "status", *method.columns]
    status: Counter = Counter()
    runs: list[_RecordFile] = []
    pending: list[np.ndarray] = []
    pending_rows = 0
    rows = 0
    scratch = _Scratch()

    def flush() -> None:
        nonlocal pending, pending_rows
        parts = pending
        if len({p.dtype for p in parts}) > 1:  # some batches had non-hex uids
            width = max(32, *(p.dtype["s"].itemsize for p in parts if p.dtype != HEX_RECORD))
            parts = [_str_records(p, width) for p in parts]
        n = sum(len(p) for p in parts)
        rec = np.concatenate(parts, out=scratch.get("cat", parts[0].dtype, n))
        rec = _take(rec, keeplist.order(_rec_keys(rec)), out=scratch.get("sorted", rec.dtype, n))
        w = _RecordWriter(os.path.join(task.out_dir, f"run-{len(runs):05d}.bin"))
        w.write(rec)
        runs.append(w.close())
        pending, pending_rows = [], 0

    # batches well below run_rows keep the per-batch temporaries small (page-fault cost)
    batch_rows = max(1, min(task.run_rows, 1 << 18))
    for url in task.files:
        fs, path = storage.filesystem(url)
        source = fs.open(path, "rb") if storage.is_remote_fs(fs) else path
        try:
            pf = pq.ParquetFile(source, read_dictionary=["status"])
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                ok = _status_ok(batch, status)
                skey = row_skeys(
                    ok, _selection_score(batch, task.method, task.text_match_threshold)
                )
                try:
                    keys = keeplist.encode_uids(batch.column("uid"))
                except ValueError as e:
                    raise ValueError(f"{url}: {e}") from None
                pending.append(_records(keys, skey))
                pending_rows += batch.num_rows
                rows += batch.num_rows
                if pending_rows >= task.run_rows:
                    flush()
        finally:
            if source is not path:
                source.close()
    if pending_rows:
        flush()
    return ScanResult(runs, rows, dict(status))


# --------------------------------------------------------------------- 2. merge (reduce)
class _RunBuffer:
    """The loaded block of one run: records plus contiguous copies of the key columns (for
    fast searchsorted) and the last key as a tuple of numpy scalars (a cheap min over runs;
    numpy scalars, not Python ints: searchsorted converts a Python int ~30x slower)."""

    __slots__ = ("rec", "cols", "last")

    def __init__(self, rec: np.ndarray):
        self.rec = rec
        self.cols = tuple(np.ascontiguousarray(c) for c in _rec_keys(rec))
        self.last = tuple(c[-1] for c in self.cols)

    def count_le(self, bound: tuple) -> int:
        first = self.cols[0]
        m = int(first.searchsorted(bound[0], "right"))
        if len(self.cols) == 1 or m == 0 or first[m - 1] != bound[0]:
            return m
        lo = int(first.searchsorted(bound[0], "left"))  # equal first halves: rare
        return lo + int(self.cols[1][lo:m].searchsorted(bound[1], "right"))

    def drop(self, m: int) -> None:
        self.rec = self.rec[m:]
        self.cols = tuple(c[m:] for c in self.cols)


def _merge(
    runs: Sequence[_RecordFile],
    consume: Callable[[np.ndarray], None],
    ranges: Sequence[tuple[int, int]] | None = None,
) -> None:
    """Stable k-way merge of uid-sorted runs (each restricted to its [start, stop) range):
    `consume` gets uid-sorted record chunks; equal uids come in run order, then row order.
    Memory: about MERGE_BUFFER_ROWS records in all, whatever the run sizes. Each round emits
    every buffered record <= the smallest buffered last key, so one buffer always empties;
    the per-round work over the k runs is a few scalar operations each."""
    block = max(MERGE_MIN_BLOCK, MERGE_BUFFER_ROWS // max(1, len(runs)))
    all_hex = all(r.is_hex for r in runs)
    width = max([32] + [r.dtype["s"].itemsize for r in runs if not r.is_hex])
    ranges = list(ranges or [(0, r.rows) for r in runs])
    pos = [a for a, _ in ranges]
    bufs: list[_RunBuffer | None] = [None] * len(runs)
    scratch = _Scratch()  # consumers use each chunk before the next round reuses it

    while True:
        for i, r in enumerate(runs):
            # top up every buffer that is half empty, not just the empty ones: buffers then
            # cover similar key spans and each round emits ~half of everything buffered,
            # instead of one block per round with per-round work over all k runs
            held = 0 if bufs[i] is None else len(bufs[i].rec)
            if held < block // 2 and pos[i] < ranges[i][1]:
                stop = min(ranges[i][1], pos[i] + block)
                rec = r.read(pos[i], stop)
                if not all_hex and rec.dtype != _str_dtype(width):
                    rec = _str_records(rec, width)
                if held:
                    rec = np.concatenate([bufs[i].rec, rec])
                bufs[i] = _RunBuffer(rec)
                pos[i] = stop
        live = [i for i in range(len(runs)) if bufs[i] is not None]
        if not live:
            return
        if len(live) == 1:  # nothing to interleave with
            consume(bufs[live[0]].rec)
            bufs[live[0]] = None
            continue
        bound = min(bufs[i].last for i in live)
        parts = []
        for i in live:
            buf = bufs[i]
            m = buf.count_le(bound)
            if m:
                parts.append(buf.rec[:m])
            if m == len(buf.rec):
                bufs[i] = None
            elif m:
                buf.drop(m)
        n = sum(len(p) for p in parts)
        rec = np.concatenate(parts, out=scratch.get("cat", parts[0].dtype, n))
        o = keeplist.order(_rec_keys(rec), nearly_sorted=True)
        consume(_take(rec, o, out=scratch.get("sorted", rec.dtype, n)))


def _str_dtype(width: int) -> np.dtype:
    return np.dtype([("s", f"S{width}"), ("skey", "<u4")])


class _Dedup:
    """Consumer of a final merge: the first row per uid wins; candidates go to disk in uid
    order, with a histogram of their score keys' top 16 bits."""

    def __init__(self, path: str):
        self.out = _RecordWriter(path)
        self.hist = np.zeros(1 << 16, np.int64)
        self.duplicate_rows = 0
        self.duplicate_uids = 0
        self.non_finite = 0
        self._last: Keys | None = None
        self._last_was_dup = False

    def __call__(self, rec: np.ndarray) -> None:
        n = len(rec)
        if n == 0:
            return
        keys = _rec_keys(rec)
        first_col = keys[0]
        # fast check on the first key column alone; full comparison only when it has ties
        maybe = np.empty(n, bool)
        maybe[0] = self._last is not None and first_col[0] == self._last[0][0]
        np.equal(first_col[1:], first_col[:-1], out=maybe[1:])
        skey = rec["skey"]
        if maybe.any():
            dup = keeplist.same_as_prev(keys)
            if self._last is not None and keeplist.equal_at(keys, 0, self._last, 0):
                dup[0] = True
            prev = np.empty(n, bool)
            prev[0] = self._last_was_dup
            prev[1:] = dup[:-1]
            self.duplicate_rows += int(dup.sum())
            self.duplicate_uids += int((dup & ~prev).sum())
            first = ~dup
            self.non_finite += int(np.count_nonzero(first & (skey == SKEY_NON_FINITE)))
            cand = first & (skey > SKEY_NON_FINITE)
            last_dup = bool(dup[-1])
        else:
            self.non_finite += int(np.count_nonzero(skey == SKEY_NON_FINITE))
            cand = skey > SKEY_NON_FINITE
            last_dup = False
        out = rec[cand]
        self.out.write(out)
        self.hist += np.bincount(out["skey"] >> 16, minlength=1 << 16)
        self._last = tuple(c[-1:].copy() for c in keys)
        self._last_was_dup = last_dup

    def close(self) -> _RecordFile:
        return self.out.close()


def _group_merges(runs: list[_RecordFile], work: str) -> list[_RecordFile]:
    """Bounded fan-in: merge contiguous groups of runs (their order kept) until few remain."""
    level = 0
    while len(runs) > MERGE_FANIN:
        merged = []
        for g in range(0, len(runs), MERGE_FANIN):
            w = _RecordWriter(os.path.join(work, f"merge-{level}-{g // MERGE_FANIN:05d}.bin"))
            _merge(runs[g : g + MERGE_FANIN], w.write)
            merged.append(w.close())
            for r in runs[g : g + MERGE_FANIN]:
                r.remove()
        runs, level = merged, level + 1
    return runs


def _count_le_in_file(run: _RecordFile, bound: Keys) -> int:
    """Records of a sorted run that are <= bound: binary search with one-record reads."""
    lo, hi = 0, run.rows
    while lo < hi:
        mid = (lo + hi) // 2
        if keeplist.count_le(_rec_keys(run.read(mid, mid + 1)), bound):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _key_ranges(runs: list[_RecordFile], parts: int) -> list[list[tuple[int, int]]]:
    """Split the uid key space into `parts` ranges of about equal size (splitters sampled from
    every run) -> per range, each run's [start, stop). Equal uids never straddle a split, so
    each range merges and deduplicates on its own; ranges are disjoint and in uid order."""
    total = sum(r.rows for r in runs)
    if parts <= 1 or total < 2 * MERGE_BUFFER_ROWS:
        return [[(0, r.rows) for r in runs]]
    width = max([32] + [r.dtype["s"].itemsize for r in runs if not r.is_hex])
    text = not all(r.is_hex for r in runs)  # compare as text of one width, as _merge does
    samples = []
    for r in runs:
        for j in range(1, 8 * parts):
            at = j * r.rows // (8 * parts)
            rec = r.read(at, at + 1)
            samples.append(_str_records(rec, width) if text else rec)
    sample = np.concatenate(samples)
    sample = _take(sample, keeplist.order(_rec_keys(sample)))
    bounds = [_rec_keys(sample[len(sample) * p // parts :][:1]) for p in range(1, parts)]
    cuts = []
    for r in runs:
        own = [
            _count_le_in_str(r, bd, width) if text else _count_le_in_file(r, bd) for bd in bounds
        ]
        cuts.append([0, *own, r.rows])
    return [[(c[p], c[p + 1]) for c in cuts] for p in range(parts)]


def _count_le_in_str(run: _RecordFile, bound: Keys, width: int) -> int:
    lo, hi = 0, run.rows
    while lo < hi:
        mid = (lo + hi) // 2
        if keeplist.count_le(_rec_keys(_str_records(run.read(mid, mid + 1), width)), bound):
            lo = mid + 1
        else:
            hi = mid
    return lo


# --------------------------------------------------------------- 3. exact rank selection
def _rank_keys(
    cands: list[_RecordFile], hist: np.ndarray, ranks: Sequence[int]
) -> tuple[dict[int, int], dict[int, np.ndarray]]:
    """Exact score key at each ascending 0-based rank, from the top-16-bit histogram plus one
    pass that counts the low 16 bits inside the buckets holding the ranks. Also returns those
    buckets' low-bit histograms."""
    if not ranks:
        return {}, {}
    cum = np.cumsum(hist)
    bucket = {r: int(np.searchsorted(cum, r, "right")) for r in ranks}
    wanted = sorted(set(bucket.values()))
    low = {b: np.zeros(1 << 16, np.int64) for b in wanted}
    for part in cands:
        for rec in part.chunks():
            skey = rec["skey"]
            top = skey >> 16
            for b in wanted:
                sel = skey[top == b]
                if len(sel):
                    low[b] += np.bincount(sel & 0xFFFF, minlength=1 << 16)
    out = {}
    for r, b in bucket.items():
        before = int(cum[b - 1]) if b else 0
        within = int(np.searchsorted(np.cumsum(low[b]), r - before, "right"))
        out[r] = (b << 16) | within
    return out, low


def _selected(cands: list[_RecordFile], key: int | None, ties: int | None) -> Iterator[Keys]:
    """4. the keep pass, in uid order: keys > key, plus the first `ties` rows == key
    (all rows >= key when ties is None); nothing when key is None."""
    if key is None:
        return
    taken = 0
    for part in cands:
        for rec in part.chunks():
            skey = rec["skey"]
            if ties is None:
                mask = skey >= key
            else:
                at = skey == key
                keep_at = at & (taken + np.cumsum(at) <= ties)
                taken += int(np.count_nonzero(keep_at))
                mask = (skey > key) | keep_at
            if mask.any():
                yield _rec_keys(rec[mask])


class _Counted:
    def __init__(self, it: Iterator[Keys]):
        self.it, self.rows = it, 0

    def __iter__(self) -> Iterator[Keys]:
        for chunk in self.it:
            self.rows += len(chunk[0])
            yield chunk


# ----------------------------------------------------------------------------- driver
def _fraction_k(fraction: float, n: int) -> int:
    return math.floor(Decimal(repr(float(fraction))) * n)


def _plan_tasks(files: list[ScoreFile], run_rows: int) -> list[tuple[str, ...]]:
    """Contiguous groups of files of about run_rows rows (order kept: it decides duplicates)."""
    groups: list[tuple[str, ...]] = []
    cur: list[str] = []
    rows = 0
    for f in files:
        cur.append(f.url)
        rows += f.rows
        if rows >= run_rows:
            groups.append(tuple(cur))
            cur, rows = [], 0
    if cur:
        groups.append(tuple(cur))
    return groups


def select(
    sources: Sequence[str],
    output: str,
    method: str = "tmars",
    fraction: float | None = None,
    threshold: float | None = None,
    intersect: Sequence[str] = (),
    union: Sequence[str] = (),
    text_match_threshold: float = 0.5,
    extra: dict[str, Any] | None = None,
    tmpdir: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Select over the union of `sources` (run folders or parquet score tables; the first
    occurrence of a uid wins, in source order) and write `<output>/keep/` (keep.parquet,
    keep.npy when every uid is a DataComp uid, summary.json last). Returns the summary.

    `fraction` / `threshold`: at most one; neither means the method's default. `extra` is
    merged into the summary (models, config, versions, times...). `workers` threads (default:
    up to 4, one per core) scan files and merge key ranges concurrently - pyarrow and numpy
    release the GIL; the result does not depend on it. Temp runs go under `tmpdir`."""
    t0, c0 = time.perf_counter(), time.process_time()
    workers = max(1, workers or min(4, os.cpu_count() or 1))
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    m = METHODS[method]
    if fraction is not None and threshold is not None:
        raise ValueError("give either fraction or threshold, not both")
    if method == "text-match" and (fraction is not None or threshold is not None):
        raise ValueError(
            "text-match keeps by its rule; set text_match_threshold, not fraction/threshold"
        )
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: must be within [0, 1]")
    if fraction is None and threshold is None:
        fraction, threshold = m.default_fraction, m.default_threshold
    if method == "text-match":
        threshold = 1.0
    if not sources:
        raise ValueError("no score sources given")
    _check_extra(extra or {})

    srcs = resolve_sources(sources, ["uid", "status", *m.columns])
    work = tempfile.mkdtemp(prefix="tmars-select-", dir=tmpdir)
    times: dict[str, float] = {}
    try:
        # 1. scan: the pure per-file-group map
        tasks = [
            ScanTask(g, method, os.path.join(work, f"task-{i:06d}"), text_match_threshold)
            for i, g in enumerate(_plan_tasks(srcs.files, RUN_ROWS))
        ]
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(scan, tasks))
        times["scan_s"] = time.perf_counter() - t0
        times["scan_cpu_s"], c = time.process_time() - c0, time.process_time()
        status: Counter = Counter()
        for r in results:
            status.update(r.status)
        input_rows = sum(r.rows for r in results)
        runs = [run for r in results for run in r.runs]
        all_hex = all(r.is_hex for r in runs)

        # 2. merge + dedup -> uid-sorted candidates per key range, score-key histograms
        t = time.perf_counter()
        runs = _group_merges(runs, work)
        ranges = _key_ranges(runs, workers)
        dedups = [_Dedup(os.path.join(work, f"candidates-{p:03d}")) for p in range(len(ranges))]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda p: _merge(runs, dedups[p], ranges[p]), range(len(ranges))))
        for r in runs:
            r.remove()
        cands = [d.close() for d in dedups]
        hist = sum(d.hist for d in dedups)
        n = sum(c.rows for c in cands)
        times["merge_s"] = time.perf_counter() - t
        times["merge_cpu_s"], c = time.process_time() - c, time.process_time()

        # 3. exact threshold key (and quantiles)
        t = time.perf_counter()
        q_ranks = [math.floor(q * (n - 1)) for q in QUANTILES] if n else []
        key: int | None
        ties: int | None = None
        ties_total: int | None = None
        if fraction is not None:
            k = _fraction_k(fraction, n)
            ranks, low = _rank_keys(cands, hist, [*q_ranks, n - k] if k else q_ranks)
            key = ranks[n - k] if k else None
            if key is not None:  # rows strictly above the threshold key: all kept
                b = key >> 16
                above = int(hist[b + 1 :].sum()) + int(low[b][(key & 0xFFFF) + 1 :].sum())
                ties = k - above
                ties_total = int(low[b][key & 0xFFFF])
        else:
            ranks, _ = _rank_keys(cands, hist, q_ranks)
            key = threshold_key(float(threshold))
        times["threshold_s"] = time.perf_counter() - t
        times["threshold_cpu_s"], c = time.process_time() - c, time.process_time()

        # 4. keep pass (+ set algebra), streamed into the keep-list writer
        t = time.perf_counter()
        selected = _Counted(_selected(cands, key, ties))
        stream: Iterator[Keys] = iter(selected)
        for url in intersect:
            other = keeplist.read_keeplist(url)
            if all_hex:  # a non-DataComp uid cannot be in a hex pool's selection
                other = keeplist.only_hex(other)
            stream = keeplist.merge_sorted([stream, other], "and")
        if union:
            stream = keeplist.merge_sorted(
                [stream, *(keeplist.read_keeplist(u) for u in union)], "or"
            )
        writer = keeplist.KeepListWriter(output, tmpdir=tmpdir)
        try:
            for chunk in stream:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        written = writer.close()
        times["keep_s"] = time.perf_counter() - t
        times["keep_cpu_s"], c = time.process_time() - c, time.process_time()
        for c in cands:
            c.remove()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if fraction is not None:
        thr_value = key_to_score(key) if key is not None else None
    else:
        thr_value = float(threshold)
    notes = [m.note] if m.note else []
    if srcs.ignored_partial:
        notes.append(
            f"{len(srcs.ignored_partial)} score file(s) without a completion record ignored"
        )
    summary: dict[str, Any] = {
        "method": method,
        "score": m.score,
        "fraction": fraction,
        "threshold": thr_value,
        "threshold_rule": "score >= threshold"
        + (", ties at the threshold kept by uid ascending up to k" if fraction is not None else ""),
        "text_match_threshold": text_match_threshold if method == "text-match" else None,
        "counts": {
            "input": input_rows,
            "status": dict(sorted(status.items())),
            "ok": status.get(schema.OK, 0),
            "duplicate_rows": sum(d.duplicate_rows for d in dedups),
            "duplicate_uids": sum(d.duplicate_uids for d in dedups),
            "non_finite": sum(d.non_finite for d in dedups),
            "candidates": n,
            "selected": selected.rows,
            "kept": written["rows"],
            "kept_fraction": written["rows"] / n if n else None,
            "ties_at_threshold": ties_total,
            "ties_at_threshold_kept": ties,
        },
        "quantiles": {str(q): key_to_score(ranks[r]) for q, r in zip(QUANTILES, q_ranks)}
        if n
        else None,
        "set_algebra": {
            "intersect": list(intersect),
            "union": list(union),
            "rule": "((selected & intersect...) | union...)",
        },
        "sources": list(sources),
        "score_files": len(srcs.files),
        "shards": srcs.shards,
        "shard_status": dict(sorted(srcs.shard_status.items())),
        "scoring_fingerprints": dict(sorted(srcs.fingerprints.items())),
        "ignored_partial_files": srcs.ignored_partial[:100],
        "uids": "datacomp-hex" if all_hex else "string",
        "keep": {"parquet": written["parquet"], "npy": written["npy"]},
        "notes": notes,
        "versions": {"tmars-ray": __version__, "pyarrow": pa.__version__, "numpy": np.__version__},
        "times": {
            **{k: round(v, 3) for k, v in times.items()},
            "select_s": round(time.perf_counter() - t0, 3),
        },
    }
    _merge_extra(summary, extra or {})
    keeplist.write_summary(output, summary)
    return summary


# Summary fields that `extra` may extend (dicts merge, notes append); the rest are the
# selection's own and may not be overwritten.
_EXTENSIBLE = ("times", "versions", "notes")
_OWN_FIELDS = (
    "method",
    "score",
    "fraction",
    "threshold",
    "threshold_rule",
    "text_match_threshold",
    "counts",
    "quantiles",
    "set_algebra",
    "sources",
    "score_files",
    "shards",
    "shard_status",
    "scoring_fingerprints",
    "ignored_partial_files",
    "uids",
    "keep",
)


def _check_extra(extra: dict[str, Any]) -> None:
    clash = sorted(k for k in extra if k in _OWN_FIELDS)
    if clash:
        raise ValueError(f"extra key(s) {clash} would overwrite the selection's own summary fields")


def _merge_extra(summary: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if k == "notes":
            summary["notes"] = [*summary["notes"], *v]
        elif k in _EXTENSIBLE and isinstance(v, dict):
            summary[k] = {**summary[k], **v}
        else:
            summary[k] = v


def threshold_from_summary(url: str, method: str | None = None) -> float:
    """The frozen threshold of an earlier selection (its summary.json, keep/ folder or run
    folder), for re-filtering a new crawl comparably. Raises when it has none (k == 0) or,
    given `method`, when it was made by another method."""
    summary = keeplist.read_summary(url)
    if method is not None and summary.get("method") != method:
        raise ValueError(
            f"{url}: threshold was fitted with method {summary.get('method')!r}, not {method!r}"
        )
    if summary.get("threshold") is None:
        raise ValueError(f"{url}: that selection kept nothing, so it has no threshold to reuse")
    return float(summary["threshold"])


def select_config(
    cfg: Any, sources: Sequence[str], output: str, extra: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    """`select` driven by a Config (method, fraction/threshold, threshold_from, set algebra):
    the one place where `tmars run` and `tmars select` turn options into a selection."""
    threshold = cfg.threshold
    if cfg.threshold_from:
        threshold = threshold_from_summary(cfg.threshold_from, cfg.method)
    return select(
        list(sources),
        output,
        method=cfg.method,
        fraction=None if threshold is not None else cfg.fraction,
        threshold=threshold,
        intersect=cfg.intersect,
        union=cfg.union,
        text_match_threshold=cfg.text_match_threshold,
        extra={"threshold_from": cfg.threshold_from, **(extra or {})},
        **kw,
    )


__all__ = [
    "METHODS",
    "Method",
    "ScanTask",
    "ScanResult",
    "scan",
    "resolve_sources",
    "select",
    "select_config",
    "text_match_keep",
    "text_match_overlap",
    "threshold_from_summary",
    "words",
]
