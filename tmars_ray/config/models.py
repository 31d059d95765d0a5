"""The models (CLI groups `detection` and `scoring`): text detector, mask, CLIP; and the
settings objects built from them (models take these, never Config). Every field here but the
batch sizes, device and precision changes a score row, so it is fingerprinted."""

from __future__ import annotations

from dataclasses import dataclass

from tmars_ray.config.options import opt
from tmars_ray.models.settings import (
    ClipSpec,
    DetectorSettings,
    MaskSettings,
    RecognizerSettings,
    ScorerSettings,
    TmarsSettings,
)


@dataclass
class DetectionOptions:
    detector: str = opt(
        "PP-OCRv5_mobile_det",
        "PaddleOCR det model name or a model directory. The default's weights ship inside a "
        "package (offline); other names are fetched by PaddleOCR.",
        "detection",
    )
    det_engine: str = opt(
        "onnxruntime", "Detector inference engine.", "detection", choices=["onnxruntime", "paddle"]
    )
    det_limit_side_len: int = opt(960, "Detector input size limit (pixels).", "detection")
    det_limit_type: str = opt(
        "max",
        "How the size limit applies: max (longest side <= limit) or min.",
        "detection",
        choices=["max", "min"],
    )
    det_thresh: float = opt(0.3, "DB pixel threshold.", "detection")
    det_box_thresh: float = opt(0.6, "DB box score threshold.", "detection")
    det_unclip_ratio: float = opt(1.5, "DB polygon expansion ratio.", "detection")
    det_box_type: str = opt(
        "quad", "Polygon format: quad (4 points) or poly.", "detection", choices=["quad", "poly"]
    )
    det_batch_size: int = opt(8, "Images per detector call.", "detection")
    det_min_text_chars: int = opt(
        0,
        "Drop squat boxes in which OCR reads fewer than this many letters/digits (0: off). "
        "2 removes detections on solid shapes (discs, rings) at the cost of a recognition pass.",
        "detection",
    )
    mask_ring: int = opt(
        3,
        "Width in pixels of the ring around each text region whose mean colour fills it.",
        "detection",
    )
    recognize_text: bool = opt(
        False,
        "Also OCR the detected boxes into `ocr_text` (needed by --method text-match).",
        "detection",
    )


@dataclass
class ScoringOptions:
    clip_model: str = opt("ViT-B-32", "open_clip model name.", "scoring")
    clip_pretrained: str = opt(
        "openai", "open_clip pretrained tag, or a path to a local checkpoint.", "scoring"
    )
    allow_random_weights: bool = opt(
        False,
        "Use seeded random CLIP weights when no pretrained ones are available. Scores then mean "
        "nothing; every output says so. For tests and demos only.",
        "scoring",
    )
    random_seed: int = opt(0, "Seed for random weights (same model on every actor).", "scoring")
    clip_model_2: str | None = opt(
        None,
        "Second open_clip model for c-ssft / c-rho (adds clip_score_2, tmars_score_2).",
        "scoring",
    )
    clip_pretrained_2: str | None = opt(None, "Tag or checkpoint of the second model.", "scoring")
    clip_batch_size: int = opt(32, "Images per CLIP call.", "scoring")
    device: str = opt(
        "auto",
        "Where models run: auto (cuda when present), cpu or cuda.",
        "scoring",
        choices=["auto", "cpu", "cuda"],
    )
    precision: str = opt(
        "fp32",
        "CLIP precision: fp32, or fp16 / bf16 autocast (GPU).",
        "scoring",
        choices=["fp32", "fp16", "bf16"],
    )
    clip_preprocess: str = opt(
        "auto",
        "CLIP image preprocessing: pil (open_clip's own, exact), torch (batched on the model's "
        "device, within 2e-3 of pil), auto (torch on CUDA, pil on CPU).",
        "scoring",
        choices=["auto", "pil", "torch"],
    )
    score_original: bool = opt(
        True,
        "Also encode the original image (clip_score). Off: only the masked image is encoded, "
        "clip_score is null; tmars_score and selection by tmars are unchanged.",
        "scoring",
    )


@dataclass
class ModelOptions(ScoringOptions, DetectionOptions):  # fields: detection's, then scoring's
    """Both model groups and the settings built from them."""

    def check_models(self) -> None:
        for name in ("det_batch_size", "clip_batch_size", "mask_ring"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def detector_settings(self, threads: int = 0) -> DetectorSettings:
        return DetectorSettings(
            model=self.detector,
            engine=self.det_engine,
            device=self.device,
            threads=threads,
            limit_side_len=self.det_limit_side_len,
            limit_type=self.det_limit_type,
            thresh=self.det_thresh,
            box_thresh=self.det_box_thresh,
            unclip_ratio=self.det_unclip_ratio,
            box_type=self.det_box_type,
            batch_size=self.det_batch_size,
            min_text_chars=self.det_min_text_chars,
        )

    def recognizer_settings(self, threads: int = 0) -> RecognizerSettings | None:
        """OCR of the boxes (ocr_text), or None when `recognize_text` is off."""
        if not self.recognize_text:
            return None
        return RecognizerSettings(
            device=self.device, threads=threads, batch_size=4 * self.det_batch_size
        )

    def clip_specs(self) -> list[ClipSpec]:
        """The CLIP models a job scores with: the main one, plus the second checkpoint of
        c-ssft / c-rho when `clip_model_2` is set (seeded differently when both are random)."""
        specs = [
            ClipSpec(
                self.clip_model, self.clip_pretrained, self.allow_random_weights, self.random_seed
            )
        ]
        if self.clip_model_2:
            specs.append(
                ClipSpec(
                    self.clip_model_2,
                    self.clip_pretrained_2,
                    self.allow_random_weights,
                    self.random_seed + 1,
                )
            )
        return specs

    def scoring_settings(self, threads: int = 0) -> ScorerSettings:
        return ScorerSettings(
            device=self.device,
            precision=self.precision,
            batch_size=self.clip_batch_size,
            threads=threads,
            score_original=self.score_original,
            preprocess=self.clip_preprocess,
        )

    def mask_settings(self) -> MaskSettings:
        return MaskSettings(ring=self.mask_ring)

    def tmars_settings(self, det_threads: int = 0, score_threads: int = 0) -> TmarsSettings:
        """Everything the per-sample T-MARS step needs (`tmars inspect`, benchmarks)."""
        return TmarsSettings(
            detector=self.detector_settings(det_threads),
            clips=tuple(self.clip_specs()),
            scorer=self.scoring_settings(score_threads),
            mask=self.mask_settings(),
            recognizer=self.recognizer_settings(score_threads),
        )
