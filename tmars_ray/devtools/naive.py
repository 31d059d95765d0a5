"""The plain loops the pipeline benchmarks compare against (`bench` (a) and (c), `bench cpu`):
the models at the job's batch sizes without Ray, and the naive way a user writes it (one image
at a time, PaddleOCR's own detector, CLIP at batch 1). Not tests."""

from __future__ import annotations

import os
import time
from collections import defaultdict

import numpy as np

from tmars_ray.config import Config
from tmars_ray.data.decode import decode_image
from tmars_ray.data.sources import list_shards, read_shard, shard_items


def _samples(cfg: Config):
    root, shards = list_shards(cfg.input)
    for item in shard_items(root, shards):
        for row in read_shard(item, cfg):
            if row["kind"] == "sample" and not row["status"]:
                yield row


class PaddleOCRDetector:
    """What a user without this job would run: PaddleOCR's TextDetection on each image, with
    its own resize (same packaged weights, same input size limit and thresholds)."""

    def __init__(self, cfg: Config) -> None:
        from paddleocr import TextDetection

        from tmars_ray.models.detect import materialize_model_dir

        name, model_dir = materialize_model_dir(cfg.detector)
        self.det = TextDetection(
            model_name=name,
            model_dir=model_dir,
            engine="onnxruntime",
            device="cpu",
            limit_side_len=cfg.det_limit_side_len,
            limit_type=cfg.det_limit_type,
            thresh=cfg.det_thresh,
            box_thresh=cfg.det_box_thresh,
            unclip_ratio=cfg.det_unclip_ratio,
        )

    def detect(self, images: list[np.ndarray]) -> list:
        from tmars_ray.models.detect import DetResult, to_bgr

        raw = self.det.predict([to_bgr(im) for im in images], batch_size=len(images))
        return [DetResult([np.asarray(p, np.float32) for p in r["dt_polys"]]) for r in raw]


def bare(cfg: Config, naive: bool = False, paddleocr: bool = False) -> dict[str, float]:
    """Plain loop over the pool; per-stage seconds. naive: batch 1 everywhere. paddleocr:
    PaddleOCR's own TextDetection instead of this project's detector class."""
    import torch

    from tmars_ray.models.clip import ClipScorer, ModelSpec
    from tmars_ray.models.detect import TextDetector
    from tmars_ray.models.mask import mask_text
    from tmars_ray.models.settings import ScorerSettings

    torch.set_num_threads(os.cpu_count() or 1)
    detector = (
        PaddleOCRDetector(cfg) if paddleocr else TextDetector(cfg.detector_settings(threads=0))
    )
    scorer = ClipScorer(
        ModelSpec(cfg.clip_model, cfg.clip_pretrained, True),
        ScorerSettings("cpu", "fp32", 1 if naive else cfg.clip_batch_size),
    )
    t: dict[str, float] = defaultdict(float)
    n = 0
    batch: list[tuple[np.ndarray, str]] = []

    def flush() -> None:
        images = [b[0] for b in batch]
        s = time.perf_counter()
        dets = detector.detect(images)
        t["detect"] += time.perf_counter() - s
        s = time.perf_counter()
        masks = [mask_text(im, d.polygons, cfg.mask_ring) for im, d in zip(images, dets)]
        t["mask"] += time.perf_counter() - s
        s = time.perf_counter()
        masked = [m.masked if m.n_text_boxes else None for m in masks]
        if naive:  # plain open_clip, batch 1: original, masked image and caption apart
            for im, m, (_, cap) in zip(images, masked, batch):
                _naive_scores(scorer, im, m, cap)
        else:
            scorer.score(images, masked, [b[1] for b in batch])
        t["clip"] += time.perf_counter() - s
        batch.clear()

    size = 1 if naive else cfg.det_batch_size
    start = time.perf_counter()
    s = time.perf_counter()
    for row in _samples(cfg):
        image, status = decode_image(row["image_bytes"], cfg.max_image_pixels)
        t["read+decode"] += time.perf_counter() - s
        if image is not None:
            batch.append((image, row["caption"]))
            n += 1
        if len(batch) >= size:
            flush()
        s = time.perf_counter()
    if batch:
        flush()
    t["total"] = time.perf_counter() - start
    t["samples"] = n
    return dict(t)


def _naive_scores(scorer, image: np.ndarray, masked: np.ndarray | None, caption: str) -> None:
    import torch
    from PIL import Image

    with torch.no_grad():
        text = scorer.model.encode_text(scorer.tokenizer([caption]))
        for im in (image, masked) if masked is not None else (image,):
            emb = scorer.model.encode_image(scorer.preprocess(Image.fromarray(im)).unsqueeze(0))
            torch.nn.functional.cosine_similarity(emb, text)
