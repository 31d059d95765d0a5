"""Selection benchmark: streaming exact selection vs the plain in-memory way, and on a cluster.

    python -m tmars_ray.devtools.bench_select --rows 1M,4M,16M,64M
    python -m tmars_ray.devtools.bench_select --rows 256M --skip-memory      # 256M rows, 1 node
    python -m tmars_ray.devtools.bench_select --rows 16M --cluster local      # + a local 2-node
    python -m tmars_ray.devtools.bench_select --rows 256M --cluster ADDRESS --skip-stream

Generates synthetic score tables under build/bench/ (file by file, so generation memory is
bounded; reused when already there), then runs, each in its own subprocess so that wall time
and peak RSS (VmHWM of that child, see `vm_hwm_mb`; CPU time from os.wait4) are its own:
- `stream`: tmars_ray.selection.select.select (exact, bounded memory);
- `cluster` (with --cluster ADDRESS, or `local` for a 2-node cluster started here with
  cluster/local/start.sh and stopped after): the same selection as Ray tasks over uid-range
  partitions; peak RSS is the driver's, the task workers' peak is reported beside it, and the
  keep-list is checked byte-identical to the stream's;
- `memory`: read uid/status/score of the whole pool into memory, numpy sort the scores for the
  threshold, keep score >= it, sort the kept uids (what DataComp's baseline script does, with
  vectorised uid conversion instead of a Python loop; ties at the threshold are all kept).
Prints a markdown table. Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import binascii
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tmars_ray.data import schema

FAILURES = (schema.DECODE_ERROR, schema.NO_CAPTION, schema.TOO_LARGE)


def parse_rows(text: str) -> list[int]:
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(float(part[:-1]) * mult[part[-1]]) if part[-1] in mult else int(part))
    return out


def generate(folder: str, rows: int, rows_per_file: int, seed: int = 0) -> str:
    """Synthetic pool of `rows` score rows in files of `rows_per_file` (skipped if present)."""
    marker = os.path.join(folder, "DONE.json")
    params = {"rows": rows, "rows_per_file": rows_per_file, "seed": seed}
    if os.path.exists(marker) and json.load(open(marker)) == params:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    sch = schema.table_schema()
    for i, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        text = binascii.hexlify(rng.integers(0, 256, n * 16, dtype=np.uint8).tobytes())
        uid = pa.Array.from_buffers(
            pa.string(),
            n,
            [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * 32), pa.py_buffer(text)],
        )
        failed = rng.random(n) < 0.01
        status = np.where(failed, rng.choice(np.array(FAILURES, dtype=object), n), schema.OK)
        clip = rng.normal(0.28, 0.05, n).astype(np.float32)
        has_text = rng.random(n) < 0.4
        tmars = np.where(has_text, clip - np.abs(rng.normal(0, 0.04, n)), clip).astype(np.float32)
        clip[failed] = np.nan
        tmars[failed] = np.nan
        table = pa.table(
            {
                "uid": uid,
                "shard": pa.array([f"shard-{i:05d}.tar"] * n),
                "key": pc.cast(pa.array(np.arange(start, start + n)), pa.string()),
                "status": pa.array(status.tolist(), pa.string()),
                "width": pa.array(np.full(n, 512, np.int32)),
                "height": pa.array(np.full(n, 384, np.int32)),
                "n_text_boxes": pa.array(has_text.astype(np.int32)),
                "text_area": pa.array(np.where(has_text, 0.05, 0.0).astype(np.float32)),
                "boxes": pa.nulls(n, sch.field("boxes").type),
                "clip_score": pa.array(clip, mask=failed),
                "tmars_score": pa.array(tmars, mask=failed),
                "derived_uid": pa.array(np.zeros(n, bool)),
            },
            schema=sch,
        )
        pq.write_table(table, os.path.join(folder, f"part-{i:05d}.parquet"))
        del table, uid, text
    json.dump(params, open(marker, "w"))
    return folder


# ---------------------------------------------------------------------- the measured children
def child_stream(src: str, out: str, fraction: float) -> dict[str, Any]:
    from tmars_ray.selection.select import select

    s = select([src], out, method="tmars", fraction=fraction)
    return {"kept": s["counts"]["kept"], "threshold": s["threshold"], "times": s["times"]}


def child_cluster(src: str, out: str, fraction: float) -> dict[str, Any]:
    from tmars_ray.engine.selection import ClusterPoolBuilder
    from tmars_ray.selection.select import select

    builder = ClusterPoolBuilder("auto")
    s = select([src], out, method="tmars", fraction=fraction, pool_builder=builder)
    return {
        "kept": s["counts"]["kept"],
        "threshold": s["threshold"],
        "times": s["times"],
        "execution": s["execution"],
        "driver": builder.driver,
        "files": s["keep"]["files"],
    }


def child_ray_floor(src: str, out: str, fraction: float) -> dict[str, Any]:
    """The driver's floor: the selection's imports and `ray.init` on the cluster, no work."""
    from tmars_ray.engine.selection import ClusterPoolBuilder

    ClusterPoolBuilder("auto").connect()
    return {}


def child_memory(src: str, out: str, fraction: float) -> dict[str, Any]:
    files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".parquet"))
    table = pq.read_table(files, columns=["uid", "status", "tmars_score"])
    table = table.filter(
        pc.and_(pc.equal(table["status"], schema.OK), pc.is_finite(table["tmars_score"]))
    )
    scores = table["tmars_score"].to_numpy()
    n = len(scores)
    k = int(fraction * n)
    threshold = float(np.sort(scores)[n - k]) if k else None
    kept = table["uid"].filter(pa.array(scores >= threshold)) if k else table["uid"].slice(0, 0)
    kept = kept.take(pc.sort_indices(kept))
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.table({"uid": kept}), os.path.join(out, "keep.parquet"))
    raw = binascii.unhexlify(
        b"".join(c.buffers()[2].to_pybytes()[: 32 * len(c)] for c in kept.chunks)
        if kept.num_chunks
        else b""
    )
    np.save(os.path.join(out, "keep.npy"), np.frombuffer(raw, np.dtype(">u8,>u8")).astype("u8,u8"))
    return {"kept": len(kept), "threshold": threshold}


def vm_hwm_mb() -> float:
    """This process's own peak RSS (VmHWM). Not rusage's ru_maxrss: through vfork + exec a
    child's ru_maxrss starts at its parent's RSS (the parent generated the pools: hundreds
    of MB), so a lean child would read as big as the benchmark's parent."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(
    kind: str, src: str, out: str, fraction: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "tmars_ray.devtools.bench_select",
        "--child",
        kind,
        "--src",
        src,
        "--out",
        out,
        "--fraction",
        str(fraction),
    ]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{kind} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    rusage_mb = usage.ru_maxrss / 1024
    peak_mb = result.pop("vm_hwm_mb")
    keep = os.path.join(out, "keep", "summary.json")
    if os.path.exists(keep):
        result["files"] = json.load(open(keep))["keep"]["files"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": peak_mb,
        "rusage_maxrss_mb": rusage_mb,
        **result,
    }


class LocalCluster:
    """A 2-node Ray cluster on this machine (cluster/local scripts), for --cluster local."""

    def __init__(self, store_gb: float, cpus: int):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="tmb-", dir="/tmp")
        self.repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        store = str(int(store_gb * 1024**3))
        self.env = {
            **os.environ,
            "TMARS_CLUSTER_DIR": self.dir,
            "RAY": os.path.join(os.path.dirname(sys.executable), "ray"),
            "HEAD_CPUS": str(cpus),
            "WORKER_CPUS": str(cpus),
            "HEAD_OBJECT_STORE": store,
            "WORKER_OBJECT_STORE": store,
            "WORKER_RESOURCES": "{}",
        }

    def _script(self, name: str) -> None:
        path = os.path.join(self.repo, "cluster", "local", name)
        subprocess.run(["bash", path, "--dir", self.dir], env=self.env, check=True)

    def __enter__(self) -> dict[str, str]:
        self._script("start.sh")
        client = dict(os.environ)
        for line in open(os.path.join(self.dir, "cluster.env")):
            line = line.removeprefix("export ").strip()
            if line.startswith("RAY_") and "=" in line:
                k, v = line.split("=", 1)
                client[k] = v
        return client

    def __exit__(self, *exc: object) -> None:
        self._script("stop.sh")
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default="1M,4M,16M,64M", help="pool sizes, e.g. 1M,4M,16M,64M")
    ap.add_argument("--rows-per-file", default="1M")
    ap.add_argument("--dir", default=os.path.join("build", "bench"))
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--skip-memory", action="store_true", help="do not run the in-memory baseline")
    ap.add_argument("--skip-stream", action="store_true", help="do not run the single-node path")
    ap.add_argument(
        "--cluster",
        help="also select on a Ray cluster: its address, or `local` to start a 2-node cluster",
    )
    ap.add_argument("--cluster-cpus", type=int, default=1, help="CPUs per local-cluster node")
    ap.add_argument("--cluster-store-gb", type=float, default=2.0, help="object store per node")
    ap.add_argument("--partitions", type=int, default=0, help="cluster partitions (0: auto)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--generate-only", action="store_true", help="only write the synthetic pools")
    ap.add_argument(
        "--child", choices=["stream", "memory", "cluster", "ray-floor"], help=argparse.SUPPRESS
    )
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        fn = {
            "stream": child_stream,
            "memory": child_memory,
            "cluster": child_cluster,
            "ray-floor": child_ray_floor,
        }
        result = fn[args.child](args.src, args.out, args.fraction)
        print(json.dumps({**result, "vm_hwm_mb": vm_hwm_mb()}))
        return
    from contextlib import nullcontext

    if args.cluster == "local":
        cluster = LocalCluster(args.cluster_store_gb, args.cluster_cpus)
    else:
        cluster = nullcontext({**os.environ, "RAY_ADDRESS": args.cluster} if args.cluster else None)
    with cluster as cluster_env:
        if cluster_env is not None and args.partitions:
            cluster_env["TMARS_SELECT_PARTITIONS"] = str(args.partitions)
        results = run_all(args, cluster_env)
    report(args, results)


def run_all(args: argparse.Namespace, cluster_env: dict[str, str] | None) -> list[dict]:

    per_file = parse_rows(args.rows_per_file)[0]
    results = []
    for rows in parse_rows(args.rows):
        t = time.perf_counter()
        src = generate(os.path.join(args.dir, f"pool-{rows}"), rows, per_file)
        gen_s = time.perf_counter() - t
        if args.generate_only:
            print(f"{src}: {rows:,} rows ready ({gen_s:.0f} s)", file=sys.stderr)
            continue
        row: dict[str, Any] = {"rows": rows, "gen_s": gen_s, "load": os.getloadavg()}
        if not args.skip_stream:
            row["stream"] = measure(
                "stream", src, os.path.join(args.dir, "out-stream"), args.fraction
            )
        if not args.skip_memory:
            row["memory"] = measure(
                "memory", src, os.path.join(args.dir, "out-memory"), args.fraction
            )
        if cluster_env is not None:
            floor = measure("ray-floor", src, os.path.join(args.dir, "out-floor"), 0, cluster_env)
            c = measure(
                "cluster", src, os.path.join(args.dir, "out-cluster"), args.fraction, cluster_env
            )
            if "stream" in row:
                c["identical_to_stream"] = c["files"] == row["stream"].get("files")
            c["ray_floor_rss_mb"] = floor["peak_rss_mb"]
            row["cluster"] = c
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return results


def report(args: argparse.Namespace, results: list[dict]) -> None:
    per_file = parse_rows(args.rows_per_file)[0]

    print(
        f"\nselection benchmark: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
        f"{platform.machine()}, python {platform.python_version()}, files of {per_file:,} rows, "
        f"method tmars, fraction {args.fraction}\n"
    )
    print(
        f"load average before/after: {results[0]['load'] if results else '-'} / {os.getloadavg()}\n"
    )
    modes = [m for m in ("stream", "memory", "cluster") if any(m in r for r in results)]
    head = ["rows"]
    for m in modes:
        head += [f"{m} wall s", f"{m} CPU s", f"{m} rows/s", f"{m} peak RSS MB"]
    if "cluster" in modes:
        head += [
            "cluster driver floor MB (ray.init)",
            "cluster task peak RSS MB",
            "cluster partitions",
            "cluster == stream",
        ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for r in results:
        cells = [f"{r['rows']:,}"]
        for m in modes:
            x = r.get(m)
            cells += (
                [
                    f"{x['wall_s']:.1f}",
                    f"{x['cpu_s']:.1f}",
                    f"{r['rows'] / x['wall_s']:,.0f}",
                    f"{x['peak_rss_mb']:.0f}",
                ]
                if x
                else ["-"] * 4
            )
        if "cluster" in modes:
            c = r.get("cluster") or {}
            ex = c.get("execution", {})
            cells += [
                f"{c['ray_floor_rss_mb']:.0f}" if c else "-",
                str(ex.get("task_peak_rss_mb", "-")),
                str(ex.get("partitions", "-")),
                {True: "byte-identical", False: "DIFFERENT"}.get(c.get("identical_to_stream"), "-"),
            ]
        print("| " + " | ".join(cells) + " |")
    print(
        "\n(cluster: peak RSS is the driver's, its floor that of a driver that only imports and "
        "connects; CPU s is the driver's only - the tasks' CPU is spent in Ray workers)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
