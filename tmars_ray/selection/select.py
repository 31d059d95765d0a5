"""Global selection: score tables -> one exact, deterministic keep-list.

Semantics
---------
Candidates are rows with status `ok`, a finite selection score, and a uid not seen before (see
duplicates). With `fraction=F`, `k = floor(F * n_candidates)` (F taken as the decimal it prints
as, so 0.29 * 100 keeps 29) and the keep-list is the first k candidates ordered by
(score descending, uid ascending); the summary's `threshold` is the k-th row's score (None when
k == 0). With `threshold=T`, every candidate with score >= T is kept. Set algebra follows:
`((selected ∩ I1 ∩ I2 ...) ∪ U1 ∪ U2 ...)`. The selection score of each method comes from its
registry entry (methods.py).

Duplicate uids (one uid on several rows: within a shard, across shards, across score sources):
rows are ordered deterministically (sources in the order given, files within a source by shard
id / path, rows in file order); a uid's representative is its first `ok` row, or, when none of
its rows is ok, its first row (no candidate). Every other row with that uid is counted in
`duplicate_rows` (uids in `duplicate_uids`) and is never a candidate. NaN, +-inf and null
scores of `ok` rows are counted in `non_finite` and are never candidates (a representative with
such a score is not replaced by a later ok row).

Derived uids (made from shard and key when a sample had no DataComp uid; score tables mark
them in `derived_uid`) match nothing in DataComp: keep.npy is written only when no kept uid
was derived, unless `allow_derived_uids`.

How (memory does not grow with the pool: an external sort by uid, then two cheap passes)
-----------------------------------------------------------------------------------------
scan.py (map: files -> uid-sorted runs of 20-byte records on local temp disk), sortmerge.py
(k-way merge per uid range + dedup -> candidates and a score histogram), rank.py (exact
threshold from histograms, then the keep pass in uid order), keeplist.py (set algebra and the
keep/ files). On one node, threads run the scan and the uid ranges; on a Ray cluster
(engine/selection.py) the same pieces run as tasks over uid-range partitions, and the output is
byte-identical. Temp disk is ~20 bytes per row, under `tmpdir`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tmars_ray import __version__
from tmars_ray.data import schema
from tmars_ray.run import summary as run_summary
from tmars_ray.selection import complete, keeplist, provenance
from tmars_ray.selection import records as R
from tmars_ray.selection import scan as SC
from tmars_ray.selection import sortmerge as SM
from tmars_ray.selection.keys import Keys
from tmars_ray.selection.methods import (
    METHODS,
    Method,
    get,
    text_match_keep,
    text_match_overlap,
    words,
)
from tmars_ray.selection.provenance import ProvenanceMismatch
from tmars_ray.selection.rank import QUANTILES, Cut, KeepPass, low_hist, plan_cut
from tmars_ray.selection.records import key_to_score, score_keys, threshold_key
from tmars_ray.selection.scan import ScanTask, scan
from tmars_ray.selection.sources import ScoreUnit, Source, Sources, plan_groups, resolve_sources

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- the pool of candidates
@dataclass
class Pool:
    """Scan + merge + dedup done: counts, the score histogram, and ways to pass over the
    candidates in uid order. A backend (single node here, Ray in engine/selection.py) builds it."""

    rows: int
    status: Counter
    derived_rows: int
    dedup: dict[str, int]
    hist: np.ndarray
    all_hex: bool
    low: Callable[[list[int]], dict[int, np.ndarray]]  # rank.low_hist over all candidates
    keep: Callable[[Cut], Iterator[np.ndarray]]  # selected records, uid order
    close: Callable[[], None] = lambda: None
    execution: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    @property
    def candidates(self) -> int:
        return int(self.hist.sum())


PoolBuilder = Callable[[list[ScoreUnit], Method, dict[str, Any], str], Pool]


def local_pool(
    units: list[ScoreUnit], method: Method, options: dict[str, Any], work: str, workers: int = 0
) -> Pool:
    """Single node: `workers` threads (pyarrow and numpy release the GIL) scan file groups and
    merge uid ranges; runs and candidates are temp files under `work`."""
    workers = max(1, workers or min(4, os.cpu_count() or 1))
    t0 = time.perf_counter()
    tasks = [
        ScanTask(g, method, options, os.path.join(work, f"task-{i:06d}"))
        for i, g in enumerate(plan_groups(units, SC.RUN_ROWS))
    ]
    with ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(scan, tasks))
    t1 = time.perf_counter()
    status: Counter = Counter()
    for r in results:
        status.update(r.status)
    runs = SM.group_merges([run for r in results for run in r.runs], work)
    ranges = SM.key_ranges(runs, workers)
    dedups = [
        SM.Dedup(R.RecordWriter(os.path.join(work, f"cand-{p:03d}"))) for p in range(len(ranges))
    ]
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda p: SM.merge(runs, dedups[p], ranges[p]), range(len(ranges))))
    for r in runs:
        r.remove()
    cands = [d.close() for d in dedups]
    dedup: Counter = Counter()
    for d in dedups:
        dedup.update(d.stats())

    def chunks() -> Iterator[np.ndarray]:
        for c in cands:
            yield from c.chunks()

    def close() -> None:
        for c in cands:
            c.remove()

    return Pool(
        rows=sum(r.rows for r in results),
        status=status,
        derived_rows=sum(r.derived_rows for r in results),
        dedup=dict(dedup),
        hist=sum((d.hist for d in dedups), np.zeros(1 << 16, np.int64)),
        all_hex=all(R.is_hex_dtype(d) for r in results for d in r.dtypes),
        low=lambda buckets: low_hist(chunks(), buckets),
        keep=lambda cut: KeepPass(cut.key, cut.ties)(chunks()),
        close=close,
        execution={"mode": "single-node", "workers": workers, "uid_ranges": len(ranges)},
        times={"scan_s": t1 - t0, "merge_s": time.perf_counter() - t1},
    )


# ----------------------------------------------------------------------------- the driver
def _check_args(
    m: Method, fraction: float | None, threshold: float | None
) -> tuple[float | None, float | None]:
    if fraction is not None and threshold is not None:
        raise ValueError("give either fraction or threshold, not both")
    if m.rule_threshold is not None:
        if fraction is not None or threshold is not None:
            extra = f"; set {', '.join(m.options)}" if m.options else ""
            raise ValueError(f"{m.name} keeps by its own rule, not by fraction/threshold{extra}")
        return None, m.rule_threshold
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: must be within [0, 1]")
    if fraction is None and threshold is None:
        return m.default_fraction, m.default_threshold
    return fraction, threshold


class _Tally:
    """Passes selected records on as keys, counting them and their derived uids (and keeping
    the derived ones in a temp run when intersect lists may still drop some)."""

    def __init__(self, records: Iterator[np.ndarray], derived_path: str | None):
        self.records, self.rows, self.derived = records, 0, 0
        self._writer = R.RecordWriter(derived_path) if derived_path else None

    def __iter__(self) -> Iterator[Keys]:
        for rec in self.records:
            self.rows += len(rec)
            if R.has_derived(rec.dtype):
                d = rec[R.DERIVED] != 0
                if d.any():
                    self.derived += int(d.sum())
                    if self._writer is not None:
                        self._writer.write(rec[d])
            yield R.rec_keys(rec)

    def derived_run(self) -> R.RecordFile | None:
        return self._writer.close() if self._writer is not None else None


def _derived_kept(tally: _Tally, intersect: Sequence[str], all_hex: bool) -> int:
    """Derived uids that survive the intersect lists (a union adds none: a uid it brings that
    is also selected and derived is already counted)."""
    run = tally.derived_run()
    if run is None or not intersect:
        return tally.derived
    stream: Iterator[Keys] = (R.rec_keys(c) for c in run.chunks())
    for url in intersect:
        other = keeplist.read_keeplist(url)
        stream = keeplist.merge_sorted(
            [stream, keeplist.only_hex(other) if all_hex else other], "and"
        )
    n = sum(len(c[0]) for c in stream)
    run.remove()
    return n


def select(
    sources: Sequence[Source],
    output: str,
    method: str = "tmars",
    fraction: float | None = None,
    threshold: float | None = None,
    intersect: Sequence[str] = (),
    union: Sequence[str] = (),
    text_match_threshold: float = 0.5,
    allow_derived_uids: bool = False,
    extra: dict[str, Any] | None = None,
    tmpdir: str | None = None,
    workers: int | None = None,
    pool_builder: PoolBuilder | None = None,
    threshold_from: str | None = None,
    allow_mismatched_scores: bool = False,
) -> dict[str, Any]:
    """Select over the union of `sources` (run folders, loaded RunStates, or parquet score
    tables; a uid's first ok row wins, in source order) and publish `<output>/keep/`
    (keep.parquet, keep.npy when every kept uid is a DataComp uid, summary.json last).
    Returns the summary.

    `fraction` / `threshold`: at most one; neither means the method's default. `extra` is
    merged into the summary (models, config, versions, times...). `pool_builder` runs scan and
    merge elsewhere (a Ray cluster); by default `workers` threads on this node (up to 4, one
    per core) do, and the result does not depend on it. Temp files go under `tmpdir`.

    Every run source after the first, `threshold_from` (where `threshold` came from) and the
    intersect/union keep-lists must have been scored like the first run source (provenance.py):
    a mismatch raises ProvenanceMismatch unless `allow_mismatched_scores`."""
    t0 = time.perf_counter()
    m = get(method)
    fraction, threshold = _check_args(m, fraction, threshold)
    if not sources:
        raise ValueError("no score sources given")
    _check_extra(extra or {})
    options = {"text_match_threshold": text_match_threshold}
    # keep-lists to combine are checked now, before this selection unseals its own keep/
    for url in (*intersect, *union):
        keeplist.check_published(url, keeplist.resolve_keeplist(url)[1])

    srcs = resolve_sources(list(sources))
    for state in srcs.runs:  # read only what each run's own records list, of its own input
        complete.check_own(state)
    coverage = complete.completeness(srcs.runs, len(srcs.names) - len(srcs.runs))
    prov = _provenance(srcs, threshold_from, intersect, union, allow_mismatched_scores)
    t_resolve = time.perf_counter() - t0
    work = tempfile.mkdtemp(prefix="tmars-select-", dir=tmpdir)
    build = pool_builder or (lambda u, mm, o, w: local_pool(u, mm, o, w, workers or 0))
    try:
        pool = build(srcs.units, m, options, work)
        try:
            t = time.perf_counter()
            cut = plan_cut(pool.hist, fraction, threshold, pool.low)
            t_threshold = time.perf_counter() - t

            # keep pass (+ set algebra), streamed into the keep-list writer
            t = time.perf_counter()
            tally = _Tally(
                pool.keep(cut),
                os.path.join(work, "derived-kept.bin") if pool.derived_rows and intersect else None,
            )
            stream: Iterator[Keys] = iter(tally)
            for url in intersect:
                other = keeplist.read_keeplist(url)
                if pool.all_hex:  # a non-DataComp uid cannot be in a hex pool's selection
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
                derived_kept = _derived_kept(tally, intersect, pool.all_hex)
            except BaseException:
                writer.abort()
                raise
            reason = None
            if derived_kept and not allow_derived_uids:
                reason = (
                    f"{derived_kept} kept uid(s) were derived from (shard, key) because the "
                    "samples had no DataComp uid; they match nothing in DataComp, so keep.npy "
                    "was not written (keep.parquet was; --allow-derived-uids writes it anyway)"
                )
                log.warning("keep.npy not written: %s", reason)
            written = writer.close(npy_skip_reason=reason)
            t_keep = time.perf_counter() - t
        finally:
            pool.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    times = {"resolve_s": t_resolve, **pool.times, "threshold_s": t_threshold, "keep_s": t_keep}
    summary = _summary(
        m, srcs, pool, cut, fraction, threshold, written, derived_kept, tally.rows, options
    )
    summary["provenance"] = prov
    summary.update(coverage)
    if coverage["complete"] is False:
        summary["notes"].append(coverage["completeness"]["text"])
        log.warning("%s", coverage["completeness"]["text"])
    if prov["mismatches"]:
        summary["notes"].append(
            "--allow-mismatched-scores: used with scores made under other settings ("
            + "; ".join(
                f"{m['role']} {m['source']}: {', '.join(m['fields'])}" for m in prov["mismatches"]
            )
            + ")"
        )
    summary["set_algebra"] = {
        "intersect": list(intersect),
        "union": list(union),
        "rule": "((selected & intersect...) | union...)",
    }
    summary["times"] = {
        **{k: round(v, 3) for k, v in times.items()},
        "select_s": round(time.perf_counter() - t0, 3),
    }
    _merge_extra(summary, extra or {})
    keeplist.write_summary(output, summary)
    return summary


def _provenance(
    srcs: Sources,
    threshold_from: str | None,
    intersect: Sequence[str],
    union: Sequence[str],
    allow: bool,
) -> dict[str, Any]:
    """The selection's scores (first run source) against every other input's (see
    provenance.py); the summary's `provenance` record."""
    own, own_name = None, "these scores"
    others: list[tuple[str, str, dict[str, Any] | None, str]] = []
    for i, state in enumerate(srcs.runs):
        fields, _ = provenance.run_fields(state)
        if i == 0:
            own, own_name = fields, state.url
        else:
            others.append(("score source", state.url, fields, "that run records no fingerprint"))
    refs = [("--threshold-from", threshold_from)] if threshold_from else []
    refs += [("--intersect", u) for u in intersect] + [("--union", u) for u in union]
    for role, url in refs:
        fields, why = provenance.keep_fields(url)
        others.append((role, url, fields, why))
    return provenance.check(own, own_name, others, allow)


def _uids_kind(pool: Pool) -> str:
    if not pool.all_hex:
        return "string"
    # derived uids look like DataComp ones (32 hex digits) but are not: never claim them
    return "hex-with-derived" if pool.derived_rows else "datacomp-hex"


def _summary(
    m: Method,
    srcs: Sources,
    pool: Pool,
    cut: Cut,
    fraction: float | None,
    threshold: float | None,
    written: dict[str, Any],
    derived_kept: int,
    selected: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    n = pool.candidates
    if fraction is not None:
        thr_value = key_to_score(cut.key) if cut.key is not None else None
    else:
        thr_value = float(threshold)
    notes = [m.note] if m.note else []
    if srcs.ignored_partial_count:
        notes.append(
            f"{srcs.ignored_partial_count} score file(s) without a completion record ignored"
        )
    if written["npy_skipped_reason"]:
        notes.append(f"keep.npy not written: {written['npy_skipped_reason']}")
    return {
        "method": m.name,
        "score": m.score,
        "fraction": fraction,
        "threshold": thr_value,
        "threshold_rule": "score >= threshold"
        + (", ties at the threshold kept by uid ascending up to k" if fraction is not None else ""),
        "method_options": {k: options[k] for k in m.options},
        "text_match_threshold": options["text_match_threshold"] if m.name == "text-match" else None,
        "counts": {
            "input": pool.rows,
            "status": dict(sorted(pool.status.items())),
            "ok": pool.status.get(schema.OK, 0),
            **{k: pool.dedup.get(k, 0) for k in ("duplicate_rows", "duplicate_uids", "non_finite")},
            "candidates": n,
            "selected": selected,
            "kept": written["rows"],
            "kept_fraction": written["rows"] / n if n else None,
            "ties_at_threshold": cut.ties_total,
            "ties_at_threshold_kept": cut.ties,
            "derived_uids": pool.derived_rows,
            "derived_uids_kept": derived_kept,
            "ignored_partial_files": srcs.ignored_partial_count,
        },
        "quantiles": {str(q): key_to_score(k) for q, k in cut.quantile_keys.items()}
        if cut.quantile_keys
        else None,
        "sources": srcs.names,
        "score_files": sum(len(u.urls) for u in srcs.units),
        "shards": srcs.shards,
        "shard_status": dict(sorted(srcs.shard_status.items())),
        "scoring_fingerprints": dict(sorted(srcs.fingerprints.items())),
        "ignored_partial_files": srcs.ignored_partial,
        "duplicate_rule": SM.DUPLICATE_RULE,
        "uids": _uids_kind(pool),
        "keep": {
            "parquet": written["parquet"],
            "npy": written["npy"],
            "npy_skipped_reason": written["npy_skipped_reason"],
            "files": written["files"],
        },
        "execution": pool.execution,
        "notes": notes,
        "versions": {"tmars-ray": __version__, "pyarrow": pa.__version__, "numpy": np.__version__},
    }


# Summary fields that `extra` may extend (dicts merge, notes append); the rest are the
# selection's own and may not be overwritten.
_EXTENSIBLE = ("times", "versions", "notes")
_OWN_FIELDS = (
    "method",
    "score",
    "fraction",
    "threshold",
    "threshold_rule",
    "method_options",
    "text_match_threshold",
    "counts",
    "quantiles",
    "set_algebra",
    "sources",
    "score_files",
    "shards",
    "shard_status",
    "scoring_fingerprints",
    "provenance",
    "complete",
    "missing_shards",
    "completeness",
    "ignored_partial_files",
    "duplicate_rule",
    "uids",
    "keep",
    "execution",
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
    folder), for re-filtering a new crawl comparably. The keep/ it seals is verified first.
    Raises when it has none (k == 0) or, given `method`, when it was made by another method."""
    summary = run_summary.verify_keep(url)
    if method is not None and summary.get("method") != method:
        raise ValueError(
            f"{url}: threshold was fitted with method {summary.get('method')!r}, not {method!r}"
        )
    if summary.get("threshold") is None:
        raise ValueError(f"{url}: that selection kept nothing, so it has no threshold to reuse")
    return float(summary["threshold"])


def select_config(
    cfg: Any,
    sources: Sequence[Source],
    output: str,
    extra: dict[str, Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """`select` driven by a Config (method, fraction/threshold, threshold_from, set algebra,
    allow_derived_uids): the one place where options turn into a selection. `kw` goes to
    `select` (e.g. a `pool_builder` for a cluster)."""
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
        allow_derived_uids=bool(getattr(cfg, "allow_derived_uids", False)),
        extra={"threshold_from": cfg.threshold_from, **(extra or {})},
        threshold_from=cfg.threshold_from,
        allow_mismatched_scores=bool(getattr(cfg, "allow_mismatched_scores", False)),
        **kw,
    )


__all__ = [
    "METHODS",
    "QUANTILES",
    "Method",
    "Pool",
    "ProvenanceMismatch",
    "key_to_score",
    "local_pool",
    "score_keys",
    "select",
    "select_config",
    "text_match_keep",
    "text_match_overlap",
    "threshold_from_summary",
    "threshold_key",
    "words",
]
