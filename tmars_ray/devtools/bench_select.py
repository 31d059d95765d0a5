"""Selection benchmark (DESIGN 7): streaming exact selection vs the plain in-memory way.

    python -m tmars_ray.devtools.bench_select --rows 1M,4M,16M,64M

Generates synthetic score tables under build/bench/ (file by file, so generation memory is
bounded; reused when already there), then runs, each in its own subprocess so that wall time
and peak RSS (os.wait4 rusage of that child) are its own:
- `stream`: tmars_ray.selection.select.select (exact, bounded memory);
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


def measure(kind: str, src: str, out: str, fraction: float) -> dict[str, Any]:
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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{kind} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        **result,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default="1M,4M,16M,64M", help="pool sizes, e.g. 1M,4M,16M,64M")
    ap.add_argument("--rows-per-file", default="1M")
    ap.add_argument("--dir", default=os.path.join("build", "bench"))
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--skip-memory", action="store_true", help="do not run the in-memory baseline")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--generate-only", action="store_true", help="only write the synthetic pools")
    ap.add_argument("--child", choices=["stream", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        fn = child_stream if args.child == "stream" else child_memory
        print(json.dumps(fn(args.src, args.out, args.fraction)))
        return

    per_file = parse_rows(args.rows_per_file)[0]
    results = []
    for rows in parse_rows(args.rows):
        t = time.perf_counter()
        src = generate(os.path.join(args.dir, f"pool-{rows}"), rows, per_file)
        gen_s = time.perf_counter() - t
        if args.generate_only:
            print(f"{src}: {rows:,} rows ready ({gen_s:.0f} s)", file=sys.stderr)
            continue
        row = {
            "rows": rows,
            "gen_s": gen_s,
            "load": os.getloadavg(),
            "stream": measure("stream", src, os.path.join(args.dir, "out-stream"), args.fraction),
        }
        if not args.skip_memory:
            row["memory"] = measure(
                "memory", src, os.path.join(args.dir, "out-memory"), args.fraction
            )
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print(
        f"\nselection benchmark: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
        f"{platform.machine()}, python {platform.python_version()}, files of {per_file:,} rows, "
        f"method tmars, fraction {args.fraction}\n"
    )
    print(
        f"load average before/after: {results[0]['load'] if results else '-'} / {os.getloadavg()}\n"
    )
    print(
        "| rows | stream wall s | stream CPU s | stream rows/s | stream peak RSS MB | memory wall s "
        "| memory CPU s | memory rows/s | memory peak RSS MB | wall ratio stream/memory | RSS ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s, m = r["stream"], r.get("memory")
        cells = [
            f"{r['rows']:,}",
            f"{s['wall_s']:.1f}",
            f"{s['cpu_s']:.1f}",
            f"{r['rows'] / s['wall_s']:,.0f}",
            f"{s['peak_rss_mb']:.0f}",
        ]
        if m:
            cells += [
                f"{m['wall_s']:.1f}",
                f"{m['cpu_s']:.1f}",
                f"{r['rows'] / m['wall_s']:,.0f}",
                f"{m['peak_rss_mb']:.0f}",
                f"{s['wall_s'] / m['wall_s']:.2f}",
                f"{s['peak_rss_mb'] / m['peak_rss_mb']:.2f}",
            ]
        else:
            cells += ["-"] * 6
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
