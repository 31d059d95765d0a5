"""Merge and dedup (reduce): uid-sorted runs -> uid-sorted candidates, one pass, bounded memory.

`merge` is a stable k-way merge of runs (equal uids stay in run order, then row order), each
run optionally restricted to an index range, so that disjoint uid ranges merge independently
(threads on one node; Ray tasks on a cluster, where a range is a partition). `Dedup` consumes
the merged stream: a uid's only representative is its first `ok` row (its first row when none
is ok), "first" in merge order (= source order, then shard id / path, then row order);
candidates (ok rows with a finite score) go to a sink in uid order with a histogram of their
score keys' top 16 bits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tmars_ray.selection import keys as K
from tmars_ray.selection import records as R
from tmars_ray.selection.keys import Keys

DUPLICATE_RULE = (
    "a uid on several rows is represented by its first ok row (its first row when none is ok, "
    "then no candidate), in the order: sources as given, then shard id (plain files: path), "
    "then row order"
)
MERGE_BUFFER_ROWS = 1 << 20  # records buffered over all runs during a merge
MERGE_FANIN = 64  # more runs than this are merged in groups first
MERGE_MIN_BLOCK = 1 << 12  # records read from a run at a time, at least

Run = Any  # records.RecordFile | records.ArrayRun: rows, dtype, read(start, stop)


class _RunBuffer:
    """The loaded block of one run: records plus contiguous copies of the key columns (for
    fast searchsorted) and the last key as a tuple of numpy scalars (a cheap min over runs;
    numpy scalars, not Python ints: searchsorted converts a Python int ~30x slower)."""

    __slots__ = ("rec", "cols", "last")

    def __init__(self, rec: np.ndarray):
        self.rec = rec
        self.cols = tuple(np.ascontiguousarray(c) for c in R.rec_keys(rec))
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


def merge(
    runs: Sequence[Run],
    consume: Callable[[np.ndarray], None],
    ranges: Sequence[tuple[int, int]] | None = None,
) -> None:
    """Stable k-way merge of uid-sorted runs (each restricted to its [start, stop) range):
    `consume` gets uid-sorted record chunks (valid during the call); equal uids come in run
    order, then row order. Memory: about MERGE_BUFFER_ROWS records in all, whatever the run
    sizes. Each round emits every buffered record <= the smallest buffered last key, so one
    buffer always empties; the per-round work over the k runs is a few scalar operations."""
    block = max(MERGE_MIN_BLOCK, MERGE_BUFFER_ROWS // max(1, len(runs)))
    target = R.common_dtype([r.dtype for r in runs])
    ranges = list(ranges or [(0, r.rows) for r in runs])
    pos = [a for a, _ in ranges]
    bufs: list[_RunBuffer | None] = [None] * len(runs)
    scratch = R.Scratch()  # consumers use each chunk before the next round reuses it

    while True:
        for i, r in enumerate(runs):
            # top up every buffer that is half empty, not just the empty ones: buffers then
            # cover similar key spans and each round emits ~half of everything buffered,
            # instead of one block per round with per-round work over all k runs
            held = 0 if bufs[i] is None else len(bufs[i].rec)
            if held < block // 2 and pos[i] < ranges[i][1]:
                stop = min(ranges[i][1], pos[i] + block)
                rec = R.convert(r.read(pos[i], stop), target)
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
        rec = np.concatenate(parts, out=scratch.get("cat", target, n))
        o = K.order(R.rec_keys(rec), nearly_sorted=True)
        consume(R.take(rec, o, out=scratch.get("sorted", target, n)))


class Dedup:
    """Consumer of a final merge: per uid, the first ok row wins (a failed row never hides a
    later ok one; a uid with no ok row has no candidate); candidates go to `sink` (a
    RecordWriter or RecordSink) in uid order, with a histogram of their score keys' top 16
    bits. Every row of a uid but one counts in `duplicate_rows`."""

    def __init__(self, sink: Any):
        self.out = sink
        self.hist = np.zeros(1 << 16, np.int64)
        self.duplicate_rows = 0
        self.duplicate_uids = 0
        self.non_finite = 0
        self._last: Keys | None = None
        self._last_was_dup = False
        self._last_had_ok = False  # the last uid seen already has its ok row (across chunks)

    def __call__(self, rec: np.ndarray) -> None:
        n = len(rec)
        if n == 0:
            return
        keys = R.rec_keys(rec)
        first_col = keys[0]
        # fast check on the first key column alone; full comparison only when it has ties
        maybe = np.empty(n, bool)
        maybe[0] = self._last is not None and first_col[0] == self._last[0][0]
        np.equal(first_col[1:], first_col[:-1], out=maybe[1:])
        skey = rec["skey"]
        ok = skey != R.SKEY_NOT_OK
        if maybe.any():
            dup = K.same_as_prev(keys)
            if self._last is not None and K.equal_at(keys, 0, self._last, 0):
                dup[0] = True
            prev = np.empty(n, bool)
            prev[0] = self._last_was_dup
            prev[1:] = dup[:-1]
            self.duplicate_rows += int(dup.sum())
            self.duplicate_uids += int((dup & ~prev).sum())
            chosen = self._first_ok(dup, ok)
            self.non_finite += int(np.count_nonzero(chosen & (skey == R.SKEY_NON_FINITE)))
            cand = chosen & (skey > R.SKEY_NON_FINITE)
            last_dup = bool(dup[-1])
        else:
            self.non_finite += int(np.count_nonzero(skey == R.SKEY_NON_FINITE))
            cand = skey > R.SKEY_NON_FINITE
            last_dup = False
            self._last_had_ok = bool(ok[-1])
        out = rec[cand]
        self.out.write(out)
        self.hist += np.bincount(out["skey"] >> 16, minlength=1 << 16)
        self._last = tuple(c[-1:].copy() for c in keys)
        self._last_was_dup = last_dup

    def _first_ok(self, dup: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Rows that represent their uid: ok rows with no earlier ok row of the same uid
        (group 0 is the uid continued from the previous chunk, when dup[0])."""
        group = np.cumsum(~dup)
        ok_at = np.flatnonzero(ok)
        g = group[ok_at]
        first = np.ones(len(ok_at), bool)
        first[1:] = g[1:] != g[:-1]
        if len(ok_at) and g[0] == 0 and self._last_had_ok:
            first[0] = False  # that uid's ok row came in an earlier chunk
        chosen = np.zeros(len(ok), bool)
        chosen[ok_at[first]] = True
        starts = np.flatnonzero(~dup)
        if len(starts):
            self._last_had_ok = bool(ok[starts[-1] :].any())
        else:  # the whole chunk continues the previous uid
            self._last_had_ok = self._last_had_ok or bool(ok.any())
        return chosen

    def close(self) -> Run:
        return self.out.close()

    def stats(self) -> dict[str, int]:
        return {
            "duplicate_rows": self.duplicate_rows,
            "duplicate_uids": self.duplicate_uids,
            "non_finite": self.non_finite,
        }


def group_merges(runs: list[R.RecordFile], work: str) -> list[R.RecordFile]:
    """Bounded fan-in: merge contiguous groups of runs (their order kept) until few remain."""
    level = 0
    while len(runs) > MERGE_FANIN:
        merged = []
        for g in range(0, len(runs), MERGE_FANIN):
            w = R.RecordWriter(os.path.join(work, f"merge-{level}-{g // MERGE_FANIN:05d}.bin"))
            merge(runs[g : g + MERGE_FANIN], w.write)
            merged.append(w.close())
            for r in runs[g : g + MERGE_FANIN]:
                r.remove()
        runs, level = merged, level + 1
    return runs


def _count_le_in_run(run: Run, bound: Keys, target: np.dtype) -> int:
    """Records of a sorted run that are <= bound: binary search with one-record reads."""
    lo, hi = 0, run.rows
    while lo < hi:
        mid = (lo + hi) // 2
        if K.count_le(R.rec_keys(R.convert(run.read(mid, mid + 1), target)), bound):
            lo = mid + 1
        else:
            hi = mid
    return lo


def key_ranges(runs: Sequence[Run], parts: int) -> list[list[tuple[int, int]]]:
    """Split the uid key space into `parts` ranges of about equal size (splitters sampled from
    every run) -> per range, each run's [start, stop). Equal uids never straddle a split, so
    each range merges and deduplicates on its own; ranges are disjoint and in uid order."""
    total = sum(r.rows for r in runs)
    if parts <= 1 or total < 2 * MERGE_BUFFER_ROWS:
        return [[(0, r.rows) for r in runs]]
    target = R.common_dtype([r.dtype for r in runs])  # compare as merge does
    bounds = sample_bounds(runs, parts, target)
    cuts = []
    for r in runs:
        own = [
            _count_le_in_run(r, K.take(bounds, slice(j, j + 1)), target) for j in range(parts - 1)
        ]
        cuts.append([0, *own, r.rows])
    return [[(c[p], c[p + 1]) for c in cuts] for p in range(parts)]


def sample_bounds(runs: Sequence[Run], parts: int, target: np.dtype | None = None) -> Keys:
    """parts - 1 inclusive upper bounds (key columns) that cut the runs' keys into about equal
    ranges, from 8 * parts evenly spaced records of every run."""
    target = target or R.common_dtype([r.dtype for r in runs])
    samples = []
    for r in runs:
        for j in range(1, 8 * parts):
            at = j * r.rows // (8 * parts)
            if at < r.rows:
                samples.append(R.convert(r.read(at, at + 1), target))
    if not samples:
        return tuple(c[:0] for c in R.rec_keys(np.empty(0, target)))
    sample = np.concatenate(samples)
    sample = R.take(sample, K.order(R.rec_keys(sample)))
    idx = [len(sample) * p // parts for p in range(1, parts)]
    return tuple(np.ascontiguousarray(c[idx]) for c in R.rec_keys(sample))
