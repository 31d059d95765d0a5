"""The pipeline's stages as Ray Data batch functions: decode (tasks), detect and mask+score
(actor pools that load their model once, in `__init__`).

Batches are dicts of numpy arrays (Ray's "numpy" batch format). Every row carries `kind`
("sample" or the shard's "end" marker) and `status` ("" while still in play, else final);
a stage only works on rows still in play and passes every other row through untouched, so no
row is ever dropped.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

from tmars_ray.config import Config
from tmars_ray.data import schema
from tmars_ray.data.decode import decode_image

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)
# bookkeeping columns that travel from the reader to the driver unchanged
ROW_COLUMNS = (
    "kind",
    "shard",
    "shard_id",
    "idx",
    "key",
    "uid",
    "status",
    "shard_status",
    "n_samples",
    "error",
    "width",
    "height",
)


def _in_play(batch: Batch) -> np.ndarray:
    return (batch["kind"] == "sample") & (batch["status"] == "")


def _objects(values: list) -> np.ndarray:
    """A 1-D object array (np.array would try to stack equal-shaped entries)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def decode_batch(batch: Batch, cfg: Config) -> Batch:
    """Image bytes -> RGB arrays (column `image`), width/height, decode failure statuses."""
    n = len(batch["kind"])
    images, widths, heights = [EMPTY_IMAGE] * n, np.zeros(n, np.int32), np.zeros(n, np.int32)
    status = batch["status"].astype(object)
    for i in np.flatnonzero(_in_play(batch)):
        arr, st = decode_image(batch["image_bytes"][i], cfg.max_image_pixels)
        if arr is None:
            status[i] = st
            continue
        images[i] = arr
        heights[i], widths[i] = arr.shape[:2]
    out = {k: v for k, v in batch.items() if k != "image_bytes"}
    out.update(image=_objects(images), width=widths, height=heights, status=status)
    return out


def _threads(cfg: Config, num_cpus: float) -> int:
    """Threads for a model actor: `torch_threads`, else its CPU reservation rounded up."""
    return cfg.torch_threads or max(1, math.ceil(num_cpus))


class DetectStage:
    """Text detection actor: adds `boxes` (flat polygons in original pixels)."""

    def __init__(self, cfg: Config) -> None:
        from dataclasses import replace

        from tmars_ray.models.detect import TextDetector

        threads = _threads(cfg, cfg.det_num_cpus)
        self.detector = TextDetector(
            replace(cfg, torch_threads=threads), verify_min_chars=cfg.det_min_text_chars
        )

    def __call__(self, batch: Batch) -> Batch:
        from tmars_ray.models.detect import flatten_polygons

        n = len(batch["kind"])
        boxes = ["[]"] * n
        status = batch["status"].astype(object)
        idx = np.flatnonzero(_in_play(batch))
        results = self.detector.detect([batch["image"][i] for i in idx]) if len(idx) else []
        for i, res in zip(idx, results):
            if res.error:
                status[i] = schema.DETECT_ERROR
            else:
                boxes[i] = json.dumps(flatten_polygons(res.polygons))
        # JSON text crosses the actor boundary cheaply; ragged nested lists would be pickled
        return {**batch, "boxes": np.array(boxes, dtype=object), "status": status}


class MaskScoreStage:
    """Masking + CLIP scoring actor: the original and the masked image against the caption.
    Drops the image arrays: what leaves this stage is the score row."""

    def __init__(self, cfg: Config) -> None:
        import torch

        from tmars_ray.models.clip import ClipScorer, model_specs

        torch.set_num_threads(_threads(cfg, cfg.score_num_cpus))
        self.cfg = cfg
        self.scorers = [
            ClipScorer(spec, cfg.device, cfg.precision, cfg.clip_batch_size)
            for spec in model_specs(cfg)
        ]
        self.recognizer = None
        if cfg.recognize_text:
            from tmars_ray.models.recognize import TextRecognizer

            self.recognizer = TextRecognizer(cfg)

    def __call__(self, batch: Batch) -> pa.Table:
        from tmars_ray.models.mask import mask_text

        n = len(batch["kind"])
        status = batch["status"].astype(object)
        n_boxes, area = np.zeros(n, np.int32), np.zeros(n, np.float32)
        scores = {name: np.full(n, np.nan, np.float32) for name in self._score_columns()}
        ocr = [None] * n
        boxes: list[list | None] = [None] * n
        idx = np.flatnonzero(_in_play(batch))
        originals, masked, captions, kept = [], [], [], []
        for i in idx:
            image = batch["image"][i]
            flat = json.loads(batch["boxes"][i])
            boxes[i] = flat
            polys = [np.asarray(p, np.float32).reshape(-1, 2) for p in flat]
            try:
                res = mask_text(image, polys, self.cfg.mask_ring)
                if self.recognizer is not None and polys:
                    ocr[i] = self.recognizer.recognize(image, polys)
            except Exception as err:  # noqa: BLE001 - one bad image must not fail the batch
                log.warning("masking failed for %s: %s", batch["key"][i], err)
                status[i] = schema.SCORE_ERROR
                continue
            n_boxes[i], area[i] = res.n_text_boxes, res.text_area
            originals.append(image)
            masked.append(res.masked if res.n_text_boxes else None)
            captions.append(batch["caption"][i])
            kept.append(i)
        if kept:
            self._score(kept, originals, masked, captions, scores, status)
        out: dict[str, Any] = {k: batch[k] for k in ROW_COLUMNS}
        out.update(status=status, n_text_boxes=n_boxes, text_area=area, **scores)
        out["boxes"] = pa.array(boxes, type=pa.list_(pa.list_(pa.float32())))
        if self.cfg.recognize_text:
            out["ocr_text"] = pa.array(ocr, type=pa.string())
            out["caption"] = pa.array(batch["caption"].tolist(), type=pa.string())
        return pa.table(out)

    def _score_columns(self) -> list[str]:
        cols = ["clip_score", "tmars_score"]
        return cols + (["clip_score_2", "tmars_score_2"] if len(self.scorers) > 1 else [])

    def _score(self, kept, originals, masked, captions, scores, status) -> None:
        cols = self._score_columns()
        try:
            for j, scorer in enumerate(self.scorers):
                clip, tmars = scorer.score(originals, masked, captions)
                scores[cols[2 * j]][kept], scores[cols[2 * j + 1]][kept] = clip, tmars
        except Exception as err:  # noqa: BLE001 - retry one by one to isolate the bad sample
            if len(kept) == 1:
                log.warning("scoring failed: %s", err)
                status[kept[0]] = schema.SCORE_ERROR
                return
            for k, o, m, c in zip(kept, originals, masked, captions):
                self._score([k], [o], [m], [c], scores, status)
            return
        for i in kept:
            status[i] = schema.OK if np.isfinite(scores["tmars_score"][i]) else schema.SCORE_ERROR

    @property
    def model_ids(self) -> list[str]:
        return [s.identifier for s in self.scorers]


def actor_options(cfg: Config, stage: str) -> dict[str, Any]:
    """Ray resources of one actor of `stage` ("det" or "score"), from the configuration."""
    opts: dict[str, Any] = {
        "num_cpus": getattr(cfg, f"{stage}_num_cpus"),
        "num_gpus": getattr(cfg, f"{stage}_num_gpus"),
        # a killed actor is restarted and its tasks retried: no sample is lost or duplicated
        "max_restarts": -1,
        "max_task_retries": -1,
    }
    if cfg.actor_resources:
        opts["resources"] = dict(cfg.actor_resources)
    return opts
