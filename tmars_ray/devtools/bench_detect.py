"""Detection and masking quality benchmark on synthetic pools with pixel-level ground truth.

    python -m tmars_ray.devtools.bench_detect --samples 200 [--limits 320,480,640,960] [--detector NAME|DIR]

Not a test: it prints a markdown report (numbers for BENCHMARKS.md). Metrics (DESIGN 7):

- recall: share of rendered text lines whose ink pixels (the pixels the text changed) are
  >= 80% covered by the union of detected polygons;
- precision: share of detected polygons that sit on rendered text: the polygon covers ink of
  some line AND >= 50% of its area lies within the lines' text regions, each line's tight box
  grown by one line height (DB's unclip expands boxes by ~0.75 line heights; IoU against tight
  boxes would punish that). A polygon on a shape or on photo texture fails the first test; one
  that swallows a shape next to a word fails the second;
- masking efficacy: the PP-OCRv5 recogniser reads every ground-truth line (its tight polygon
  grown a little) in the original and in the masked image; "readable" counts the characters of
  the rendered text matched in what was read (lowercase, spaces ignored, difflib alignment).
  Efficacy = readable after / readable before (target <= 5%). Raw characters read are shown too;
- throughput: detector images/s over the pool at the configured batch size, model load and a
  warm-up call excluded, with the process's CPU time beside wall time (shared machines);
  images are JPEG round-tripped like a real pool unless --no-jpeg.

The synthetic pool's images are at most 640 px a side, so limits >= 640 do not resize them;
smaller limits show what shrinking costs in recall.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import io
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image

from tmars_ray.config import Config
from tmars_ray.models.detect import TextDetector
from tmars_ray.models.mask import mask_text, rasterize

RECALL_COVER = 0.8
PRECISION_INSIDE = 0.5


@dataclass
class Sample:
    image: np.ndarray
    scene: str
    texts: list[str]
    polygons: list[np.ndarray]  # tight GT line polygons
    inks: list[np.ndarray]
    regions: np.ndarray | None  # union of grown line boxes (precision); None without text


def _line_height(poly: np.ndarray) -> float:
    return float(min(np.linalg.norm(poly[0] - poly[3]), np.linalg.norm(poly[1] - poly[2])))


def load_samples(n: int, seed: int, jpeg: bool) -> list[Sample]:
    from tmars_ray.devtools.synth import encode_jpeg, generate_sample

    out = []
    for i in range(n):
        s = generate_sample(seed, i)
        image = s.image
        if jpeg:
            image = np.asarray(Image.open(io.BytesIO(encode_jpeg(image))).convert("RGB"))
        regions = None
        if s.lines:
            regions = np.zeros(image.shape[:2], np.uint8)
            for ln in s.lines:
                own = rasterize(ln.polygon, image.shape[:2])
                grow = max(2, round(_line_height(ln.polygon)))
                kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
                regions |= cv2.dilate(own, kernel)
            regions = regions.astype(bool)
        out.append(
            Sample(
                image,
                s.scene,
                [ln.text for ln in s.lines],
                [ln.polygon for ln in s.lines],
                [ln.ink for ln in s.lines],
                regions,
            )
        )
    return out


def detection_quality(samples: list[Sample], results: list) -> dict:
    lines = hit = polys = good = 0
    fp_scenes: Counter[str] = Counter()
    miss_scenes: Counter[str] = Counter()
    for s, r in zip(samples, results):
        shape = s.image.shape[:2]
        union = np.zeros(shape, bool)
        ink_all = np.zeros(shape, bool)
        for ink in s.inks:
            ink_all |= ink
        for p in r.polygons:
            own = rasterize(p, shape).astype(bool)
            union |= own
            polys += 1
            area = max(int(own.sum()), 1)
            on_text = (
                s.regions is not None
                and (own & ink_all).any()
                and (own & s.regions).sum() >= PRECISION_INSIDE * area
            )
            good += on_text
            if not on_text:
                fp_scenes[s.scene] += 1
        for ink in s.inks:
            lines += 1
            covered = (ink & union).sum() / max(int(ink.sum()), 1)
            hit += covered >= RECALL_COVER
            if covered < RECALL_COVER:
                miss_scenes[s.scene] += 1
    return {
        "lines": lines,
        "recall": hit / max(lines, 1),
        "polygons": polys,
        "precision": good / max(polys, 1),
        "fp": polys - good,
        "fp_scenes": fp_scenes,
        "miss_scenes": miss_scenes,
    }


def _norm(text: str) -> str:
    return "".join(text.lower().split())


def readable_chars(truth: str, read: str) -> int:
    """Characters of `truth` found, in order, in `read` (difflib alignment)."""
    a, b = _norm(truth), _norm(read)
    return sum(
        m.size for m in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    )


def _grow(poly: np.ndarray, frac: float = 0.15) -> np.ndarray:
    """Tight line polygon grown by `frac` of the line height on every side (recogniser context)."""
    c = poly.mean(axis=0)
    d = poly - c
    n = np.linalg.norm(d, axis=1, keepdims=True)
    return (poly + d / np.maximum(n, 1e-6) * frac * _line_height(poly) * 1.4).astype(np.float32)


def masking_efficacy(samples: list[Sample], results: list, cfg: Config) -> dict:
    from tmars_ray.models.recognize import TextRecognizer
    from tmars_ray.models.settings import RecognizerSettings

    rec = TextRecognizer(RecognizerSettings(device=cfg.device, threads=cfg.model_threads))
    gt = before = after = read_before = read_after = 0
    t_mask = 0.0
    for s, r in zip(samples, results):
        if not s.texts:
            continue
        t0 = time.perf_counter()
        masked = mask_text(s.image, r.polygons, cfg.mask_ring).masked
        t_mask += time.perf_counter() - t0
        polys = [_grow(p) for p in s.polygons]
        for truth, a, b in zip(s.texts, rec.read(s.image, polys), rec.read(masked, polys)):
            gt += len(_norm(truth))
            before += readable_chars(truth, a)
            after += readable_chars(truth, b)
            read_before += len(_norm(a))
            read_after += len(_norm(b))
    return {
        "gt_chars": gt,
        "readable_before": before,
        "readable_after": after,
        "efficacy": after / max(before, 1),
        "read_before": read_before,
        "read_after": read_after,
        "raw_ratio": read_after / max(read_before, 1),
        "mask_s": t_mask,
    }


def run_detector(
    cfg: Config, images: list[np.ndarray], verify: int = 0
) -> tuple[list, float, float]:
    """Results, wall seconds and CPU seconds (this process, all threads) of detecting `images`.

    CPU time is reported beside wall time because a shared machine's load inflates the latter.
    """
    det = TextDetector(replace(cfg.detector_settings(cfg.model_threads), min_text_chars=verify))
    bs = cfg.det_batch_size
    det.detect(images[:bs])  # warm-up: onnxruntime allocates on the first run of a shape
    t0, c0 = time.perf_counter(), time.process_time()
    results = []
    for i in range(0, len(images), bs):
        results.extend(det.detect(images[i : i + bs]))
    return results, time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tmars_ray.devtools.bench_detect", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--limits", default="320,480,640,960", help="det_limit_side_len values to compare"
    )
    ap.add_argument(
        "--detector", default=None, help="det model name or directory (default: config's)"
    )
    ap.add_argument("--box-thresh", type=float, default=None, help="override det_box_thresh")
    ap.add_argument(
        "--verify",
        type=int,
        default=0,
        help="TextDetector verify_min_chars: OCR squat boxes, drop non-text (0: off)",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="override det_batch_size")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime threads")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument(
        "--no-jpeg", action="store_true", help="use the rendered pixels, not JPEG-decoded"
    )
    ap.add_argument("--no-ocr", action="store_true", help="skip the masking-efficacy OCR pass")
    args = ap.parse_args(argv)

    base = Config(device=args.device, model_threads=args.threads)
    if args.detector:
        base = replace(base, detector=args.detector)
    if args.box_thresh is not None:
        base = replace(base, det_box_thresh=args.box_thresh)
    if args.batch_size:
        base = replace(base, det_batch_size=args.batch_size)
    limits = [int(v) for v in args.limits.split(",") if v]

    t0 = time.perf_counter()
    samples = load_samples(args.samples, args.seed, not args.no_jpeg)
    gen_s = time.perf_counter() - t0
    images = [s.image for s in samples]
    n_lines = sum(len(s.texts) for s in samples)
    print(f"# Text detection benchmark ({_dt.date.today().isoformat()})\n")
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"- command: `python -m tmars_ray.devtools.bench_detect {shown}`".rstrip())
    print(
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, device={args.device}, "
        f"onnxruntime threads={args.threads}, load average at start {os.getloadavg()[0]:.1f}"
    )
    print(
        f"- pool: {len(samples)} synthetic samples (seed {args.seed}), {n_lines} text lines, "
        f"{sum(not s.texts for s in samples)} text-free images, "
        f"{'JPEG q90 round trip' if not args.no_jpeg else 'raw pixels'}; generated in {gen_s:.1f} s"
    )
    verify = f">= {args.verify} chars" if args.verify else "off"
    print(
        f"- detector: {base.detector}, engine {base.det_engine}, batch {base.det_batch_size}, "
        f"thresh {base.det_thresh}, box_thresh {base.det_box_thresh}, unclip {base.det_unclip_ratio}, "
        f"OCR verification {verify}\n"
    )

    print(
        "| limit_side_len | recall (ink >= 80% covered) | precision (polygons on text) | polygons | false pos. | images/s | ms/image | CPU ms/image |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    per_limit = {}
    for limit in limits:
        cfg = replace(base, det_limit_side_len=limit)
        results, secs, cpu = run_detector(cfg, images, args.verify)
        q = detection_quality(samples, results)
        per_limit[limit] = (cfg, results, q)
        errors = sum(r.error is not None for r in results)
        print(
            f"| {limit} | {q['recall']:.3f} ({q['lines']} lines) | {q['precision']:.3f} | "
            f"{q['polygons']} | {q['fp']} | {len(images) / secs:.1f} | {1000 * secs / len(images):.0f} | {1000 * cpu / len(images):.0f} |"
            + (f" ({errors} errors)" if errors else "")
        )
    print()
    for limit, (_cfg, _res, q) in per_limit.items():
        if q["fp_scenes"] or q["miss_scenes"]:
            print(
                f"- limit {limit}: false positives by scene {dict(q['fp_scenes'].most_common(6))}; "
                f"missed lines by scene {dict(q['miss_scenes'].most_common(6))}"
            )

    if not args.no_ocr:
        limit = base.det_limit_side_len if base.det_limit_side_len in per_limit else limits[-1]
        cfg, results, _q = per_limit[limit]
        m = masking_efficacy(samples, results, cfg)
        print(
            f"\n## Masking efficacy (limit {limit}, ring {cfg.mask_ring} px, PP-OCRv5 mobile rec)\n"
        )
        print(
            "| rendered chars | readable before masking | readable after | efficacy (after/before) | chars read before | after | raw ratio | mask ms/image |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        n_text = sum(bool(s.texts) for s in samples)
        print(
            f"| {m['gt_chars']} | {m['readable_before']} | {m['readable_after']} | "
            f"{100 * m['efficacy']:.1f}% | {m['read_before']} | {m['read_after']} | "
            f"{100 * m['raw_ratio']:.1f}% | {1000 * m['mask_s'] / max(n_text, 1):.1f} |"
        )


if __name__ == "__main__":
    main()
