"""Exact rank selection over uid-sorted candidates, from histograms (no global sort).

1. The merge counted a 65,536-bucket histogram of the candidates' score keys' top 16 bits.
2. One pass over the candidates counts the low 16 bits inside the buckets that hold the
   wanted ranks (the k-th row and the summary quantiles): that gives the exact uint32 key of
   each (`low_hist`, `resolve`).
3. The keep pass, in uid order: keys above the threshold key, plus the first
   `k - count(above)` rows *at* the threshold key, which in uid order are exactly the ties
   with the smallest uids (`KeepPass`). The output is already sorted and unique.
Partitions (uid ranges) can run steps 2 and 3 apart: low histograms add up, and the ties of
partition p are what is left of k after the ties of partitions before it (`tie_quotas`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from tmars_ray.selection import records as R

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def fraction_k(fraction: float, n: int) -> int:
    """k = floor(F * n), F taken as the decimal it prints as (0.29 * 100 keeps 29)."""
    return math.floor(Decimal(repr(float(fraction))) * n)


def low_hist(chunks: Iterable[np.ndarray], buckets: Sequence[int]) -> dict[int, np.ndarray]:
    """Per wanted top-16-bit bucket, the histogram of the low 16 bits of its score keys."""
    low = {b: np.zeros(1 << 16, np.int64) for b in buckets}
    if not buckets:
        return low
    for rec in chunks:
        skey = rec["skey"]
        top = skey >> 16
        for b in buckets:
            sel = skey[top == b]
            if len(sel):
                low[b] += np.bincount(sel & 0xFFFF, minlength=1 << 16)
    return low


def count_at(chunks: Iterable[np.ndarray], key: int) -> int:
    """Candidates whose score key is exactly `key`."""
    return sum(int(np.count_nonzero(rec["skey"] == key)) for rec in chunks)


@dataclass
class Cut:
    """Where the keep-list is cut: score key, how many rows at that key are kept (None: all),
    how many rows sit at it, and the score key of each summary quantile."""

    key: int | None
    ties: int | None
    ties_total: int | None
    quantile_keys: dict[float, int] | None


def plan_cut(
    hist: np.ndarray,
    fraction: float | None,
    threshold: float | None,
    count_low: Callable[[list[int]], dict[int, np.ndarray]],
) -> Cut:
    """The exact cut, given the top-16-bit histogram of all candidates and `count_low`, which
    runs step 2 over all candidates for the given buckets."""
    n = int(hist.sum())
    q_ranks = [math.floor(q * (n - 1)) for q in QUANTILES] if n else []
    ranks = list(q_ranks)
    k = fraction_k(fraction, n) if fraction is not None else None
    if k:
        ranks.append(n - k)
    cum = np.cumsum(hist)
    bucket = {r: int(np.searchsorted(cum, r, "right")) for r in ranks}
    low = count_low(sorted(set(bucket.values()))) if ranks else {}
    keys = {}
    for r, b in bucket.items():
        before = int(cum[b - 1]) if b else 0
        within = int(np.searchsorted(np.cumsum(low[b]), r - before, "right"))
        keys[r] = (b << 16) | within
    quantiles = {q: keys[r] for q, r in zip(QUANTILES, q_ranks)} if n else None
    if fraction is None:
        return Cut(R.threshold_key(float(threshold)), None, None, quantiles)
    if not k:
        return Cut(None, None, None, quantiles)
    key = keys[n - k]
    b = key >> 16
    above = int(hist[b + 1 :].sum()) + int(low[b][(key & 0xFFFF) + 1 :].sum())
    return Cut(key, k - above, int(low[b][key & 0xFFFF]), quantiles)


def tie_quotas(ties: int | None, at_key: Sequence[int]) -> list[int | None]:
    """Ties kept per partition (uid order): the first `ties` rows at the key overall."""
    if ties is None:
        return [None] * len(at_key)
    out, left = [], ties
    for c in at_key:
        take = min(left, c)
        out.append(take)
        left -= take
    return out


class KeepPass:
    """The keep pass over uid-ordered candidate chunks: keys > key, plus the first `ties` rows
    == key (all rows >= key when ties is None); nothing when key is None. One instance may
    run over several partitions in uid order: the ties left carry over."""

    def __init__(self, key: int | None, ties: int | None):
        self.key, self.left = key, ties

    def __call__(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        if self.key is None:
            return
        key = self.key
        for rec in chunks:
            skey = rec["skey"]
            if self.left is None:
                mask = skey >= key
            else:
                at = skey == key
                keep_at = at & (np.cumsum(at) <= self.left)
                self.left -= int(np.count_nonzero(keep_at))
                mask = (skey > key) | keep_at
            if mask.any():
                yield rec[mask]
