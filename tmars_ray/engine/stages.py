"""The pipeline's stages as Ray Data batch functions: decode (tasks), detect and mask+score
(actor pools that load their model once, in `__init__`).

Batches are dicts of numpy arrays (Ray's "numpy" batch format). Every row carries `kind`
("sample" or the shard's "end" marker) and `status` ("" while still in play, else final);
a stage only works on rows still in play and passes every other row through untouched, so no
row is ever dropped.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from tmars_ray.config import Config
from tmars_ray.data.decode import decode_image

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
    "derived_uid",
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


class DetectStage:
    """Text detection actor: adds `boxes` (JSON of flat polygons in original pixels)."""

    def __init__(self, cfg: Config) -> None:
        from tmars_ray.models.tmars import DetectStep

        self.step = DetectStep(cfg.detector_settings(cfg.model_thread_count(cfg.det_num_cpus)))

    def device_report(self) -> dict[str, dict[str, Any]]:
        """What each model of this actor really runs on: {"detector": {device, precision,
        providers}}."""
        return self.step.device_report()

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["kind"])
        boxes = ["[]"] * n
        status = batch["status"].astype(object)
        idx = np.flatnonzero(_in_play(batch))
        for i, det in zip(idx, self.step([batch["image"][i] for i in idx])):
            if det.status:
                status[i] = det.status
            else:
                boxes[i] = json.dumps(det.boxes)
        # JSON text crosses the actor boundary cheaply; ragged nested lists would be pickled
        return {**batch, "boxes": np.array(boxes, dtype=object), "status": status}


class MaskScoreStage:
    """Masking + CLIP scoring actor: the original and the masked image against the caption.
    Drops the image arrays: what leaves this stage is the score row (ROW_COLUMNS, n_text_boxes,
    text_area, boxes, the score columns, and ocr_text + caption with recognize_text)."""

    def __init__(self, cfg: Config) -> None:
        from tmars_ray.models.tmars import MaskScoreStep

        threads = cfg.model_thread_count(cfg.score_num_cpus)
        self.cfg = cfg
        self.step = MaskScoreStep(
            cfg.clip_specs(),
            cfg.scoring_settings(threads),
            cfg.mask_settings(),
            cfg.recognizer_settings(threads),
        )

    def device_report(self) -> dict[str, dict[str, Any]]:
        """What each model of this actor really runs on: {"clip": {...}[, "clip_2", ...]}."""
        return self.step.device_report()

    @property
    def model_ids(self) -> list[str]:
        return self.step.model_ids

    def __call__(self, batch: Batch) -> pa.Table:
        n = len(batch["kind"])
        status = batch["status"].astype(object)
        n_boxes, area = np.zeros(n, np.int32), np.zeros(n, np.float32)
        scores = {name: np.full(n, np.nan, np.float32) for name in self.step.columns}
        ocr: list[str | None] = [None] * n
        boxes: list[list | None] = [None] * n
        idx = np.flatnonzero(_in_play(batch))
        for i in idx:
            boxes[i] = json.loads(batch["boxes"][i])
        results = self.step(
            [batch["image"][i] for i in idx],
            [boxes[i] for i in idx],
            [batch["caption"][i] for i in idx],
            keys=[batch["key"][i] for i in idx],
        )
        for i, res in zip(idx, results):
            status[i] = res.status
            n_boxes[i], area[i], ocr[i] = res.n_text_boxes, res.text_area, res.ocr_text
            for name, value in res.scores.items():
                scores[name][i] = value
        out: dict[str, Any] = {k: batch[k] for k in ROW_COLUMNS if k in batch}
        out.update(status=status, n_text_boxes=n_boxes, text_area=area, **scores)
        if not self.cfg.score_original:  # not computed: null, not a number
            for name in ("clip_score", "clip_score_2"):
                if name in out:
                    out[name] = pa.array(out[name], mask=np.ones(n, bool), type=pa.float32())
        out["boxes"] = pa.array(boxes, type=pa.list_(pa.list_(pa.float32())))
        if self.cfg.recognize_text:
            out["ocr_text"] = pa.array(ocr, type=pa.string())
            out["caption"] = pa.array(batch["caption"].tolist(), type=pa.string())
        return pa.table(out)


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
