"""Pipeline efficiency benchmark (`make bench`; not a test). In ONE run, on the same images and
cores, it measures:

  (a) bare models: read+decode, detection, masking and CLIP encoding in a plain loop at the
      job's batch sizes, no Ray - the models' own limit on this machine;
  (b) the full job through Ray, from shards on disk to the score table;
  (c) the naive way: one image at a time, detector at PaddleOCR's default input size,
      CLIP at batch 1 (original and masked image encoded in separate calls).

Real architectures (PP-OCRv5 det, ViT-B/32); CLIP weights are random when pretrained ones
cannot be had (same compute). Prints a markdown section and, with --write, puts it into
BENCHMARKS.md between `<!-- bench:pipeline -->` markers.

    python -m tmars_ray.devtools.bench --samples 400 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import time

import numpy as np

from tmars_ray.config import Config
from tmars_ray.devtools.naive import bare


def _pool(path: str, samples: int, shards: int) -> str:
    from tmars_ray.devtools.synth import write_pool

    marker = os.path.join(path, f".complete-{samples}-{shards}")
    if not os.path.exists(marker):
        write_pool(path, samples=samples, shards=shards, seed=1)
        open(marker, "w").close()
    return path


def pipeline(cfg: Config) -> dict[str, float]:
    from tmars_ray.engine.cluster import local_ray
    from tmars_ray.engine.pipeline import score_pool

    with local_ray(num_cpus=os.cpu_count()):
        start = time.perf_counter()
        result = score_pool(cfg)
        total = time.perf_counter() - start
    return {"total": total, "samples": result.samples_scored}


def clip_throughput(cfg: Config, images: int = 64) -> str:
    """ViT-B/32 on this CPU at the default batch size: image tower, caption tower, preprocessing,
    for 2 threads and 1 thread (the job's per-actor setting)."""
    import torch
    from PIL import Image

    from tmars_ray.models.clip import ClipScorer, ModelSpec
    from tmars_ray.models.settings import ScorerSettings

    scorer = ClipScorer(
        ModelSpec(cfg.clip_model, "none", True), ScorerSettings("cpu", "fp32", cfg.clip_batch_size)
    )
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(images)]
    caps = [
        f"a photo of a small red bus parked near the old station number {i}" for i in range(images)
    ]
    rows = [
        "| threads | image encode img/s | caption encode captions/s | preprocess img/s |",
        "|---:|---:|---:|---:|",
    ]
    for threads in (os.cpu_count() or 1, 1):
        torch.set_num_threads(threads)
        scorer.encode_images(pics[: cfg.clip_batch_size])  # warm-up
        t = time.perf_counter()
        scorer.encode_images(pics)
        img = images / (time.perf_counter() - t)
        t = time.perf_counter()
        scorer.encode_texts(caps)
        txt = images / (time.perf_counter() - t)
        t = time.perf_counter()
        for p in pics:
            scorer.preprocess(Image.fromarray(p))
        pre = images / (time.perf_counter() - t)
        rows.append(f"| {threads} | {img:.1f} | {txt:.1f} | {pre:.0f} |")
    return (
        f"{cfg.clip_model}, fp32, batch {cfg.clip_batch_size}, 640x480 inputs, "
        f"{dt.date.today().isoformat()}, `python -m tmars_ray.devtools.bench --clip-only`:\n\n"
        + "\n".join(rows)
    )


def main(argv: list[str] | None = None) -> None:
    if argv and argv[0] in ("host", "cpu"):  # host cost / CPU defaults: devtools/bench_host.py
        from tmars_ray.devtools.bench_host import main as bench_host

        sys.exit(bench_host(argv))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--dir", default=os.path.join("build", "bench"))
    ap.add_argument("--config", default=os.path.join("jobs", "configs", "local-cpu.yaml"))
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--clip-only", action="store_true", help="only the CLIP throughput table")
    ap.add_argument("--write", help="update this markdown file (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TMARS_PROGRESS_BARS", "0")

    if args.clip_only:
        section = clip_throughput(Config.load(args.config))
        print(section)
        if args.write:
            write_section(args.write, "clip", section)
        return
    pool = _pool(os.path.join(args.dir, "pool"), args.samples, args.shards)
    run_dir = os.path.join(args.dir, f"run-{int(time.time())}")
    cfg = Config.load(
        args.config,
        input=pool,
        output=run_dir,
        clip_pretrained="none",
        allow_random_weights=True,
        report=False,
    )
    print(f"pool: {args.samples} samples in {args.shards} shards at {pool}", flush=True)
    a = bare(cfg)
    print(f"(a) bare: {a}", flush=True)
    b = pipeline(cfg)
    print(f"(b) pipeline: {b}", flush=True)
    c = (
        None
        if args.skip_naive
        else bare(
            dataclasses.replace(cfg, det_limit_side_len=960, det_batch_size=1, clip_batch_size=1),
            naive=True,
        )
    )
    print(f"(c) naive: {c}", flush=True)
    section = report(args, cfg, a, b, c)
    print(section)
    if args.write:
        write_section(args.write, "pipeline", section)


def _rate(r: dict[str, float]) -> float:
    return r["samples"] / r["total"]


def report(args, cfg: Config, a, b, c) -> str:
    ra, rb = _rate(a), _rate(b)
    lines = [
        f"Measured {dt.date.today().isoformat()} on {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
        "no GPU.",
        f"Command: `python -m tmars_ray.devtools.bench --samples {args.samples} --shards {args.shards}"
        + (" --skip-naive" if args.skip_naive else "")
        + "` (part of `make bench`).",
        f"Pool: `tmars demo-pool` synthetic images (160-640 px, ~70% with text), {args.samples} "
        f"samples in {args.shards} shards. Models: {cfg.detector} (onnxruntime, limit "
        f"{cfg.det_limit_side_len}), {cfg.clip_model} (random weights, same compute); det batch "
        f"{cfg.det_batch_size}, CLIP batch {cfg.clip_batch_size}; config `{args.config}`.",
        "",
        "| run | samples/s | total s | per-stage s (read+decode / detect / mask / clip) |",
        "|---|---|---|---|",
        f"| (a) bare models, plain loop | {ra:.2f} | {a['total']:.1f} | "
        f"{a['read+decode']:.1f} / {a['detect']:.1f} / {a['mask']:.1f} / {a['clip']:.1f} |",
        f"| (b) full job through Ray (start-up included) | {rb:.2f} | {b['total']:.1f} | "
        "actors run concurrently |",
    ]
    if c:
        lines.append(
            f"| (c) naive: batch 1, default detector size | {_rate(c):.2f} | {c['total']:.1f} | "
            f"{c['read+decode']:.1f} / {c['detect']:.1f} / {c['mask']:.1f} / {c['clip']:.1f} |"
        )
    lines += ["", f"Ratio (b)/(a) = **{rb / ra:.2f}** (target >= 0.9)."]
    if c:
        lines.append(f"Ratio (b)/(c) = **{rb / _rate(c):.2f}** (target >= 2).")
    return "\n".join(lines)


def write_section(path: str, name: str, body: str) -> None:
    """Replace the text between `<!-- bench:NAME -->` markers (appending them if absent)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
