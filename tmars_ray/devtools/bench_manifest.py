"""Run-state benchmark (`make bench-scale`): `RunState.load` plus the "done?" answer for a
1.28M-shard run (12.8B samples at 10k per shard), on simulated manifest segments.

    python -m tmars_ray.devtools.bench_manifest [--shards 1280000] [--segment-records 2000]

Segments are written as the driver writes them (one record per shard, `--segment-records` per
segment: 640 segments, as a run that never compacted leaves them; `--compacted`: one segment,
what compaction leaves). Each record looks like a real one: a shard URL, a shard id with the
full SHA-256, one part path, status counts, identity (size, ETag). The measurement runs in a
fresh process: load the manifest, then answer "done?" for every listed shard (as resume does:
the listing's identities against the records); prints wall and CPU seconds and the peak RSS
(the whole process: imports and the listing's identities included) as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

POOL = "s3://crawl/pool"
FINGERPRINT = "0123456789abcdef"


def _etag(i: int) -> str:
    return f'etag:"{hashlib.md5(str(i).encode()).hexdigest()}"'


def _size(i: int) -> int:
    return 400_000_000 + i % 1000


def write_segments(run: Path, shards: int, per_segment: int) -> int:
    """Simulated segments under run/manifest; returns how many were written."""
    import pyarrow.parquet as pq

    from tmars_ray.run import manifest
    from tmars_ray.run.manifest import ShardRecord

    folder = run / "manifest"
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for start in range(0, shards, per_segment):
        records = []
        for i in range(start, min(shards, start + per_segment)):
            url = f"{POOL}/{i:08d}.tar"
            sid = manifest.shard_id_for(url, POOL)
            records.append(
                ShardRecord(
                    shard=url,
                    shard_id=sid,
                    parts=[f"scores/{sid}/part-{uuid.UUID(int=i).hex}.parquet"],
                    rows=10_000,
                    fingerprint=FINGERPRINT,
                    # counts differ per shard, as in a real run (no two dicts alike)
                    status_counts={"ok": 9_900 + i % 100, "decode_error": 100 - i % 100},
                    shard_size=_size(i),
                    shard_version=_etag(i),
                    scored_at=1_796_000_000_000_000_000 + i,
                )
            )
        buf = io.BytesIO()
        pq.write_table(manifest._to_table(records), buf, compression="zstd")
        (folder / f"seg-{n + 1:020d}-00000000.parquet").write_bytes(buf.getvalue())
        n += 1
    return n


def _peak_mb() -> int:
    """This process's peak RSS (VmHWM: getrusage's maxrss would carry over the parent's peak
    across exec)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024)


def measure(run: str, shards: int) -> dict:
    """In this (fresh) process: the listing's identities (untimed: that is the listing's
    cost), then load + done? timed; peak RSS of the whole process."""
    from tmars_ray.run.manifest import RunState

    identities = {f"{POOL}/{i:08d}.tar": (_size(i), _etag(i)) for i in range(shards)}
    listing_mb = _peak_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    state = RunState.load(run)
    t1 = time.perf_counter()
    done = state.done(FINGERPRINT, identities)
    todo = [u for u in identities if u not in done]
    t2, c2 = time.perf_counter(), time.process_time()
    peak_mb = _peak_mb()
    return {
        "records": len(state),
        "segments": len(state.segments),
        "done": len(done),
        "todo": len(todo),
        "load_s": round(t1 - t0, 2),
        "done_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "cpu_s": round(c2 - c0, 2),  # all threads: what a busy shared machine inflates less
        "listing_rss_mb": listing_mb,  # the identities alone (the listing's, not the state's)
        "peak_rss_mb": peak_mb,
        "state_rss_mb": peak_mb - listing_mb,  # what loading and "done?" added
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1_280_000)
    ap.add_argument("--segment-records", type=int, default=2000)
    ap.add_argument("--compacted", action="store_true", help="one segment (after compaction)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # the child: a run folder to load
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.shards)))
        return
    per = args.shards if args.compacted else args.segment_records
    with tempfile.TemporaryDirectory(prefix="tmars-bench-manifest-") as tmp:
        t0 = time.perf_counter()
        segments = write_segments(Path(tmp) / "run", args.shards, per)
        written = round(time.perf_counter() - t0, 1)
        cmd = [sys.executable, "-m", "tmars_ray.devtools.bench_manifest", "--measure",
               str(Path(tmp) / "run"), "--shards", str(args.shards)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    result.update(shards=args.shards, segments_written=segments, write_s=written)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
