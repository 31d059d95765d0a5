"""Selection on a Ray cluster: the same pure pieces as the single-node path, run as tasks over
uid-range partitions, with a byte-identical keep-list.

    scan tasks      one per group of score files (~RUN_ROWS rows): read, build records, sort
                    by uid, cut every run at the partition bounds -> one object per partition
    merge tasks     one per partition: stable k-way merge of that partition's slices (in scan
                    order, so the first row of a uid is the same one as on one node) + dedup
                    -> candidates (stay in the object store), a score histogram, counts
    rank tasks      low-16-bit histograms of the wanted buckets, per partition (added up by the
                    driver), then the count at the threshold key per partition (tie quotas)
    keep tasks      per partition, the selected records in uid order; the driver streams them
                    in partition order into the same set algebra and keep-list writer

Partitions are uid ranges: for DataComp uids (uniform 128-bit hashes) the top bits of the uid
cut them evenly; when a sample of uids shows other strings, bounds come from that sample. The
driver holds histograms, counts and object references only; one partition's selected records
at a time pass through it. Each task's memory is bounded by the scan group size (RUN_ROWS, or
one shard when a shard is bigger) or the partition size (PARTITION_ROWS); records live in the
object store between the phases (~20 bytes per row over the cluster; Ray spills to disk).

Scale: the driver holds one reference per (scan task, partition): S x P objects, e.g. 256 x 64
for 256M rows. At billions of rows raise TMARS_SELECT_RUN_ROWS (fewer, larger scan tasks) so
that S x P stays in the hundreds of thousands.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tmars_ray.run import storage
from tmars_ray.selection import keys as K
from tmars_ray.selection import rank
from tmars_ray.selection import records as R
from tmars_ray.selection import scan as SC
from tmars_ray.selection import select as S
from tmars_ray.selection import sortmerge as SM
from tmars_ray.selection.methods import Method
from tmars_ray.selection.sources import ScoreUnit, plan_groups

log = logging.getLogger(__name__)

PARTITION_ROWS = 1 << 22  # rows per uid-range partition, at most (~80 MB of records)
MIN_PARTITION_ROWS = 1 << 18  # below this, more partitions than CPUs gain nothing
KEEP_WINDOW = 4  # keep tasks in flight ahead of the one the driver is writing
SAMPLE_FILES = 16  # files whose first uids decide between hex and sampled bounds
SAMPLE_ROWS = 4096


def cluster_address(cfg_address: str | None = None) -> str | None:
    """The Ray cluster to select on, or None for this node: a given address (config or
    RAY_ADDRESS; job drivers get RAY_ADDRESS from Ray), or a Ray already initialised here on
    more than one node. A local single-node Ray gains nothing over threads."""
    addr = cfg_address or os.environ.get("RAY_ADDRESS")
    if addr and addr != "local":
        return addr
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) > 1:
            return "auto"
    return None


def select_config(
    cfg: Any,
    sources: list[Any],
    output: str,
    extra: dict[str, Any] | None = None,
    distributed: bool | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """`selection.select.select_config`, on the cluster when there is one (see
    `cluster_address`) or when `distributed` says so."""
    addr = cluster_address(getattr(cfg, "ray_address", None))
    if distributed is None:
        distributed = addr is not None
    if distributed:
        kw["pool_builder"] = ClusterPoolBuilder(addr)
    return S.select_config(cfg, sources, output, extra, **kw)


# ------------------------------------------------------------------------------ the tasks
def _peak_rss_mb() -> float:
    """This worker process's peak RSS so far (workers are reused: a bound over its tasks)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scan_task(task: SC.ScanTask, bounds: K.Keys | None) -> tuple:
    r = SC.scan_partitioned(task, bounds)
    stats = {"rows": r.rows, "status": r.status, "derived": r.derived_rows, "dtypes": r.dtypes}
    return (*r.runs, {**stats, "peak_rss_mb": _peak_rss_mb()})


def _merge_task(*slice_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
    runs: list[Any] = [R.ArrayRun(a) for lst in slice_lists for a in lst]
    while len(runs) > SM.MERGE_FANIN:  # bounded fan-in, order kept (as on one node)
        merged = []
        for g in range(0, len(runs), SM.MERGE_FANIN):
            sink = R.RecordSink()
            # merge hands out chunks of a reused buffer: keep copies, not views
            SM.merge(runs[g : g + SM.MERGE_FANIN], lambda rec, sink=sink: sink.write(rec.copy()))
            merged.append(sink.close())
        runs = merged
    dedup = SM.Dedup(R.RecordSink())
    SM.merge(runs, dedup)
    return dedup.close().rec, dedup.hist, {**dedup.stats(), "peak_rss_mb": _peak_rss_mb()}


def _low_task(cands: np.ndarray, buckets: list[int]) -> dict[int, np.ndarray]:
    return rank.low_hist(R.ArrayRun(cands).chunks(), buckets)


def _count_task(cands: np.ndarray, key: int) -> int:
    return rank.count_at(R.ArrayRun(cands).chunks(), key)


def _keep_task(cands: np.ndarray, key: int, ties: int | None) -> np.ndarray:
    parts = list(rank.KeepPass(key, ties)(R.ArrayRun(cands).chunks()))
    return np.concatenate(parts) if parts else cands[:0].copy()


@cache
def _remote() -> SimpleNamespace:
    import ray

    return SimpleNamespace(
        scan=ray.remote(num_cpus=1)(_scan_task),
        merge=ray.remote(num_cpus=1, num_returns=3)(_merge_task),
        low=ray.remote(num_cpus=1)(_low_task),
        count=ray.remote(num_cpus=1)(_count_task),
        keep=ray.remote(num_cpus=1)(_keep_task),
    )


# ------------------------------------------------------------------------- partitioning
def hex_bounds(parts: int) -> K.Keys:
    """Inclusive upper bounds cutting the 128-bit uid space into `parts` equal ranges by its
    top bits (DataComp uids are uniform hashes)."""
    top = [((j + 1) << 64) // parts - 1 for j in range(parts - 1)]
    return (np.array(top, np.uint64), np.full(parts - 1, np.iinfo(np.uint64).max, np.uint64))


def _sample_uids(units: list[ScoreUnit]) -> K.Keys | None:
    """The first uids of a few evenly spaced files (key columns), or None without files."""
    urls = [u.urls[0] for u in units if u.urls]
    if not urls:
        return None
    step = max(1, len(urls) // SAMPLE_FILES)
    chunks = []
    for url in urls[::step][:SAMPLE_FILES]:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows:
                batch = next(pf.iter_batches(batch_size=SAMPLE_ROWS, columns=["uid"]))
                chunks.append(K.encode_uids(batch.column(0)))
    return K.concat(chunks) if chunks else None


def partition_bounds(units: list[ScoreUnit], parts: int) -> K.Keys | None:
    if parts <= 1:
        return None
    sample = _sample_uids(units)
    if sample is None or K.is_hex(sample):
        return hex_bounds(parts)
    sample = K.take(sample, K.order(sample))
    idx = [len(sample[0]) * p // parts for p in range(1, parts)]
    return K.take(sample, idx)


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ------------------------------------------------------------------------------ the pool
class ClusterPoolBuilder:
    """Builds the selection's candidate pool with Ray tasks (see the module doc).
    `partitions` / `run_rows` (0: sized from the pool and the cluster) can also be set with
    TMARS_SELECT_PARTITIONS / TMARS_SELECT_RUN_ROWS (benchmarks, tests)."""

    def __init__(self, address: str | None = None, partitions: int = 0, run_rows: int = 0):
        self.address = address
        self.partitions = partitions or int(os.environ.get("TMARS_SELECT_PARTITIONS", 0))
        self.run_rows = run_rows or int(os.environ.get("TMARS_SELECT_RUN_ROWS", 0))

    def _connect(self) -> None:
        import ray

        if not ray.is_initialized():
            # nothing re-declared: a job's own runtime env stays as it was submitted
            ray.init(address=self.address or "auto", log_to_driver=False)

    def __call__(
        self, units: list[ScoreUnit], method: Method, options: dict[str, Any], work: str
    ) -> S.Pool:
        import ray

        self._connect()
        fn = _remote()
        t0 = time.perf_counter()
        run_rows = self.run_rows or SC.RUN_ROWS
        groups = plan_groups(units, run_rows)
        total = sum(u.rows for u in units)
        parts = self.partitions or max(
            math.ceil(total / PARTITION_ROWS),
            min(_cluster_cpus(), math.ceil(total / MIN_PARTITION_ROWS)),
            1,
        )
        bounds = partition_bounds(units, parts)
        tasks = [SC.ScanTask(g, method, options, run_rows=run_rows) for g in groups]
        scans = [fn.scan.options(num_returns=parts + 1).remote(t, bounds) for t in tasks]
        merges = [fn.merge.remote(*(s[p] for s in scans)) for p in range(parts)]
        stats = [s[parts] for s in scans]
        del scans  # the merge tasks hold what they need; slices go once merged

        rows = derived = 0
        task_rss = 0.0
        status: Counter = Counter()
        dtypes: list[np.dtype] = []
        for ref in stats:
            st = ray.get(ref)
            rows += st["rows"]
            derived += st["derived"]
            status.update(st["status"])
            dtypes.extend(st["dtypes"])
            task_rss = max(task_rss, st["peak_rss_mb"])
        t1 = time.perf_counter()
        cands = [m[0] for m in merges]
        hist = np.zeros(1 << 16, np.int64)
        dedup: Counter = Counter()
        for m in merges:  # one histogram at a time: the driver's memory stays flat
            hist += ray.get(m[1])
            st = ray.get(m[2])
            task_rss = max(task_rss, st.pop("peak_rss_mb"))
            dedup.update(st)
        del merges
        t2 = time.perf_counter()

        def low(buckets: list[int]) -> dict[int, np.ndarray]:
            total_low = {b: np.zeros(1 << 16, np.int64) for b in buckets}
            for ref in [fn.low.remote(c, buckets) for c in cands]:
                for b, h in ray.get(ref).items():
                    total_low[b] += h
            return total_low

        def keep(cut: rank.Cut) -> Iterator[np.ndarray]:
            if cut.key is None:
                return
            quotas: list[int | None] = [None] * len(cands)
            if cut.ties is not None:
                at_key = ray.get([fn.count.remote(c, cut.key) for c in cands])
                quotas = rank.tie_quotas(cut.ties, at_key)
            pending: list[Any] = []
            nxt = 0
            for _ in range(len(cands)):
                while nxt < len(cands) and len(pending) <= KEEP_WINDOW:
                    pending.append(fn.keep.remote(cands[nxt], cut.key, quotas[nxt]))
                    nxt += 1
                ref = pending.pop(0)
                rec = ray.get(ref)
                del ref
                if len(rec):
                    yield rec
                del rec

        def close() -> None:
            cands.clear()

        return S.Pool(
            rows=rows,
            status=status,
            derived_rows=derived,
            dedup=dict(dedup),
            hist=hist,
            all_hex=all(R.is_hex_dtype(d) for d in dtypes),
            low=low,
            keep=keep,
            close=close,
            execution={
                "mode": "ray",
                "partitions": parts,
                "scan_tasks": len(tasks),
                "partition_bounds": "uid top bits"
                if bounds is None or K.is_hex(bounds)
                else "sampled uids",
                "task_peak_rss_mb": round(task_rss, 1),
            },
            times={"scan_s": t1 - t0, "merge_s": t2 - t1},
        )
