"""The fused T-MARS step fed in batches on one torch device: bytes + captions -> SampleScore.

Engine-free (no Ray, no Config), so the same code runs in a Ray actor and in process on an
offline GPU node (`devtools/bench_device.py`). Per batch:

1. decode (`decode_batch`): JPEGs in one `torchvision.io.decode_jpeg(list, device="cuda")`
   call; other formats, CMYK/odd-mode JPEGs and files without an end marker (PIL fails those:
   truncated) go through the CPU decoder, so statuses equal the CPU path's. On CPU, PIL only.
2. detect: each image resized on the device to its canvas (`detect.canvas_shape`) with the
   CPU path's pixels (`resize`: cv2.resize INTER_LINEAR in torch, bit-exact), grouped by
   canvas, row counts padded to a power of two (few fixed shapes), the torch twin of the ONNX
   detector (`torch_det`), one host copy of the small probability maps per group; DB
   post-processing (`db.py`) on the host.
3. mask: `mask_torch` - planned on the host from the polygons alone, applied on the device
   with no host sync per polygon; the same pixels as `mask.mask_text`.
4. score: `ClipScorer.score` with the device tensors (torch preprocessing on the device).
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from tmars_ray.data import schema
from tmars_ray.data.decode import decode_image
from tmars_ray.models import clip, db
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
from tmars_ray.models.mask_torch import apply_mask_plan, plan_mask
from tmars_ray.models.resize import resize_linear_u8
from tmars_ray.models.settings import ClipSpec, DetectorSettings, MaskSettings, ScorerSettings
from tmars_ray.models.tmars import (
    FatalStepError,
    SampleScore,
    is_out_of_memory,
    record_scores,
    release_cached_memory,
    score_columns,
)

__all__ = ["DeviceTmarsStep", "decode_batch"]

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


# ---------------------------------------------------------------------------------------------
# decode


def gpu_decodable(data: bytes, max_pixels: int) -> bool:
    """A JPEG nvJPEG decodes as PIL would: colour model RGB or L, complete, within the pixel
    limit (one header parse; CMYK, truncated and oversized files take the CPU decoder)."""
    if not data.startswith(_JPEG_SOI) or not data.rstrip(b"\0").endswith(_JPEG_EOI):
        return False
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - the CPU decoder gives the status
        return False
    w, h = im.size
    return im.format == "JPEG" and im.mode in ("RGB", "L") and 0 < w * h <= max_pixels


def decode_batch(
    datas: Sequence[bytes], max_pixels: int, device: str
) -> tuple[list[Any], list[str]]:
    """(3 x H x W uint8 RGB tensors on `device` or None, statuses) for encoded images."""
    import torch

    out: list[Any] = [None] * len(datas)
    status = [schema.OK] * len(datas)
    gpu = []
    if device == "cuda":
        gpu = [i for i, d in enumerate(datas) if d and gpu_decodable(d, max_pixels)]
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
                arr = arr if arr.flags.writeable else arr.copy()  # torch wants writable memory
                out[i] = torch.from_numpy(arr).permute(2, 0, 1).to(device)
    return out, status


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
        self.scorers = [clip.ClipScorer(spec, scorer) for spec in clips]
        self.columns = score_columns(len(self.scorers))
        self.stage_s: dict[str, float] = defaultdict(float)

    # -- stages ------------------------------------------------------------------------------
    def prob_maps(self, images: Sequence[Any]) -> dict[tuple[int, int], tuple[list[int], Any]]:
        """Per canvas: (indices into `images`, N x H x W maps on the device). Device work only
        (no host sync): the fake-CUDA tests run it on fake tensors."""
        import torch

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
                x = images[i]
                if tuple(x.shape[1:]) != canvas:  # the CPU path's pixels (its cv2.resize)
                    x = resize_linear_u8(x, canvas)
                rows.append(x.float())
            batch = torch.stack(rows).flip(1)  # RGB -> BGR, the detector's channel order
            pad = _bucket(len(idx), max(1, s.batch_size)) - len(idx)
            if pad > 0:
                batch = torch.cat([batch, batch.new_zeros((pad, *batch.shape[1:]))])
            out[canvas] = (idx, self.detector(batch)[: len(idx)])
        return out

    def polygons(self, images: Sequence[Any], maps) -> list[list[np.ndarray] | str]:
        """DB post-processing on the host: polygons in original pixels per image (an error
        message for an image whose post-processing failed: that sample's detect_error)."""
        found: list[list[np.ndarray] | str] = [[] for _ in images]
        for (ch, cw), (idx, prob) in maps.items():
            host = clip.to_host(prob)  # one copy per canvas group
            for i, p in zip(idx, host):
                h, w = images[i].shape[1:]
                scale = np.array([w / cw, h / ch], np.float32)
                hi = np.array([w - 1, h - 1], np.float32)
                try:
                    polys, _ = db.polygons(p, self.db_params)
                except Exception as err:  # noqa: BLE001 - one image, not the batch
                    found[i] = f"{type(err).__name__}: {err}"
                    continue
                found[i] = [np.clip(q * scale, 0, hi) for q in polys if len(q) >= 3]
        return found

    def to(self, device: str) -> DeviceTmarsStep:
        """Move both models (the fake-CUDA tests build on CPU and move inside FakeTensorMode)."""
        self.device = device
        self.detector.to(device)
        self.scorers = [sc.to(device) for sc in self.scorers]
        return self

    def __call__(
        self, datas: Sequence[bytes], captions: Sequence[str], max_pixels: int = 1 << 28
    ) -> list[SampleScore]:
        """One SampleScore (with boxes) per encoded image. CUDA out of memory: the batch is
        split in halves down to one sample (status `oom`); any other error of a batched model
        call is a `FatalStepError` (a broken device or model, not a bad sample)."""
        try:
            return self._batch(datas, captions, max_pixels)
        except Exception as err:  # noqa: BLE001 - sorted below
            if not is_out_of_memory(err):
                raise FatalStepError("score", err, self.device) from err
        release_cached_memory()
        if len(datas) == 1:
            return [SampleScore(schema.OOM, error="CUDA out of memory on this sample alone")]
        half = len(datas) // 2
        return self(datas[:half], captions[:half], max_pixels) + self(
            datas[half:], captions[half:], max_pixels
        )

    def _batch(
        self, datas: Sequence[bytes], captions: Sequence[str], max_pixels: int
    ) -> list[SampleScore]:
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
        samples = [out[i] for i in live]
        samples, originals, masked = self.mask_images(imgs, polys, samples)
        t4 = clock()
        self.score(samples, originals, masked, [captions[i] for i in live])
        t5 = clock()
        for name, dt in zip(
            ("decode", "detect", "db_post", "mask", "clip"),
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
        ):
            self.stage_s[name] += dt
        return out

    def mask_images(
        self, images: Sequence[Any], polys: Sequence, samples: list[SampleScore]
    ) -> tuple[list[SampleScore], list[Any], list[Any]]:
        """The samples that go on to scoring, with H x W x C views of their originals and
        masked copies (None: no text) on the device; boxes, box counts and text areas recorded
        in the samples. A failed detection or mask plan is that sample's status."""
        kept, originals, masked = [], [], []
        for im, found, sample in zip(images, polys, samples):
            if isinstance(found, str):
                sample.status, sample.error = schema.DETECT_ERROR, found
                continue
            hwc = im.permute(1, 2, 0)
            try:
                plan = plan_mask(found, hwc.shape[0], hwc.shape[1], self.mask.ring)
            except Exception as err:  # noqa: BLE001 - one image, not the batch
                sample.status, sample.error = schema.SCORE_ERROR, f"{type(err).__name__}: {err}"
                continue
            sample.boxes = [p.reshape(-1).tolist() for p in found]
            if plan is not None:
                sample.n_text_boxes, sample.text_area = plan.n_boxes, plan.text_area
            kept.append(sample)
            originals.append(hwc)
            masked.append(apply_mask_plan(hwc, plan) if plan is not None else None)
        return kept, originals, masked

    def device_report(self) -> dict[str, dict[str, Any]]:
        """What each model really runs on (the detector: its torch twin)."""
        det = {"device": self.device, "precision": self.detector.precision, "runtime": "torch"}
        clips = {
            "clip" if j == 0 else f"clip_{j + 1}": sc.device_report()
            for j, sc in enumerate(self.scorers)
        }
        return {"detector": det, **clips}

    def score(self, samples: list[SampleScore], originals, masked, captions) -> None:
        if not samples:
            return
        results = [sc.score(originals, masked, captions) for sc in self.scorers]
        record_scores(samples, results, self.columns)
