"""Host cost and CPU defaults (`python -m tmars_ray.devtools.bench host|cpu ...`; not tests).

host: the GPU layout's stage (`DeviceTmarsStage`, `models.gpu_step`) over a pool, in one
process on the CPU, timed by component. The work that stays on the host when the models run on
a GPU - reading, header probes, decoding, DB post-processing, mask plans, tokenising, score-row
bookkeeping and part writing - is measured as CPU time; the device work (resize + detector,
mask application, CLIP preprocessing and forward) is timed apart as `device_ms_per_sample`
(here on the CPU). `host_ms_per_sample_gpu_decode` replaces the JPEGs' CPU decoding by what
routing them to nvJPEG leaves on the host.
Object-store traffic is the size of what crosses between stages (reader -> T-MARS stage ->
writer). The last line printed is one JSON object.

    python -m tmars_ray.devtools.bench host --input POOL [--clip-model M --clip-pretrained P]
    python -m tmars_ray.devtools.bench host --make-pool build/bench/datacomp --samples 400

cpu: the whole `tmars run` with no config (start-up included) against a naive
one-image-at-a-time loop (PaddleOCR's TextDetection, open_clip at batch 1; and again with this
project's detector class), on 320-900 px images.

    python -m tmars_ray.devtools.bench cpu --samples 240
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tmars_ray.config import Config

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------- pools
def sized_pool(
    folder: str, samples: int, sides: tuple[int, int], text_share: float, seed: int = 5
) -> str:
    """A webdataset pool of synthetic samples resized so the longer side is in `sides`,
    `text_share` of them with rendered text (DataComp-like: JPEG, <= 512 px, ~40% text)."""
    from PIL import Image

    from tmars_ray.devtools.synth import encode_jpeg, generate_sample, sample_metadata

    marker = Path(folder) / f".complete-{samples}-{sides[0]}-{sides[1]}"
    if marker.exists():
        return folder
    Path(folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    want_text = round(samples * text_share)
    picked, i = [], 0
    n_text = 0
    while len(picked) < samples:
        s = generate_sample(seed, i)
        i += 1
        has = bool(s.lines)
        if has and n_text >= want_text or not has and len(picked) - n_text >= samples - want_text:
            continue
        n_text += has
        side = int(rng.integers(sides[0], sides[1] + 1))
        h, w = s.image.shape[:2]
        scale = side / max(h, w)
        img = Image.fromarray(s.image).resize(
            (max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BICUBIC
        )
        picked.append((s, encode_jpeg(np.asarray(img))))
    per_shard = 100
    for k in range(0, samples, per_shard):
        with tarfile.open(Path(folder) / f"{k // per_shard:08d}.tar", "w") as tar:
            for s, jpeg in picked[k : k + per_shard]:
                meta = json.dumps(sample_metadata(s)).encode()
                for ext, data in (("jpg", jpeg), ("txt", s.caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    marker.touch()
    return folder


# ---------------------------------------------------------------------------------- host
class _Timer:
    """Accumulates the process CPU time of wrapped calls (model calls: their own threads
    included). CPU time, like the stage totals it is subtracted from: wall time would count
    waiting for a shared core as model work."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.process_time() - t0

        return timed


def _size(batch: Any) -> int:
    """Bytes a batch occupies in the object store (arrow or numpy/object columns)."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch.nbytes
    total = 0
    for col in batch.values():
        if col.dtype == object:
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in col)
        else:
            total += col.nbytes
    return total


def host(cfg: Config, limit: int) -> dict[str, Any]:
    """Component timings of the GPU layout's stage over the pool (see module doc)."""
    import torch

    from tmars_ray.data import sources
    from tmars_ray.engine.stages import DeviceTmarsStage
    from tmars_ray.engine.writer import write_parts
    from tmars_ray.models import gpu_step

    torch.set_num_threads(1)
    # the GPU layout's stage (models.gpu_step), here on the CPU
    cfg = Config(
        **{**cfg.to_dict(), "model_threads": 1, "device": "cpu", "clip_preprocess": "torch"}
    )
    stage = DeviceTmarsStage(cfg)
    step = stage.step
    device = _Timer()  # what runs on the device on a GPU: resize + detector, masks, CLIP
    step.prob_maps = device.wrap(step.prob_maps)
    gpu_step.apply_mask_plan = device.wrap(gpu_step.apply_mask_plan)
    for scorer in step.scorers:  # `_run`: padding, forward, normalising - all device tensors
        scorer._run = device.wrap(scorer._run)
        if scorer._tensor_pre is not None:
            scorer._tensor_pre = device.wrap(scorer._tensor_pre)
    decode = _Timer()  # CPU decoding of every image (on a GPU: JPEGs go to nvJPEG)
    gpu_step.decode_image = decode.wrap(gpu_step.decode_image)
    cpu: dict[str, float] = defaultdict(float)
    traffic = encoded = samples = jpeg_host = 0.0
    root, shards = sources.list_shards(cfg.input, cfg.input_format)
    rows: list[dict[str, Any]] = []

    def run_batch(rows: list[dict[str, Any]]) -> None:
        nonlocal traffic, jpeg_host
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
        traffic += _size(batch)
        c0, d0, k0 = time.process_time(), device.seconds, decode.seconds
        table = stage(batch)
        cpu["stage"] += time.process_time() - c0
        cpu["device_work"] += device.seconds - d0
        cpu["decode"] += decode.seconds - k0
        # what a GPU's decode path leaves on the host for each JPEG: the header checks that
        # route it to nvJPEG and the tensor around its bytes (nvJPEG's driver time not included)
        c0 = time.process_time()
        for data in batch["image_bytes"]:
            if gpu_step.gpu_decodable(data, cfg.max_image_pixels):
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
        jpeg_host += time.process_time() - c0
        traffic += _size(table)
        c0 = time.process_time()
        write_parts(table, cfg.output, [])
        cpu["write"] += time.process_time() - c0

    for item in sources.shard_items(root, shards):
        c0 = time.process_time()
        for row in sources.read_shard(item, cfg):
            cpu["read+probe"] += time.process_time() - c0
            if row["kind"] == "sample" and samples < limit:
                samples += 1
                encoded += len(row["image_bytes"])
                rows.append(row)
                if len(rows) == cfg.clip_batch_size:
                    run_batch(rows)
                    rows = []
            c0 = time.process_time()
    if rows:
        run_batch(rows)
    n = max(samples, 1)
    host_cpu = cpu["read+probe"] + cpu["stage"] - cpu["device_work"] + cpu["write"]
    jpegs = _jpeg_decode_seconds(cfg, root, shards, limit)
    return {
        "samples": int(samples),
        "host_ms_per_sample": round(1000 * host_cpu / n, 3),
        "host_ms_per_sample_gpu_decode": round(1000 * (host_cpu - jpegs + jpeg_host) / n, 3),
        "device_ms_per_sample": round(1000 * cpu["device_work"] / n, 3),
        "object_store_bytes_per_sample": round(traffic / n),
        "encoded_bytes_per_sample": round(encoded / n),
        "traffic_over_encoded": round(traffic / max(encoded, 1), 3),
        "components_ms_per_sample": {k: round(1000 * v / n, 3) for k, v in sorted(cpu.items())},
        "layout": "fused device step (models.gpu_step), on the CPU",
        "note": "host = read+probe + the stage minus device work (resize + detector, mask "
        "apply, CLIP preprocessing + forward) + part writing; _gpu_decode: JPEG decoding "
        "replaced by the host share of nvJPEG routing",
    }


def _jpeg_decode_seconds(cfg: Config, root: str, shards: list, limit: int) -> float:
    """CPU seconds the host spends decoding the JPEGs a GPU would decode (nvJPEG)."""
    from tmars_ray.data import sources
    from tmars_ray.models import gpu_step

    total, seen = 0.0, 0
    for item in sources.shard_items(root, shards):
        for row in sources.read_shard(item, cfg):
            if row["kind"] != "sample" or seen >= limit:
                continue
            seen += 1
            data = row["image_bytes"]
            if data and gpu_step.gpu_decodable(data, cfg.max_image_pixels):
                c0 = time.process_time()
                gpu_step.decode_image(data, cfg.max_image_pixels)
                total += time.process_time() - c0
    return total


# ----------------------------------------------------------------------------------- cpu
def cpu_defaults(pool: str, work: Path, model: str, pretrained: str) -> dict[str, Any]:
    """`tmars run` with no config (whole command) vs a naive loop on the same images."""
    from tmars_ray.devtools.naive import bare

    out = work / "run-defaults"
    shutil.rmtree(out, ignore_errors=True)  # a finished run would only be resumed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMARS_PROGRESS_BARS": "0"}
    cmd = [
        sys.executable, "-m", "tmars_ray", "run", "--input", pool, "--output", str(out),
        "--clip-model", model, "--clip-pretrained", pretrained, "--allow-random-weights",
        "--no-report",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    job_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    cfg = Config(input=pool, clip_model=model, clip_pretrained=pretrained, device="cpu")
    # the naive loop as a user would write it (PaddleOCR's TextDetection), and with this
    # project's faster detector class (a stricter baseline)
    naive = bare(cfg, naive=True, paddleocr=True)
    strict = bare(cfg, naive=True)
    n = naive["samples"]
    return {
        "samples": n,
        "job_s": round(job_s, 1),
        "job_samples_per_s": round(n / job_s, 3),
        "naive_s": round(naive["total"], 1),
        "naive_samples_per_s": round(n / naive["total"], 3),
        "speedup": round(naive["total"] / job_s, 3),
        "naive_own_detector_s": round(strict["total"], 1),
        "speedup_vs_own_detector": round(strict["total"] / job_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["host", "cpu"])
    ap.add_argument("--input", help="pool to measure (default: a generated one)")
    ap.add_argument("--make-pool", default="build/bench/datacomp-like")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--sides", default="320-900", help="cpu: longer image side range, px")
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--clip-pretrained", default="openai")
    ap.add_argument("--work", default="build/bench/host")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.mode == "host":
        pool = args.input or sized_pool(args.make_pool, args.samples, (256, 512), 0.4)
        cfg = Config(
            input=pool,
            output=str(work / "run"),
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            allow_random_weights=True,
        )
        result = host(cfg, args.samples)
    else:
        lo, hi = (int(v) for v in args.sides.split("-"))
        pool = args.input or sized_pool(
            f"build/bench/cpu-{lo}-{hi}-{args.samples}", args.samples, (lo, hi), 0.6, seed=9
        )
        result = cpu_defaults(pool, work, args.clip_model, args.clip_pretrained)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
