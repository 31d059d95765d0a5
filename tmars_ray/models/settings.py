"""The small settings objects the models take (built from the job's Config by `config.py`).

Models never see the whole job configuration: each one gets only what changes what it computes
or where it runs, so it can be built and tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ClipSpec",
    "DetectorSettings",
    "MaskSettings",
    "ModelSpec",
    "RecognizerSettings",
    "ScorerSettings",
    "TmarsSettings",
]

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DetectorSettings:
    """A PP-OCR DB text detector and how it runs."""

    model: str = "PP-OCRv5_mobile_det"  # packaged name, PaddleOCR name or a model directory
    engine: str = "onnxruntime"  # or "paddle"
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # intra-op threads of the inference engine (0: the engine's default)
    limit_side_len: int = 960
    limit_type: str = "max"
    thresh: float = 0.3
    box_thresh: float = 0.6
    unclip_ratio: float = 1.5
    box_type: str = "quad"
    batch_size: int = 8
    # > 0: OCR squat boxes and drop those reading fewer letters/digits (solid shapes)
    min_text_chars: int = 0
    # Side step of the per-image canvas (see detect.canvas_shape); 0: 32 on CPU, 128 on CUDA
    canvas_step: int = 0
    cache_dir: str | None = None


@dataclass(frozen=True)
class RecognizerSettings:
    """The PP-OCR text recogniser (ocr_text column, box verification)."""

    device: str = "auto"
    threads: int = 0
    batch_size: int = 32  # crops per call
    min_score: float = 0.5
    cache_dir: str | None = None


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP model: open_clip name (or config JSON) + pretrained tag or checkpoint path."""

    model: str
    pretrained: str | None
    allow_random: bool = False
    seed: int = 0

    @property
    def identifier(self) -> str:
        return f"{self.model}/{self.pretrained or 'random'}"


ModelSpec = ClipSpec  # the historical name, still used by callers


@dataclass(frozen=True)
class ScorerSettings:
    """How CLIP scoring runs: device, precision, rows per encoder call."""

    device: str = "auto"
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast, CUDA only)
    batch_size: int = 32
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    # False: only the masked image is encoded (clip_score is null; tmars_score unchanged)
    score_original: bool = True
    # Captions run on their real token length rounded up to this step (0: full context)
    text_length_step: int = 8
    # Image preprocessing: "pil" (open_clip's own, exact), "torch" (batched on the device,
    # within preprocess.SCORE_TOLERANCE of PIL), "auto" (torch on CUDA, pil on CPU)
    preprocess: str = "auto"


@dataclass(frozen=True)
class MaskSettings:
    ring: int = 3  # width of the ring whose mean colour fills a text region


@dataclass(frozen=True)
class TmarsSettings:
    """Everything the per-sample T-MARS step needs."""

    detector: DetectorSettings
    clips: tuple[ClipSpec, ...]
    scorer: ScorerSettings
    mask: MaskSettings = MaskSettings()
    recognizer: RecognizerSettings | None = None  # set: OCR the boxes into ocr_text
