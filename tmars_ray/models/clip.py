"""CLIP re-scoring with open_clip: cosine(image, caption) for the original and the masked image.

Weights: an open_clip pretrained tag, or a local checkpoint (.pt/.bin/.safetensors), loaded
with `weights_only=True` (no code execution). When weights cannot be had we fail in seconds
with a message that says how to provide them; random weights only with an explicit opt-in.

Determinism: CPU GEMM kernels give slightly different results for tiny batches (< 8 rows here)
than for larger ones, and CUDA kernels may depend on the batch shape. Encoder calls are
therefore padded to a fixed minimum (CPU) or to exactly `batch_size` rows (CUDA), which makes a
sample's score independent of which other samples share its batch: the same pool gives
bit-identical scores however it is sharded, batched or resumed.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

CPU_MIN_ROWS = 16  # measured: encoder outputs are batch-invariant from 8 rows up on x86 CPUs
RANDOM_WEIGHTS_WARNING = (
    "RANDOM CLIP WEIGHTS: scores carry no meaning (explicit --allow-random-weights)"
)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded and random weights were not allowed."""


@dataclass(frozen=True)
class ModelSpec:
    model: str
    pretrained: str | None
    allow_random: bool = False
    seed: int = 0

    @property
    def identifier(self) -> str:
        return f"{self.model}/{self.pretrained or 'random'}"


def model_specs(cfg) -> list[ModelSpec]:
    """The CLIP models a job scores with: the main one, plus the second checkpoint of
    c-ssft / c-rho when `clip_model_2` is set (seeded differently when both are random)."""
    specs = [
        ModelSpec(cfg.clip_model, cfg.clip_pretrained, cfg.allow_random_weights, cfg.random_seed)
    ]
    if cfg.clip_model_2:
        specs.append(
            ModelSpec(
                cfg.clip_model_2,
                cfg.clip_pretrained_2,
                cfg.allow_random_weights,
                cfg.random_seed + 1,
            )
        )
    return specs


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_unless_reachable() -> None:
    """Without network the hub client retries for ~45 s before giving up: when the hub cannot
    be reached, switch it to offline mode so a missing file fails at once."""
    if os.environ.get("HF_HUB_OFFLINE") or _hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hf_constants  # read the variable at import time

    hf_constants.HF_HUB_OFFLINE = True


def _register_model(model: str) -> str:
    """A path to an open_clip model-config JSON registers it; returns the model name to use."""
    import open_clip

    if model.endswith(".json") and os.path.exists(model):
        name = os.path.splitext(os.path.basename(model))[0]
        if name not in open_clip.list_models():
            open_clip.add_model_config(model)
        return name
    return model


def _help_message(spec: ModelSpec, reason: str) -> str:
    return (
        f"cannot load CLIP weights {spec.identifier}: {reason}\n"
        "  This machine cannot download them. Point the job at a local checkpoint instead:\n"
        f"    --clip-model {spec.model} --clip-pretrained /path/to/open_clip_model.safetensors\n"
        "  (download it where there is network, e.g. from the Hugging Face repo named in\n"
        "  open_clip.get_pretrained_cfg(model, tag)['hf_hub']), or pre-fill the HF cache\n"
        "  (HF_HOME) on every node. For tests/demos only: --allow-random-weights."
    )


def _pretrained_value(spec: ModelSpec) -> str | None:
    value = spec.pretrained
    return None if (value or "").lower() in ("", "none", "random") else value


def ensure_weights(spec: ModelSpec) -> str | None:
    """Make sure the weights of `spec` are on this machine (downloading them when there is
    network); returns their local path, or raises WeightsUnavailable within seconds."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    name = _register_model(spec.model)
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown open_clip model {spec.model!r}; see open_clip.list_models()")
    pretrained = _pretrained_value(spec)
    if pretrained is None:
        raise WeightsUnavailable(_help_message(spec, "no pretrained tag or checkpoint given"))
    if os.path.exists(pretrained):
        return pretrained
    if name.startswith(("hf-hub:", "local-dir:")):
        return None  # these schemas name their own weights; open_clip resolves them at load
    if "/" in pretrained:
        raise WeightsUnavailable(_help_message(spec, f"no checkpoint at {pretrained}"))
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(f"{name} has no pretrained tag {pretrained!r} (known: {tags})")
    _offline_unless_reachable()
    try:
        return download_pretrained(cfg)
    except Exception as err:  # noqa: BLE001 - any failure here means: not available
        raise WeightsUnavailable(_help_message(spec, str(err).splitlines()[0])) from None


def load_model(spec: ModelSpec, device: str = "cpu"):
    """(model, preprocess, tokenizer, is_random) for a spec, on `device`, in eval mode."""
    import open_clip
    import torch

    name = _register_model(spec.model)
    try:
        ensure_weights(spec)  # validates the spec; fails fast when weights cannot be had
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=_pretrained_value(spec), device=device, weights_only=True
        )
        is_random = False
    except (RuntimeError, OSError) as err:
        if not spec.allow_random:
            if isinstance(err, WeightsUnavailable):
                raise
            raise WeightsUnavailable(_help_message(spec, str(err).splitlines()[0])) from None
        log.warning("%s; %s", str(err).splitlines()[0], RANDOM_WEIGHTS_WARNING)
        torch.manual_seed(spec.seed)  # every actor on every node builds the same random model
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, device=device, pretrained_text=False
        )
        is_random = True
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name), is_random


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ClipScorer:
    """One open_clip model, loaded once; scores (image, caption) pairs in fixed-shape batches."""

    def __init__(
        self,
        spec: ModelSpec,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 32,
    ) -> None:
        import torch

        self.spec = spec
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model, self.preprocess, self.tokenizer, self.is_random = load_model(spec, self.device)
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        if self.device == "cpu":
            self.autocast_dtype = None  # autocast on CPU is slower and changes scores

    @property
    def identifier(self) -> str:
        return f"{self.spec.model}/{'random' if self.is_random else self.spec.pretrained}"

    def _run(self, encode, inputs):
        """Encode `inputs` (a tensor) in chunks padded to a fixed row count; L2-normalised."""
        import torch

        pad_to = self.batch_size if self.device == "cuda" else CPU_MIN_ROWS
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            n = len(chunk)
            if n < pad_to:
                chunk = torch.cat([chunk, chunk[:1].expand(pad_to - n, *chunk.shape[1:])])
            with (
                torch.no_grad(),
                torch.autocast(
                    self.device, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
                ),
            ):
                emb = encode(chunk.to(self.device, non_blocking=True))[:n].float()
            out.append(torch.nn.functional.normalize(emb, dim=-1))
        return torch.cat(out) if out else torch.empty(0)

    def encode_images(self, images: list) -> np.ndarray:
        """Images: PIL images or HxWx3 uint8 arrays. Uses the model's own preprocessing."""
        import torch
        from PIL import Image

        if not images:
            return np.zeros((0, 0), np.float32)
        pixels = torch.stack(
            [
                self.preprocess(im if isinstance(im, Image.Image) else Image.fromarray(im))
                for im in images
            ]
        )
        return self._run(self.model.encode_image, pixels).cpu().numpy()

    def encode_texts(self, captions: list[str]) -> np.ndarray:
        if not captions:
            return np.zeros((0, 0), np.float32)
        tokens = self.tokenizer(captions)  # truncates to the model's context length
        return self._run(self.model.encode_text, tokens).cpu().numpy()

    def score(
        self, originals: list, masked: list, captions: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(clip_score, tmars_score) per sample. `masked[i] is None` means no text was found:
        the image is encoded once and tmars_score == clip_score."""
        with_text = [i for i, m in enumerate(masked) if m is not None]
        emb = self.encode_images(list(originals) + [masked[i] for i in with_text])
        txt = self.encode_texts(captions)
        n = len(originals)
        clip = np.einsum("ij,ij->i", emb[:n], txt) if n else np.zeros(0, np.float32)
        tmars = clip.copy()
        if with_text:
            tmars[with_text] = np.einsum("ij,ij->i", emb[n:], txt[with_text])
        return clip.astype(np.float32), tmars.astype(np.float32)
