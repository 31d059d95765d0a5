"""GPU benchmark (`make bench-gpu`; one command on a fresh GPU machine, not a test).

Synthesises a DataComp-like pool (JPEG, <= 512 px, ~40% with text), runs the whole scoring job
on the GPU(s) (PP-OCRv5 det on ONNX Runtime's CUDA provider, ViT-B/32 in fp16 - random weights
when pretrained ones cannot be had: same compute), and reports samples/s per GPU, mean GPU
utilisation, per-stage times and host CPU per sample. The last line printed is one JSON object;
with --write the figures are appended to BENCHMARKS.md.

    python -m tmars_ray.devtools.bench_gpu --samples 20000 [--write BENCHMARKS.md]
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
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

from tmars_ray.config import Config


def check_gpu() -> str:
    """The GPU's name, or exit with what is missing (never a silent CPU run)."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench-gpu: torch sees no GPU")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("bench-gpu: onnxruntime has no CUDA provider (install the gpu extra)")
    return torch.cuda.get_device_name(0)


def replicate(base: Path, out: Path, copies: int) -> None:
    """`copies` renamed copies of a base pool's shards (new keys and uids): a large pool
    without rendering every sample."""
    import hashlib

    out.mkdir(parents=True, exist_ok=True)
    shards = sorted(base.glob("*.tar"))
    n = 0
    for c in range(copies):
        for shard in shards:
            with tarfile.open(shard) as src, tarfile.open(out / f"{n:08d}.tar", "w") as dst:
                for m in src.getmembers():
                    data = src.extractfile(m).read()
                    key, ext = m.name.split(".", 1)
                    if ext == "json":
                        meta = json.loads(data)
                        meta["uid"] = hashlib.md5(f"{c}/{meta.get('uid')}".encode()).hexdigest()
                        data = json.dumps(meta).encode()
                    info = tarfile.TarInfo(f"c{c:03d}{key}.{ext}")
                    info.size = len(data)
                    dst.addfile(info, io.BytesIO(data))
            n += 1


class GpuSampler:
    """Mean GPU utilisation from nvidia-smi, sampled every 200 ms while running."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                ).stdout  # fmt: skip
                self.values.append(sum(float(v) for v in out.split()) / max(1, len(out.split())))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.values) / len(self.values), 1) if self.values else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--work", default="build/bench-gpu")
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--clip-pretrained", default="openai")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--clip-batch-size", type=int, default=256)
    ap.add_argument("--write", help="append the figures to this markdown file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TMARS_PROGRESS_BARS", "0")
    gpu = check_gpu()
    import psutil
    import torch

    from tmars_ray.devtools.bench_host import sized_pool
    from tmars_ray.engine import pipeline

    work = Path(args.work)
    base = Path(sized_pool(str(work / "base"), 2000, (256, 512), 0.4))
    pool = work / "pool"
    copies = max(1, round(args.samples / 2000))
    if not (pool / f".copies-{copies}").exists():
        shutil.rmtree(pool, ignore_errors=True)
        replicate(base, pool, copies)
        (pool / f".copies-{copies}").touch()
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    gpus = torch.cuda.device_count()
    cfg = Config.load(
        None,
        input=str(pool),
        output=str(out),
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
        allow_random_weights=True,
        device="cuda",
        precision=args.precision,
        clip_batch_size=args.clip_batch_size,
        det_batch_size=32,
        report=False,
    )
    holder: dict[str, Any] = {}
    build = pipeline.build_dataset

    def keep(cfg: Config, items: list) -> Any:
        holder["ds"] = build(cfg, items)
        return holder["ds"]

    pipeline.build_dataset = keep
    with pipeline.local_ray(num_gpus=gpus):
        cpu0 = psutil.cpu_times()
        with GpuSampler() as sampler:
            t0 = time.perf_counter()
            result = pipeline.score_pool(cfg)
            seconds = time.perf_counter() - t0
        cpu1 = psutil.cpu_times()
        stats = holder["ds"].stats() if "ds" in holder else ""
    host_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    n = result.samples_scored
    figures = {
        "gpu": gpu,
        "gpus": gpus,
        "samples": n,
        "seconds": round(seconds, 1),
        "samples_per_s_per_gpu": round(n / seconds / max(gpus, 1), 1),
        "gpu_util_mean_pct": sampler.mean,
        "host_cpu_ms_per_sample": round(1000 * host_cpu / max(n, 1), 3),
        "cpus": os.cpu_count(),
        "layout": "fused" if pipeline.fused(result.cfg or cfg) else "split",
        "precision": args.precision,
        "clip": f"{args.clip_model} (random weights: same compute)",
    }
    print(stats)  # Ray Data's per-operator wall and CPU times
    if args.write:
        with open(args.write, "a") as f:
            f.write(
                f"\n### GPU (`make bench-gpu`), {date.today()}, {gpu} x{gpus}, "
                f"{os.cpu_count()} CPUs, {platform.machine()}\n\n```\n{json.dumps(figures)}\n```\n"
            )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
