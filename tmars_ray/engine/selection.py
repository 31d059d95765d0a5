"""Selection on a Ray cluster: the same pure pieces as the single-node path, run as tasks over
uid-range partitions, with a byte-identical keep-list.

    scan tasks      one per group of score files (~RUN_ROWS rows): read, build records, sort
                    by uid, cut every run at the partition bounds -> one object per partition
    merge tasks     one per partition: stable k-way merge of that partition's slices (in scan
                    order, so the first row of a uid is the same one as on one node) + dedup
                    -> candidates (stay in the object store), a score histogram, counts
    rank tasks      low-16-bit histograms of the wanted buckets, per partition, then the count
                    at the threshold key per partition (tie quotas); add tasks sum the
                    partitions' histograms, so that the driver gets one of each
    keep tasks      per partition, the selected records in uid order (in the object store);
                    a spill task on the driver's node writes them to the driver's temp folder,
                    and the driver reads them back in PASS_ROWS chunks, in partition order,
                    into the same set algebra and keep-list writer

Partitions are uid ranges: for DataComp uids (uniform 128-bit hashes) the top bits of the uid
cut them evenly; when a sample of uids shows other strings, bounds come from that sample. The
driver holds histograms, counts, cut points, file names and object references only: it never
receives a column of scores or a partition's records whole (`ray.get` of records maps
object-store pages into the driver, and they stay counted in its RSS; a plain read of a part
file in fixed chunks does not), and the uid sample for the bounds is read in a task. Each
task's memory is bounded by the scan group size (RUN_ROWS, or one shard when a shard is
bigger) or the partition size (PARTITION_ROWS); records live in the object store between the
phases (~20 bytes per row over the cluster; Ray spills to disk).

Scale: the driver holds one reference per (scan task, partition): S x P objects, e.g. 256 x 64
for 256M rows. At billions of rows raise TMARS_SELECT_RUN_ROWS (fewer, larger scan tasks) so
that S x P stays in the hundreds of thousands.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections import Counter, deque
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
HIST_FANIN = 64  # histograms added up per task
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


def _add_task(*parts: Any) -> Any:
    """The sum of histograms: arrays, or dicts of arrays by bucket (`_low_task`'s)."""
    if isinstance(parts[0], dict):
        return {b: _add_task(*(p[b] for p in parts)) for b in parts[0]}
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


def _low_task(cands: np.ndarray, buckets: list[int]) -> dict[int, np.ndarray]:
    return rank.low_hist(R.ArrayRun(cands).chunks(), buckets)


def _count_task(cands: np.ndarray, key: int) -> int:
    return rank.count_at(R.ArrayRun(cands).chunks(), key)


def _keep_task(cands: np.ndarray, key: int, ties: int | None) -> np.ndarray:
    parts = list(rank.KeepPass(key, ties)(R.ArrayRun(cands).chunks()))
    return np.concatenate(parts) if parts else cands[:0].copy()


def _spill_task(rec: np.ndarray, path: str) -> dict[str, Any]:
    """Runs on the driver's node: writes a partition's selected records to `path` (local temp)
    and returns only where and how many, so that the driver reads them back in bounded chunks
    and never receives (or maps from the object store) a partition's records whole."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rec.tofile(path)
    return {"path": path, "rows": len(rec), "dtype": rec.dtype}


def _read_records(path: str, rows: int, dtype: np.dtype, chunk_rows: int) -> Iterator[np.ndarray]:
    """A keep part file in chunks of `chunk_rows` records (plain reads: no mapped pages)."""
    with open(path, "rb") as f:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            buf = f.read(n * dtype.itemsize)
            if len(buf) != n * dtype.itemsize:
                raise OSError(f"{path}: keep part truncated at record {start}")
            yield np.frombuffer(buf, dtype)


@cache
def _remote() -> SimpleNamespace:
    import ray

    return SimpleNamespace(
        scan=ray.remote(num_cpus=1)(_scan_task),
        merge=ray.remote(num_cpus=1, num_returns=3)(_merge_task),
        bounds=ray.remote(num_cpus=1)(partition_bounds),
        add=ray.remote(num_cpus=1)(_add_task),
        low=ray.remote(num_cpus=1)(_low_task),
        count=ray.remote(num_cpus=1)(_count_task),
        keep=ray.remote(num_cpus=1)(_keep_task),
        spill=ray.remote(num_cpus=0)(_spill_task),  # I/O only; pinned to the driver's node
    )


# ------------------------------------------------------------------------- partitioning
def hex_bounds(parts: int) -> K.Keys:
    """Inclusive upper bounds cutting the 128-bit uid space into `parts` equal ranges by its
    top bits (DataComp uids are uniform hashes)."""
    top = [((j + 1) << 64) // parts - 1 for j in range(parts - 1)]
    return (np.array(top, np.uint64), np.full(parts - 1, np.iinfo(np.uint64).max, np.uint64))


def sample_files(units: list[ScoreUnit]) -> list[str]:
    """A few evenly spaced files (the first of their units) to sample uids from."""
    urls = [u.urls[0] for u in units if u.urls]
    return urls[:: max(1, len(urls) // SAMPLE_FILES)][:SAMPLE_FILES]


def _sample_uids(urls: list[str]) -> K.Keys | None:
    """The first uids of these files (key columns), or None without files."""
    chunks = []
    for url in urls:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows:
                batch = next(pf.iter_batches(batch_size=SAMPLE_ROWS, columns=["uid"]))
                chunks.append(K.encode_uids(batch.column(0)))
    return K.concat(chunks) if chunks else None


def partition_bounds(urls: list[str], parts: int) -> K.Keys | None:
    """Upper bounds of `parts` uid ranges, from the first uids of `urls` (`sample_files`)."""
    if parts <= 1:
        return None
    sample = _sample_uids(urls)
    if sample is None or K.is_hex(sample):
        return hex_bounds(parts)
    sample = K.take(sample, K.order(sample))
    idx = [len(sample[0]) * p // parts for p in range(1, parts)]
    return K.take(sample, idx)


def _arrays(value: Any) -> list[np.ndarray]:
    """The numpy arrays in a task result (nested in dicts, lists, tuples)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _arrays(v)]
    return []


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ------------------------------------------------------------------------------ the pool
class ClusterPoolBuilder:
    """Builds the selection's candidate pool with Ray tasks (see the module doc).
    `partitions` / `run_rows` (0: sized from the pool and the cluster) can also be set with
    TMARS_SELECT_PARTITIONS / TMARS_SELECT_RUN_ROWS (benchmarks, tests)."""

    read_rows = R.PASS_ROWS  # selected records per read of a keep part (the driver's chunk)

    def __init__(self, address: str | None = None, partitions: int = 0, run_rows: int = 0):
        self.address = address
        self.partitions = partitions or int(os.environ.get("TMARS_SELECT_PARTITIONS", 0))
        self.run_rows = run_rows or int(os.environ.get("TMARS_SELECT_RUN_ROWS", 0))
        # what passed through the driver (tests and benchmarks read it): the most bytes of
        # arrays in one ray.get, record rows received by ray.get, the biggest chunk read back
        self.driver = {"max_get_bytes": 0, "records_got": 0, "max_read_rows": 0}

    def _get(self, refs: Any) -> Any:
        """ray.get, counting what the driver receives (see `self.driver`)."""
        import ray

        value = ray.get(refs)
        got = _arrays(value)
        self.driver["max_get_bytes"] = max(self.driver["max_get_bytes"], sum(a.nbytes for a in got))
        self.driver["records_got"] += sum(len(a) for a in got if a.dtype.names)
        return value

    def _total(self, refs: list[Any]) -> Any:
        """The sum of these histograms, added up by tasks (a tree of HIST_FANIN): the driver
        gets one. Histograms are over 100 KB, so Ray hands them over in the object store,
        and every one fetched would stay mapped in the driver's RSS."""
        add = _remote().add
        while len(refs) > 1:
            refs = [add.remote(*refs[i : i + HIST_FANIN]) for i in range(0, len(refs), HIST_FANIN)]
        return self._get(refs[0])

    def connect(self) -> None:
        """Join the cluster (once per process)."""
        import ray

        if not ray.is_initialized():
            # nothing re-declared: a job's own runtime env stays as it was submitted
            ray.init(address=self.address or "auto", log_to_driver=False)

    def __call__(
        self, units: list[ScoreUnit], method: Method, options: dict[str, Any], work: str
    ) -> S.Pool:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.connect()
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
        # in a task: reading even a few uids of a file makes pyarrow buffer (and the process
        # keep) its whole uid column chunk, ~100 MB over the sampled files; the driver gets
        # only the cut points
        bounds = self._get(fn.bounds.remote(sample_files(units), parts)) if parts > 1 else None
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
            st = self._get(ref)
            rows += st["rows"]
            derived += st["derived"]
            status.update(st["status"])
            dtypes.extend(st["dtypes"])
            task_rss = max(task_rss, st["peak_rss_mb"])
        t1 = time.perf_counter()
        cands = [m[0] for m in merges]
        hist = np.array(self._total([m[1] for m in merges]))  # own copy: nothing mapped kept
        dedup: Counter = Counter()
        for m in merges:
            st = self._get(m[2])
            task_rss = max(task_rss, st.pop("peak_rss_mb"))
            dedup.update(st)
        del merges
        t2 = time.perf_counter()

        def low(buckets: list[int]) -> dict[int, np.ndarray]:
            total = self._total([fn.low.remote(c, buckets) for c in cands])
            return {b: np.array(total[b]) for b in buckets}

        folder = os.path.join(work, "keep-parts")
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        spill = fn.spill.options(scheduling_strategy=here)
        pending: deque = deque()

        def keep(cut: rank.Cut) -> Iterator[np.ndarray]:
            if cut.key is None:
                return
            quotas: list[int | None] = [None] * len(cands)
            if cut.ties is not None:
                at_key = self._get([fn.count.remote(c, cut.key) for c in cands])
                quotas = rank.tie_quotas(cut.ties, at_key)
            nxt = 0
            for _ in range(len(cands)):
                # tasks run ahead; the window bounds the parts on disk, not driver memory
                while nxt < len(cands) and len(pending) <= KEEP_WINDOW:
                    rec = fn.keep.remote(cands[nxt], cut.key, quotas[nxt])
                    path = os.path.join(folder, f"keep-{nxt:05d}.bin")
                    pending.append(spill.remote(rec, path))
                    del rec  # the spill task holds it; the records go once written
                    nxt += 1
                part = self._get(pending[0])
                pending.popleft()
                for rec in _read_records(part["path"], part["rows"], part["dtype"], self.read_rows):
                    self.driver["max_read_rows"] = max(self.driver["max_read_rows"], len(rec))
                    yield rec
                os.unlink(part["path"])

        def close() -> None:
            cands.clear()
            if pending:  # a keep pass given up half way: let its tasks finish writing first
                ray.wait(list(pending), num_returns=len(pending))
                pending.clear()
            shutil.rmtree(folder, ignore_errors=True)

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
