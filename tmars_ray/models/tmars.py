"""The per-sample T-MARS step: detect text -> mask it -> CLIP-score original and masked image.

One implementation serves the Ray job (whose two actor pools run the two halves, `DetectStep`
and `MaskScoreStep`) and `tmars inspect` (`TmarsStep`, both halves in one process), so what
inspect prints is what the job writes. Failures become the sample statuses of `data.schema`;
one bad sample never fails its batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tmars_ray.data import schema
from tmars_ray.models.settings import (
    ClipSpec,
    DetectorSettings,
    MaskSettings,
    RecognizerSettings,
    ScorerSettings,
    TmarsSettings,
)

log = logging.getLogger(__name__)

__all__ = [
    "DetectStep",
    "Detection",
    "FailureWatch",
    "FatalStepError",
    "MaskScoreStep",
    "SampleScore",
    "TmarsStep",
    "score_columns",
]


class FatalStepError(RuntimeError):
    """A failure of the step itself - a device error, a broken model - not of one sample: the
    actor stops and the job fails naming the stage, instead of writing a column of errors."""

    def __init__(self, stage: str, err: BaseException | str, device: str = "") -> None:
        where = f" on {device}" if device else ""
        what = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        super().__init__(f"{stage} stage{where}: {what}")
        self.stage = stage
        self.input = ""  # the shard and keys of the batch (set by the stage's batch wrapper)

    def __reduce__(self):  # crosses Ray's process boundary with its message, stage and input
        return (_rebuild_fatal, (self.stage, str(self), self.input))


def _rebuild_fatal(stage: str, message: str, input: str = "") -> FatalStepError:
    err = FatalStepError(stage, "")
    err.args, err.input = (message,), input
    return err


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA (or other accelerator) out of memory: the batch is split, never the job failed."""
    import torch

    return isinstance(err, torch.OutOfMemoryError)


def release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class FailureWatch:
    """Stops a step whose first samples all fail with one and the same error (a broken model
    or device, not bad inputs): a `FatalStepError` early instead of a column of errors."""

    def __init__(self, stage: str, at_least: int = 8, window: int = 256) -> None:
        self.stage, self.at_least, self.window = stage, at_least, window
        self.errors: list[str | None] = []
        self.armed = True

    def see(self, outcomes: Sequence[tuple[str, str | None]]) -> None:
        """(status, error) of the samples that reached the model in one batch."""
        if not self.armed:
            return
        for status, error in outcomes:
            if status in ("", schema.OK):
                self.armed = False  # one sample went through: not a broken step
                return
            if status in (schema.DETECT_ERROR, schema.SCORE_ERROR):
                self.errors.append(error)
            # other statuses (decode_error, too_large, oom) are the input's, not the step's
        if len(set(self.errors)) > 1 or len(self.errors) >= self.window:
            self.armed = False
        elif len(self.errors) >= self.at_least:
            raise FatalStepError(
                self.stage, f"its first {len(self.errors)} samples all failed with {self.errors[0]}"
            )


def record_scores(samples: Sequence[SampleScore], results: Sequence, columns: list[str]) -> None:
    """Each model's (clip, tmars) score arrays into the samples; a non-finite tmars_score is
    `score_error`."""
    for k, sample in enumerate(samples):
        for j, (clip, tmars) in enumerate(results):
            sample.scores[columns[2 * j]] = float(clip[k])
            sample.scores[columns[2 * j + 1]] = float(tmars[k])
        ok = math.isfinite(sample.scores["tmars_score"])
        sample.status = schema.OK if ok else schema.SCORE_ERROR


def score_columns(n_models: int) -> list[str]:
    """Score columns for `n_models` CLIP models: clip_score, tmars_score[, ..._2]."""
    cols = ["clip_score", "tmars_score"]
    return cols + (["clip_score_2", "tmars_score_2"] if n_models > 1 else [])


@dataclass
class Detection:
    """Text found in one image. `status` is "" (go on) or `schema.DETECT_ERROR`."""

    status: str = ""
    polygons: list[np.ndarray] = field(default_factory=list)  # (N, 2) float32, original pixels
    error: str | None = None

    @property
    def boxes(self) -> list[list[float]]:
        """Score-table form: one flat [x0, y0, x1, y1, ...] list per polygon."""
        return [np.asarray(p, np.float32).reshape(-1).tolist() for p in self.polygons]


@dataclass
class SampleScore:
    """One sample after masking and scoring. `status` is `schema.OK` or `schema.SCORE_ERROR`
    (or the detection's status when `TmarsStep` stopped earlier)."""

    status: str
    n_text_boxes: int = 0
    text_area: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)  # NaN: not computed
    ocr_text: str | None = None
    masked: np.ndarray | None = None  # only with keep_masked=True
    error: str | None = None
    boxes: list[list[float]] = field(default_factory=list)  # set by TmarsStep


class DetectStep:
    """The detection half: images -> Detection per image."""

    def __init__(self, settings: DetectorSettings) -> None:
        from tmars_ray.models.detect import TextDetector

        self.detector = TextDetector(settings)
        log.info("text detector runs on %s", self.device_report()["detector"])

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detection]:
        out = []
        for res in self.detector.detect(images) if len(images) else []:
            if res.error:
                out.append(Detection(schema.DETECT_ERROR, [], res.error))
            else:
                out.append(Detection("", res.polygons))
        return out

    def device_report(self) -> dict[str, dict[str, Any]]:
        report = {"detector": self.detector.device_report()}
        if self.detector._verifier is not None:
            report["verifier"] = self.detector._verifier.device_report()
        return report


class MaskScoreStep:
    """The masking + scoring half: (image, polygons, caption) -> SampleScore per sample."""

    def __init__(
        self,
        clips: Sequence[ClipSpec],
        scorer: ScorerSettings,
        mask: MaskSettings | None = None,
        recognizer: RecognizerSettings | None = None,
    ) -> None:
        from tmars_ray.models.clip import ClipScorer

        if not clips:
            raise ValueError("at least one CLIP model is needed")
        self.mask = mask or MaskSettings()
        self.scorers = [ClipScorer(spec, scorer) for spec in clips]
        self.recognizer = None
        if recognizer is not None:
            from tmars_ray.models.recognize import TextRecognizer

            self.recognizer = TextRecognizer(recognizer)
        self.columns = score_columns(len(self.scorers))
        # mask where the models preprocess: on their device, when all of them do it in torch
        self.on_device = all(s.tensor_input for s in self.scorers) and (
            len({s.device for s in self.scorers}) == 1
        )
        for name, use in self.device_report().items():
            log.info("%s runs on %s", name, use)

    @property
    def model_ids(self) -> list[str]:
        return [s.identifier for s in self.scorers]

    @property
    def random_weights(self) -> bool:
        return any(s.is_random for s in self.scorers)

    def device_report(self) -> dict[str, dict[str, Any]]:
        report = {}
        for j, scorer in enumerate(self.scorers):
            report["clip" if j == 0 else f"clip_{j + 1}"] = scorer.device_report()
        if self.recognizer is not None:
            report["recognizer"] = self.recognizer.device_report()
        return report

    def __call__(
        self,
        images: Sequence[np.ndarray],
        polygons: Sequence[Sequence[np.ndarray]],
        captions: Sequence[str],
        keys: Sequence[str] | None = None,
        keep_masked: bool = False,
    ) -> list[SampleScore]:
        """Mask each image's polygons and score original and masked image against its caption.
        `keys` only name samples in log messages. When every model preprocesses in torch, the
        image is moved to the models' device once and masked there (`mask_torch`, same pixels)."""
        out: list[SampleScore] = []
        originals, masked, texts, kept = [], [], [], []
        for i, (image, polys) in enumerate(zip(images, polygons)):
            polys = [np.asarray(p, np.float32).reshape(-1, 2) for p in polys]
            try:
                ocr = None
                if self.recognizer is not None and polys:
                    ocr = self.recognizer.recognize(image, polys)
                model_image, res = self._mask(image, polys)
            except Exception as err:  # noqa: BLE001 - one bad image must not fail the batch
                name = keys[i] if keys is not None else i
                log.warning("masking failed for %s: %s", name, err)
                out.append(SampleScore(schema.SCORE_ERROR, error=f"{type(err).__name__}: {err}"))
                continue
            has_text = res.n_text_boxes > 0
            kept_image = None
            if keep_masked:
                kept_image = res.masked if isinstance(res.masked, np.ndarray) else None
                if kept_image is None:  # a tensor on the device
                    kept_image = res.masked.cpu().numpy()
            out.append(
                SampleScore(
                    "", res.n_text_boxes, float(res.text_area), ocr_text=ocr, masked=kept_image
                )
            )
            originals.append(model_image)
            masked.append(res.masked if has_text else None)
            texts.append(captions[i])
            kept.append(i)
        if kept:
            self._score([out[i] for i in kept], originals, masked, texts)
        return out

    def _mask(self, image: np.ndarray, polys: list[np.ndarray]) -> tuple[Any, Any]:
        """(the image as the models take it, its masking result)."""
        if self.on_device:
            import torch

            from tmars_ray.models.mask_torch import mask_text_torch

            tensor = torch.from_numpy(np.ascontiguousarray(image)).to(self.scorers[0].device)
            return tensor, mask_text_torch(tensor, polys, self.mask.ring)
        from tmars_ray.models.mask import mask_text

        return image, mask_text(image, polys, self.mask.ring)

    def _score(self, samples: list[SampleScore], originals, masked, captions) -> None:
        """Every model scores every sample. Out of memory: the batch is split down to one
        sample (status oom). Another error: fatal on a device; on the CPU the call is retried
        sample by sample to isolate the bad one (status score_error)."""
        try:
            results = [scorer.score(originals, masked, captions) for scorer in self.scorers]
        except Exception as err:  # noqa: BLE001 - sorted below
            if is_out_of_memory(err):  # split down to one sample, then status oom
                release_cached_memory()
                if len(samples) == 1:
                    samples[0].status, samples[0].error = schema.OOM, "out of memory alone"
                    return
                half = len(samples) // 2
                for part in (slice(0, half), slice(half, None)):
                    self._score(samples[part], originals[part], masked[part], captions[part])
                return
            if self.scorers[0].device != "cpu":  # a device error, not a bad sample
                raise FatalStepError("score", err, self.scorers[0].device) from err
            # on the CPU: retry one by one to isolate the bad sample
            if len(samples) == 1:
                log.warning("scoring failed: %s", err)
                samples[0].status = schema.SCORE_ERROR
                samples[0].error = f"{type(err).__name__}: {err}"
                return
            for k, sample in enumerate(samples):
                self._score([sample], [originals[k]], [masked[k]], [captions[k]])
            return
        record_scores(samples, results, self.columns)


class TmarsStep:
    """Both halves in one process: images + captions -> SampleScore (with boxes)."""

    def __init__(self, settings: TmarsSettings) -> None:
        self.detect = DetectStep(settings.detector)
        self.mask_score = MaskScoreStep(
            settings.clips, settings.scorer, settings.mask, settings.recognizer
        )

    def device_report(self) -> dict[str, dict[str, Any]]:
        return {**self.detect.device_report(), **self.mask_score.device_report()}

    def __call__(
        self,
        images: Sequence[np.ndarray],
        captions: Sequence[str],
        keep_masked: bool = False,
    ) -> list[SampleScore]:
        detections = self.detect(images)
        go = [i for i, d in enumerate(detections) if not d.status]
        scored = self.mask_score(
            [images[i] for i in go],
            [detections[i].polygons for i in go],
            [captions[i] for i in go],
            keep_masked=keep_masked,
        )
        out = [SampleScore(d.status, error=d.error) for d in detections]
        for i, sample in zip(go, scored):
            sample.boxes = detections[i].boxes
            out[i] = sample
        return out
