"""The fused T-MARS step fed in batches on one torch device: bytes + captions -> SampleScore.

Engine-free (no Ray, no Config), so the same code runs in a Ray actor and in process on an
offline GPU node (`devtools/bench_device.py`). Per batch:

1. decode (`decode_batch`): JPEGs in one `torchvision.io.decode_jpeg(list, device="cuda")`
   call; other formats, CMYK/odd-mode JPEGs and files without an end marker (PIL fails those:
   truncated) go through the CPU decoder, so statuses equal the CPU path's. On CPU, PIL only.
2. detect: each image resized on the device to its canvas (`detect.canvas_shape`), grouped by
   canvas, row counts padded to a power of two (few fixed shapes), the torch twin of the ONNX
   detector (`torch_det`), one host copy of the small probability maps per group; DB
   post-processing (`db.py`) on the host.
3. mask: every polygon's ring and fill pixels are rasterised on the host (OpenCV, on crops;
   the widening rule of `mask.py` needs only the masks, never the pixels); one transfer of index
   arrays per image, ring means by `index_add_` and fills by indexed assignment on the device:
   no host sync per polygon. Integer sums in float64: the same pixels as `mask.mask_text`.
4. score: `ClipScorer.score` with the device tensors (torch preprocessing on the device).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from tmars_ray.data import schema
from tmars_ray.data.decode import decode_image, probe_image
from tmars_ray.models import db
from tmars_ray.models.db import DBParams
from tmars_ray.models.detect import (
    MIN_SIDE,
    _normalisation,
    _onnx_file,
    _yml,
    canvas_shape,
    materialize_model_dir,
    target_shape,
)
from tmars_ray.models.mask import clip_polygons
from tmars_ray.models.settings import ClipSpec, DetectorSettings, MaskSettings, ScorerSettings
from tmars_ray.models.tmars import SampleScore, score_columns

__all__ = ["DeviceTmarsStep", "MaskPlan", "apply_mask_plan", "decode_batch", "plan_mask"]

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


# ---------------------------------------------------------------------------------------------
# decode


def _gpu_decodable(data: bytes, max_pixels: int) -> bool:
    """A JPEG nvJPEG decodes as PIL would: baseline colour model RGB/L, complete file."""
    if not data.startswith(_JPEG_SOI) or not data.rstrip(b"\0").endswith(_JPEG_EOI):
        return False
    w, h, status = probe_image(data, max_pixels)
    return not status and min(w, h) > 0


def decode_batch(
    datas: Sequence[bytes], max_pixels: int, device: str
) -> tuple[list[Any], list[str]]:
    """(3 x H x W uint8 RGB tensors on `device` or None, statuses) for encoded images."""
    import torch

    out: list[Any] = [None] * len(datas)
    status = [schema.OK] * len(datas)
    gpu = []
    if device == "cuda":
        import io

        from PIL import Image

        for i, d in enumerate(datas):
            if d and _gpu_decodable(d, max_pixels):
                try:
                    if Image.open(io.BytesIO(d)).mode in ("RGB", "L"):
                        gpu.append(i)
                except Exception:  # noqa: BLE001 - the CPU decoder gives the status
                    pass
    if gpu:
        from torchvision.io import ImageReadMode, decode_jpeg

        enc = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in gpu]
        try:
            decoded = decode_jpeg(enc, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file nvJPEG rejects fails the call: isolate it
            decoded = []
            for e in enc:
                try:
                    decoded.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, t in zip(gpu, decoded):
            out[i] = t
    for i, d in enumerate(datas):
        if out[i] is None:
            arr, st = decode_image(d, max_pixels)
            status[i] = st
            if arr is not None:
                out[i] = torch.from_numpy(arr).permute(2, 0, 1).to(device)
    return out, status


# ---------------------------------------------------------------------------------------------
# masking: host plan (masks only), device apply


@dataclass
class MaskPlan:
    """What the device needs to mask one image: flat pixel indices and polygon ids."""

    ring_idx: np.ndarray  # int64, ring pixels (may repeat across polygons)
    ring_pid: np.ndarray  # int64, the polygon each ring pixel belongs to
    counts: np.ndarray  # float64 per polygon: ring pixels (0: use the fallback mean)
    fill_idx: np.ndarray  # int64, each text pixel once: its last polygon fills it
    fill_pid: np.ndarray  # int64
    background: np.ndarray | None  # HxW bool non-text, only when a polygon needs the fallback
    n_text: int
    n_boxes: int


def _ring(own_full: np.ndarray, union: np.ndarray, bbox, r: int):
    h, w = union.shape
    x0, y0, x1, y1 = bbox
    cx0, cy0 = max(x0 - r, 0), max(y0 - r, 0)
    cx1, cy1 = min(x1 + r + 1, w), min(y1 + r + 1, h)
    own = own_full[cy0:cy1, cx0:cx1]
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
    ring = (cv2.dilate(own, kernel) > 0) & ~union[cy0:cy1, cx0:cx1]
    ys, xs = np.nonzero(ring)
    return (ys + cy0).astype(np.int64) * w + (xs + cx0)


def plan_mask(polygons: Sequence[np.ndarray], h: int, w: int, ring: int = 3) -> MaskPlan | None:
    """`mask.mask_text`'s rule as index arrays (None: nothing to mask)."""
    polys = clip_polygons(polygons, h, w) if h and w else []
    if not polys:
        return None
    ints = [np.rint(p).astype(np.int32) for p in polys]
    union_u8 = np.zeros((h, w), np.uint8)
    cv2.fillPoly(union_u8, [p.reshape(-1, 1, 2) for p in ints], 1)
    n_text = int(np.count_nonzero(union_u8))
    if n_text == 0:
        return None
    union = union_u8.astype(bool)
    owner = np.full((h, w), -1, np.int64)
    ring_idx, ring_pid, counts = [], [], []
    n_boxes, max_ring, need_fallback = 0, max(h, w), False
    own_full = np.zeros((h, w), np.uint8)
    for k, ip in enumerate(ints):
        bbox = (int(ip[:, 0].min()), int(ip[:, 1].min()), int(ip[:, 0].max()), int(ip[:, 1].max()))
        x0, y0, x1, y1 = bbox
        own_full[y0 : y1 + 1, x0 : x1 + 1] = 0
        cv2.fillPoly(own_full, [ip.reshape(-1, 1, 2)], 1)
        r = ring
        idx = _ring(own_full, union, bbox, r)
        while len(idx) == 0 and r < max_ring:
            r = min(r * 2, max_ring)
            idx = _ring(own_full, union, bbox, r)
        counts.append(float(len(idx)))
        need_fallback |= len(idx) == 0
        ring_idx.append(idx)
        ring_pid.append(np.full(len(idx), k, np.int64))
        inside = own_full[y0 : y1 + 1, x0 : x1 + 1].astype(bool)
        if inside.any():
            n_boxes += 1
            owner[y0 : y1 + 1, x0 : x1 + 1][inside] = k
        own_full[y0 : y1 + 1, x0 : x1 + 1] = 0
    fill_idx = np.flatnonzero(owner.reshape(-1) >= 0)
    return MaskPlan(
        np.concatenate(ring_idx),
        np.concatenate(ring_pid),
        np.asarray(counts, np.float64),
        fill_idx.astype(np.int64),
        owner.reshape(-1)[fill_idx],
        ~union if need_fallback else None,
        n_text,
        n_boxes,
    )


def apply_mask_plan(image: Any, plan: MaskPlan) -> Any:
    """The masked copy of a C x H x W uint8 tensor (on its device), no host sync."""
    import torch

    dev = image.device
    c, h, w = image.shape
    flat = image.reshape(c, h * w).t()  # (HW, C) view

    def put(a: np.ndarray) -> Any:
        return torch.from_numpy(a).to(dev, non_blocking=True)

    counts = put(plan.counts)
    sums = torch.zeros((len(plan.counts), c), dtype=torch.float64, device=dev)
    sums.index_add_(0, put(plan.ring_pid), flat[put(plan.ring_idx)].double())
    means = sums / counts.clamp(min=1)[:, None]
    if plan.background is not None:  # polygons whose ring found no background at any width
        bg = plan.background.reshape(-1)
        n_bg = int(bg.sum())
        weights = put(bg if n_bg else np.ones(h * w, bool)).double()
        fallback = (flat.double() * weights[:, None]).sum(0) / float(n_bg or h * w)
        means = torch.where((counts == 0)[:, None], fallback[None], means)
    fill = torch.clamp(torch.round(means), 0, 255).to(torch.uint8)
    masked = flat.clone()
    masked[put(plan.fill_idx)] = fill[put(plan.fill_pid)]
    return masked.t().reshape(c, h, w)


# ---------------------------------------------------------------------------------------------
# the step


def _bucket(n: int, cap: int) -> int:
    """Rows of a detector call: the next power of two (few shapes), at most `cap`."""
    return min(max(1, 1 << (n - 1).bit_length()), max(cap, n))


class DeviceTmarsStep:
    """Detection (torch twin of the ONNX detector), masking and CLIP scoring, batched on one
    device. Only the packaged/ONNX DB detectors with plain DB post-processing are supported."""

    def __init__(
        self,
        detector: DetectorSettings,
        clips: Sequence[ClipSpec],
        scorer: ScorerSettings,
        mask: MaskSettings | None = None,
        device: str = "cuda",
        det_precision: str = "fp16",
    ) -> None:
        from tmars_ray.models.clip import ClipScorer
        from tmars_ray.models.torch_det import TorchDBDetector

        self.device = device
        self.settings = detector
        self.mask = mask or MaskSettings()
        _, model_dir = materialize_model_dir(detector.model, detector.cache_dir)
        onnx = _onnx_file(model_dir)
        if onnx is None:
            raise ValueError(f"detector {detector.model!r}: the device step needs ONNX weights")
        self.detector = TorchDBDetector(
            onnx, *_normalisation(_yml(model_dir)), device=device, precision=det_precision
        )
        self.db_params = DBParams(
            detector.thresh, detector.box_thresh, detector.unclip_ratio, detector.box_type
        )
        self.canvas_step = detector.canvas_step or (32 if device == "cpu" else 128)
        self.scorers = [ClipScorer(spec, scorer) for spec in clips]
        self.columns = score_columns(len(self.scorers))
        self.stage_s: dict[str, float] = defaultdict(float)

    # -- stages ------------------------------------------------------------------------------
    def prob_maps(self, images: Sequence[Any]) -> dict[tuple[int, int], tuple[list[int], Any]]:
        """Per canvas: (indices into `images`, N x H x W maps on the device). Device work only
        (no host sync): the fake-CUDA tests run it on fake tensors."""
        import torch
        import torch.nn.functional as F

        s = self.settings
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            h, w = im.shape[1:]
            if min(h, w) >= MIN_SIDE:
                net = target_shape(h, w, s.limit_side_len, s.limit_type)
                groups[canvas_shape(net, self.canvas_step)].append(i)
        out = {}
        for canvas, idx in sorted(groups.items()):
            rows = []
            for i in idx:
                x = images[i][None].float()
                if tuple(x.shape[2:]) != canvas:  # bilinear like cv2.resize, rounded to uint8
                    x = F.interpolate(x, size=canvas, mode="bilinear", align_corners=False)
                    x = x.round_().clamp_(0, 255)
                rows.append(x[0])
            batch = torch.stack(rows).flip(1)  # RGB -> BGR, the detector's channel order
            pad = _bucket(len(idx), max(1, s.batch_size)) - len(idx)
            if pad > 0:
                batch = torch.cat([batch, batch.new_zeros((pad, *batch.shape[1:]))])
            out[canvas] = (idx, self.detector(batch)[: len(idx)])
        return out

    def polygons(self, images: Sequence[Any], maps) -> list[list[np.ndarray]]:
        """DB post-processing on the host: polygons in original pixels per image."""
        found: list[list[np.ndarray]] = [[] for _ in images]
        for (ch, cw), (idx, prob) in maps.items():
            host = prob.cpu().numpy()  # one copy per canvas group
            for i, p in zip(idx, host):
                h, w = images[i].shape[1:]
                scale = np.array([w / cw, h / ch], np.float32)
                hi = np.array([w - 1, h - 1], np.float32)
                polys, _ = db.polygons(p, self.db_params)
                found[i] = [np.clip(q * scale, 0, hi) for q in polys if len(q) >= 3]
        return found

    def __call__(
        self, datas: Sequence[bytes], captions: Sequence[str], max_pixels: int = 1 << 28
    ) -> list[SampleScore]:
        """One SampleScore (with boxes) per encoded image."""
        clock = time.perf_counter
        t0 = clock()
        images, status = decode_batch(datas, max_pixels, self.device)
        out = [SampleScore(st) for st in status]
        live = [i for i, im in enumerate(images) if im is not None]
        imgs = [images[i] for i in live]
        t1 = clock()
        maps = self.prob_maps(imgs)
        t2 = clock()
        polys = self.polygons(imgs, maps)  # waits for the detector
        t3 = clock()
        originals, masked = [], []
        for k, i in enumerate(live):
            im = imgs[k]
            plan = plan_mask(polys[k], im.shape[1], im.shape[2], self.mask.ring)
            out[i].boxes = [p.reshape(-1).tolist() for p in polys[k]]
            if plan is not None:
                out[i].n_text_boxes = plan.n_boxes
                out[i].text_area = plan.n_text / float(im.shape[1] * im.shape[2])
            originals.append(im.permute(1, 2, 0))
            masked.append(apply_mask_plan(im, plan).permute(1, 2, 0) if plan else None)
        t4 = clock()
        self._score([out[i] for i in live], originals, masked, [captions[i] for i in live])
        t5 = clock()
        for name, dt in zip(
            ("decode", "detect", "db_post", "mask", "clip"),
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
        ):
            self.stage_s[name] += dt
        return out

    def _score(self, samples: list[SampleScore], originals, masked, captions) -> None:
        if not samples:
            return
        results = [sc.score(originals, masked, captions) for sc in self.scorers]
        for k, sample in enumerate(samples):
            for j, (clip, tmars) in enumerate(results):
                sample.scores[self.columns[2 * j]] = float(clip[k])
                sample.scores[self.columns[2 * j + 1]] = float(tmars[k])
            ok = np.isfinite(sample.scores["tmars_score"])
            sample.status = schema.OK if ok else schema.SCORE_ERROR
