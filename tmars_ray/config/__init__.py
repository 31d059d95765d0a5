"""Every knob of the job: one flat `Config`, loadable from YAML, overridable from the CLI.

YAML keys are the field names (`clip_model: ViT-B-32`); CLI flags are the same names with `-`
(`--clip-model ViT-B-32`). The CLI builds its options from `Config` fields, so a new knob
is added once and appears in YAML, `--help` and the summary's config dump.

The fields are declared by concern, one module each (`inputs`, `models`, `resources`,
`selection`, `job`), as dataclasses that `Config` inherits: a user still sees one flat set of
keys (`cfg.clip_model`, `dataclasses.replace(cfg, device=...)`), a reader one short module per
concern. A concern module's methods read only its own fields; what crosses concerns (loading,
devices, the fingerprint) lives here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from tmars_ray.config.fingerprint import SCORE_LIBRARIES, identity, library_versions
from tmars_ray.config.inputs import InputOptions
from tmars_ray.config.job import JobOptions
from tmars_ray.config.models import ModelOptions
from tmars_ray.config.resources import ResourceOptions
from tmars_ray.config.selection import SelectionOptions

__all__ = ["SCORE_LIBRARIES", "Config", "fields_by_group", "library_versions"]


# Dataclass fields follow the bases in reverse order: io, detection, scoring, resources,
# selection, job - the order of YAML dumps and of `--help`.
@dataclass
class Config(JobOptions, SelectionOptions, ResourceOptions, ModelOptions, InputOptions):
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
        self.check_selection()
        self.check_job()
        self.check_models()
        self.check_resources()

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
            fields[name] = identity(fields[name])
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

    def scoring_fingerprint(self) -> str:
        """Hash of everything that changes a score row: a shard scored under the same
        fingerprint is never scored again (resume, re-filtering)."""
        payload = json.dumps(self.fingerprint_fields()["fields"], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Old key -> new field name; the old key stays accepted in YAML and dicts.
_RENAMED = {"torch_threads": "model_threads"}


def fields_by_group(group: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.metadata["group"] == group]
