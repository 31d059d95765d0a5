"""The pipeline's stages as Ray Data batch functions: detect and mask+score (actor pools that
load their model once, in `__init__`), or both in one actor (`TmarsStage`, the default).

Encoded image bytes are what travels between stages (the reader only probes headers); each
stage decodes what it needs, at the size it needs, in its own process.

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
from tmars_ray.models.detect import target_shape
from tmars_ray.models.tmars import FailureWatch

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


def _decode_rows(batch: Batch, idx: np.ndarray, max_pixels: int, sizes=None) -> tuple:
    """Decode the image bytes of rows `idx` (optionally at reduced JPEG scale: `sizes(i)` ->
    (w, h) lower bound); returns (arrays, status column). A row that does not decode gets
    decode_error here, in the stage that needed its pixels."""
    status = batch["status"].astype(object)
    images = []
    for i in idx:
        arr, st = decode_image(batch["image_bytes"][i], max_pixels, sizes(i) if sizes else None)
        if arr is None:
            status[i] = st
        images.append(arr)
    return images, status


class DetectStage:
    """Text detection actor: adds `boxes` (JSON of flat polygons in original pixels)."""

    def __init__(self, cfg: Config) -> None:
        from tmars_ray.models.tmars import DetectStep

        self.settings = cfg.detector_settings(cfg.model_thread_count(cfg.det_num_cpus))
        self.step = DetectStep(self.settings)
        self.max_pixels = cfg.max_image_pixels
        self.keep_images = False
        self.watch = FailureWatch("detect")

    def device_report(self) -> dict[str, dict[str, Any]]:
        """What each model of this actor really runs on: {"detector": {device, precision,
        providers}}."""
        return self.step.device_report()

    def __call__(self, batch: Batch) -> Batch:
        """Decodes each image at the size the detector needs (JPEG: reduced DCT scale when
        it is larger), finds its text, and passes the bytes on with the boxes (JSON, in
        original pixels) - never the decoded pixels."""
        n = len(batch["kind"])
        boxes = ["[]"] * n
        idx = np.flatnonzero(_in_play(batch))
        images, status = _decode_rows(batch, idx, self.max_pixels, self._net_size(batch))
        live = [(i, im) for i, im in zip(idx, images) if im is not None]
        found = self.step([im for _, im in live])
        self.watch.see([(d.status, d.error) for d in found])
        for (i, im), det in zip(live, found):
            if det.status:
                status[i] = det.status
                continue
            scale = np.array(
                [batch["width"][i] / im.shape[1], batch["height"][i] / im.shape[0]], np.float32
            )
            hi = np.array([batch["width"][i] - 1, batch["height"][i] - 1], np.float32)
            polys = [np.clip(np.asarray(p, np.float32) * scale, 0, hi) for p in det.polygons]
            boxes[i] = json.dumps([p.reshape(-1).tolist() for p in polys])
        out = {**batch, "boxes": np.array(boxes, dtype=object), "status": status}
        if self.keep_images:  # fused stage: the scorer reuses full-size decodes, same process
            full = _objects([None] * n)
            for i, im in live:
                if im.shape[:2] == (batch["height"][i], batch["width"][i]):
                    full[i] = im
            out["image"] = full
        # JSON text crosses the actor boundary cheaply; ragged nested lists would be pickled
        return out

    def _net_size(self, batch: Batch):
        s = self.settings

        def size(i: int) -> tuple[int, int]:
            h, w = target_shape(
                int(batch["height"][i]), int(batch["width"][i]), s.limit_side_len, s.limit_type
            )
            return (w, h)

        return size


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
        self.watch = FailureWatch("score")

    def device_report(self) -> dict[str, dict[str, Any]]:
        """What each model of this actor really runs on: {"clip": {...}[, "clip_2", ...]}."""
        return self.step.device_report()

    @property
    def model_ids(self) -> list[str]:
        return self.step.model_ids

    def __call__(self, batch: Batch) -> pa.Table:
        idx = np.flatnonzero(_in_play(batch))
        kept = batch.get("image")
        todo = [i for i in idx if kept is None or kept[i] is None]
        decoded, status = _decode_rows(batch, np.array(todo, int), self.cfg.max_image_pixels)
        fresh = dict(zip(todo, decoded))
        images = [fresh[i] if i in fresh else kept[i] for i in idx]
        idx = [i for i, im in zip(idx, images) if im is not None]
        images = [im for im in images if im is not None]
        boxes = [json.loads(batch["boxes"][i]) for i in idx]
        results = self.step(
            images,
            boxes,
            [batch["caption"][i] for i in idx],
            keys=[batch["key"][i] for i in idx],
        )
        for res, b in zip(results, boxes):
            res.boxes = b
        self.watch.see([(r.status, r.error) for r in results])
        return score_table(self.cfg, batch, status, dict(zip(idx, results)), self.step.columns)


def score_table(
    cfg: Config, batch: Batch, status: np.ndarray, results: dict[int, Any], columns: list[str]
) -> pa.Table:
    """The score rows of a batch: ROW_COLUMNS, the final status, n_text_boxes, text_area,
    boxes, the score columns (and ocr_text + caption with recognize_text); `results` maps row
    -> SampleScore for the rows that were scored."""
    n = len(batch["kind"])
    n_boxes, area = np.zeros(n, np.int32), np.zeros(n, np.float32)
    scores = {name: np.full(n, np.nan, np.float32) for name in columns}
    ocr: list[str | None] = [None] * n
    boxes: list[list | None] = [None] * n
    for i, res in results.items():
        status[i] = res.status
        n_boxes[i], area[i], ocr[i], boxes[i] = (
            res.n_text_boxes, res.text_area, res.ocr_text, res.boxes,
        )  # fmt: skip
        for name, value in res.scores.items():
            scores[name][i] = value
    out: dict[str, Any] = {k: batch[k] for k in ROW_COLUMNS if k in batch}
    out.update(status=status, n_text_boxes=n_boxes, text_area=area, **scores)
    if not cfg.score_original:  # not computed: null, not a number
        for name in ("clip_score", "clip_score_2"):
            if name in out:
                out[name] = pa.array(out[name], mask=np.ones(n, bool), type=pa.float32())
    out["boxes"] = pa.array(boxes, type=pa.list_(pa.list_(pa.float32())))
    if cfg.recognize_text:
        out["ocr_text"] = pa.array(ocr, type=pa.string())
        out["caption"] = pa.array(batch["caption"].tolist(), type=pa.string())
    return pa.table(out)


class TmarsStage(MaskScoreStage):
    """Detection, masking and scoring in one actor (the default; on GPUs both models share the
    device, and the image bytes cross the object store once instead of twice)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.detect = DetectStage(cfg)
        self.detect.keep_images = True

    def device_report(self) -> dict[str, dict[str, Any]]:
        return {**self.detect.device_report(), **super().device_report()}

    def __call__(self, batch: Batch) -> pa.Table:
        return super().__call__(self.detect(batch))


class DeviceTmarsStage:
    """The fused stage on a GPU (`models.gpu_step.DeviceTmarsStep`): JPEGs decoded on the
    device in batches, the torch twin of the detector, masking and CLIP scoring batched there;
    only DB post-processing, mask plans and tokenising are host work."""

    def __init__(self, cfg: Config) -> None:
        from tmars_ray.models.gpu_step import DeviceTmarsStep

        threads = cfg.model_thread_count(cfg.score_num_cpus)
        self.cfg = cfg
        self.step = DeviceTmarsStep(
            cfg.detector_settings(threads),
            cfg.clip_specs(),
            cfg.scoring_settings(threads),
            cfg.mask_settings(),
            device=cfg.model_device("score"),
            det_precision=cfg.precision,
        )
        self.watch = FailureWatch("score")

    def device_report(self) -> dict[str, dict[str, Any]]:
        return self.step.device_report()

    @property
    def model_ids(self) -> list[str]:
        return [s.identifier for s in self.step.scorers]

    def __call__(self, batch: Batch) -> pa.Table:
        idx = np.flatnonzero(_in_play(batch))
        results = self.step(
            [batch["image_bytes"][i] for i in idx],
            [batch["caption"][i] for i in idx],
            self.cfg.max_image_pixels,
        )
        self.watch.see([(r.status, r.error) for r in results])
        status = batch["status"].astype(object)
        return score_table(self.cfg, batch, status, dict(zip(idx, results)), self.step.columns)


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
