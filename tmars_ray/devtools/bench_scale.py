"""Orchestration benchmark (`make bench-scale`): the job's cost per shard with near-zero model
cost - tiny images (under the detector's minimum side, so it skips them) and a tiny CLIP.

    python -m tmars_ray.devtools.bench_scale [--s3] [--write BENCHMARKS.md]

Cases: 2,000 shards x 4 samples (first run, then a rerun of the finished run), 20 x 400; each a
whole `tmars run` command in a fresh process (start-up included), local disk and optionally
the local S3 server from tests/infra. Prints one JSON object per case.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "tests" / "assets" / "tmars-tiny-vit.json"


def tiny_pool(folder: Path, shards: int, samples: int, seed: int = 0) -> None:
    """Shards of 6x6 px JPEGs with captions and DataComp uids."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:08d}.tar", "w") as tar:
            for i in range(samples):
                img = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, "JPEG")
                key = f"{s:05d}{i:04d}"
                meta = json.dumps({"uid": rng.bytes(16).hex()}).encode()
                for ext, data in (
                    ("jpg", buf.getvalue()),
                    ("txt", b"a tiny picture"),
                    ("json", meta),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def tiny_checkpoint(path: Path) -> Path:
    if not path.exists():
        from safetensors.torch import save_file

        from tmars_ray.models.clip import load_model

        try:
            from tmars_ray.models.settings import ClipSpec as Spec
        except ImportError:  # older layout
            from tmars_ray.models.clip import ModelSpec as Spec
        model, *_ = load_model(Spec(str(TINY_MODEL), None, allow_random=True, seed=7))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_cmd(pool: str, out: str, ckpt: Path, env: dict[str, str]) -> float:
    cmd = [
        sys.executable, "-m", "tmars_ray", "run", "--input", pool, "--output", out,
        "--clip-model", str(TINY_MODEL), "--clip-pretrained", str(ckpt), "--device", "cpu",
        "--no-report",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="build/bench-scale")
    parser.add_argument("--s3", action="store_true", help="also run against a local S3 server")
    parser.add_argument("--write", help="append a results table to this markdown file")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    ckpt = tiny_checkpoint(work / "tiny.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMARS_PROGRESS_BARS": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    results = []
    for shards, samples in ((2000, 4), (20, 400)):
        pool = work / f"pool-{shards}x{samples}"
        tiny_pool(pool, shards, samples)
        targets = [("local", str(pool), str(work / f"run-{shards}x{samples}"), env)]
        if args.s3:
            sys.path.insert(0, str(REPO))
            from tests.infra.s3_server import S3Server

            server = S3Server(work / "s3")
            server.start()
            server.create_bucket("bench")
            server.upload_dir(pool, f"s3://bench/pool-{shards}x{samples}")
            s3env = {**env, **server.env()}
            targets.append(
                (
                    "s3",
                    f"s3://bench/pool-{shards}x{samples}",
                    f"s3://bench/run-{shards}x{samples}",
                    s3env,
                )  # fmt: skip
            )
        for where, src, out, e in targets:
            first = run_cmd(src, out, ckpt, e)
            rerun = run_cmd(src, out, ckpt, e) if shards >= 1000 else None
            row = {"case": f"{shards}x{samples}", "storage": where, "first_s": round(first, 1),
                   "rerun_s": None if rerun is None else round(rerun, 1),
                   "ms_per_shard": round(1000 * first / shards, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            results.append(row)
        if args.s3:
            server.stop()
    if args.write:
        with open(args.write, "a") as f:
            f.write(
                f"\n### Orchestration (`make bench-scale`), {date.today()}, "
                f"{os.cpu_count()} cores, {platform.machine()}\n\n"
                "| case | storage | first run (s) | rerun (s) | ms per shard |\n|---|---|---|---|---|\n"
            )
            for r in results:
                f.write(f"| {r['case']} | {r['storage']} | {r['first_s']} | {r['rerun_s'] or '-'}"
                        f" | {r['ms_per_shard']} |\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
