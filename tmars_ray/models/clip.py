"""CLIP re-scoring with open_clip: cosine(image, caption) for the original and the masked image.

Weights: an open_clip pretrained tag, or a local checkpoint (.pt/.bin/.safetensors), loaded
with `weights_only=True` (no code execution). When weights cannot be had we fail in seconds
with a message that says how to provide them; random weights only with an explicit opt-in.

Determinism: CPU GEMM kernels give slightly different results for tiny batches (< 8 rows here)
than for larger ones, and CUDA kernels may depend on the batch shape. Encoder calls are
therefore padded to a fixed minimum (CPU) or to exactly `batch_size` rows (CUDA), which makes a
sample's score independent of which other samples share its batch: the same pool gives
bit-identical scores however it is sharded, batched or resumed.

Captions run on their real token length (rounded up to `text_length_step`) instead of the full
77-token context: under the causal attention mask the end-of-text token never sees the padding,
so the embedding is the same up to float summation order. Captions are grouped by that rounded
length, so a caption's embedding still does not depend on its batch companions.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

import numpy as np

from tmars_ray.models.aspect import centre_band, crops_centre_after_short_side_resize
from tmars_ray.models.device import DeviceUse, move_module, torch_device
from tmars_ray.models.settings import ClipSpec, ModelSpec, ScorerSettings

log = logging.getLogger(__name__)

__all__ = [
    "ClipScorer",
    "ClipSpec",
    "ModelSpec",
    "WeightsUnavailable",
    "ensure_weights",
    "load_model",
]

CPU_MIN_ROWS = 16  # measured: encoder outputs are batch-invariant from 8 rows up on x86 CPUs
RANDOM_WEIGHTS_WARNING = (
    "RANDOM CLIP WEIGHTS: scores carry no meaning (explicit --allow-random-weights)"
)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded and random weights were not allowed."""


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


# The demo model shipped in the package: the name is both its model and its pretrained tag.
DEMO_MODEL = "tmars-demo"
DEMO_MODEL_NOTE = "demo model trained on synthetic data - shows the mechanism, not for real pools"


def _packaged(name: str) -> str:
    """Path of a file shipped in tmars_ray/models/assets/."""
    from importlib import resources

    return str(resources.files("tmars_ray.models").joinpath("assets", name))


def _register_model(model: str) -> str:
    """A path to an open_clip model-config JSON registers it; returns the model name to use.
    The packaged demo model's name stands for its shipped config."""
    import open_clip

    if model == DEMO_MODEL:
        model = _packaged(f"{DEMO_MODEL}.json")
    if model.endswith(".json") and os.path.exists(model):
        name = os.path.splitext(os.path.basename(model))[0]
        with open(model) as f:
            content = json.load(f)
        if name in open_clip.list_models():
            # open_clip would keep the config it has and silently ignore this file
            if open_clip.get_model_config(name) != content:
                raise ValueError(
                    f"{model}: model config named {name!r} shadows another open_clip model "
                    "config of that name (a builtin one, or another file); rename the JSON "
                    "file (its name is the model's name)"
                )
        else:
            open_clip.add_model_config(model)
        return name
    return model


def _help_message(spec: ClipSpec, reason: str) -> str:
    return (
        f"cannot load CLIP weights {spec.identifier}: {reason}\n"
        "  This machine cannot download them. Point the job at a local checkpoint instead:\n"
        f"    --clip-model {spec.model} --clip-pretrained /path/to/open_clip_model.safetensors\n"
        "  (download it where there is network, e.g. from the Hugging Face repo named in\n"
        "  open_clip.get_pretrained_cfg(model, tag)['hf_hub']), or pre-fill the HF cache\n"
        "  (HF_HOME) on every node. For tests/demos only: --allow-random-weights."
    )


def _pretrained_value(spec: ClipSpec) -> str | None:
    value = spec.pretrained
    if value == DEMO_MODEL and spec.model == DEMO_MODEL:
        return _packaged(f"{DEMO_MODEL}.safetensors")  # then loads as any local checkpoint
    return None if (value or "").lower() in ("", "none", "random") else value


def ensure_weights(spec: ClipSpec) -> str | None:
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


def load_model(spec: ClipSpec, device: str = "cpu"):
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


def _text_length(tokens: np.ndarray, step: int) -> np.ndarray:
    """Per caption: the token count that holds its end-of-text token (the highest token id,
    which open_clip's argmax pooling reads), rounded up to `step`. Host work, on host tokens."""
    last = tokens.argmax(axis=-1)
    return np.minimum((last + step) // step * step, tokens.shape[1])


class ClipScorer:
    """One open_clip model, loaded once; scores (image, caption) pairs in fixed-shape batches."""

    def __init__(self, spec: ClipSpec, settings: ScorerSettings | None = None) -> None:
        s = settings or ScorerSettings()
        device = torch_device(s.device, f"CLIP {spec.identifier}")
        self._setup(spec, s, device, *load_model(spec, device))

    @classmethod
    def from_model(
        cls, spec: ClipSpec, settings: ScorerSettings, device: str, model, preprocess, tokenizer
    ) -> ClipScorer:
        """A scorer around an already-built model on `device` (tests: a model moved to a fake
        CUDA device; the device check of `__init__` is the caller's business here)."""
        scorer = cls.__new__(cls)
        scorer._setup(spec, settings, device, model, preprocess, tokenizer, False)
        return scorer

    def to(self, device: str) -> ClipScorer:
        """This scorer with its model on `device` (the fake-CUDA tests move a CPU-built model
        inside FakeTensorMode; jobs load on their device directly)."""
        moved = ClipScorer.from_model(
            self.spec, self.settings, device, move_module(self.model, device), self.preprocess,
            self.tokenizer,
        )  # fmt: skip
        moved.is_random = self.is_random
        return moved

    def _setup(self, spec, s, device, model, preprocess, tokenizer, is_random) -> None:
        import torch

        self.settings, self.spec, self.device = s, spec, device
        if s.threads > 0:
            torch.set_num_threads(s.threads)
        self.batch_size = max(1, s.batch_size)
        self.model, self.preprocess, self.tokenizer, self.is_random = (
            model,
            preprocess,
            tokenizer,
            is_random,
        )
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.precision)
        if self.device == "cpu":
            self.autocast_dtype = None  # autocast on CPU is slower and changes scores
        precision = s.precision if self.autocast_dtype is not None else "fp32"
        self.device_use = DeviceUse(self.device, precision)
        self._short_text = s.text_length_step > 0 and _standard_text_tower(self.model)
        # cost bounded by the output, not the aspect ratio (see models/aspect.py)
        self._band = crops_centre_after_short_side_resize(self.preprocess)
        self._tensor_pre = None
        if s.preprocess not in ("auto", "pil", "torch"):
            raise ValueError(f"preprocess must be auto, pil or torch, got {s.preprocess!r}")
        if s.preprocess == "torch" or (s.preprocess == "auto" and self.device == "cuda"):
            from tmars_ray.models.preprocess import TensorPreprocess

            self._tensor_pre = TensorPreprocess.from_transform(self.preprocess, self.device)
            if self._tensor_pre is None:
                log.info("%s: non-standard image transform, PIL preprocessing", spec.identifier)

    @property
    def identifier(self) -> str:
        return f"{self.spec.model}/{'random' if self.is_random else self.spec.pretrained}"

    @property
    def tensor_input(self) -> bool:
        """True when images are preprocessed in torch on `device` (they may arrive as H x W x C
        tensors there, e.g. masked on the device)."""
        return self._tensor_pre is not None

    def device_report(self) -> dict[str, Any]:
        """Device, precision and image preprocessing ("pil" or "torch") of this model."""
        return {**self.device_use.as_dict(), "preprocess": "torch" if self._tensor_pre else "pil"}

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
        return torch.cat(out) if out else torch.empty(0, device=self.device)

    def encode_images(self, images: list) -> np.ndarray:
        """Images: PIL images, HxWx3 uint8 arrays or HxWx3 uint8 tensors. Preprocessed by
        the model's own (PIL) transform, or its torch twin (`tensor_input`)."""
        if not images:
            return np.zeros((0, 0), np.float32)
        return to_host(self._images(images))

    def _images(self, images: list) -> Any:
        """`encode_images` as an N x D tensor on the device."""
        import torch
        from PIL import Image

        if self._band:
            images = [centre_band(im) for im in images]
        if self._tensor_pre is not None and not any(isinstance(im, Image.Image) for im in images):
            return self._run(self.model.encode_image, self._tensor_pre(images))

        def pil(im: Any) -> Image.Image:
            if isinstance(im, Image.Image):
                return im
            return Image.fromarray(im.cpu().numpy() if torch.is_tensor(im) else im)

        pixels = torch.stack([self.preprocess(pil(im)) for im in images])
        return self._run(self.model.encode_image, pixels)

    def encode_texts(self, captions: list[str], full_context: bool = False) -> np.ndarray:
        """L2-normalised caption embeddings; `full_context` runs all 77 positions (reference)."""
        if not captions:
            return np.zeros((0, 0), np.float32)
        return to_host(self._texts(captions, full_context))

    def _texts(self, captions: list[str], full_context: bool = False) -> Any:
        """`encode_texts` as an N x D tensor on the device. Tokens and their length buckets
        are host work; the embeddings, and the table they are gathered in, stay on the device."""
        import torch

        tokens, buckets = self.host_tokens(captions, full_context)
        if not buckets:
            return self._run(self.model.encode_text, tokens)
        out = None
        for length, rows in buckets:
            index = torch.from_numpy(rows)
            emb = self._run(lambda t: _encode_text_prefix(self.model, t), tokens[index, :length])
            if out is None:  # made where the embeddings are (on CUDA: not on the host)
                out = torch.zeros(len(captions), emb.shape[1], dtype=emb.dtype, device=emb.device)
            out[index.to(emb.device)] = emb
        return out

    def host_tokens(self, captions: list[str], full_context: bool = False) -> tuple[Any, list]:
        """Host work: the tokens (a CPU tensor, truncated to the model's context) and the
        (prefix length, rows) buckets to encode them in ([]: one full-context call)."""
        tokens = self.tokenizer(captions)
        if full_context or not self._short_text:
            return tokens, []
        lengths = _text_length(tokens.numpy(), self.settings.text_length_step)
        return tokens, [(int(n), np.flatnonzero(lengths == n)) for n in np.unique(lengths)]

    def score(
        self, originals: list, masked: list, captions: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(clip_score, tmars_score) per sample. `masked[i] is None` means no text was found:
        the image is encoded once and tmars_score == clip_score. Without `score_original`
        only the masked images are encoded and clip_score is NaN."""
        n = len(originals)
        if n == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        # embeddings stay on the device; one host copy per model call (the two score columns)
        txt = to_host(self._texts(captions))
        if not self.settings.score_original:
            views = [m if m is not None else o for o, m in zip(originals, masked)]
            tmars = np.einsum("ij,ij->i", to_host(self._images(views)), txt)
            return np.full(n, np.nan, np.float32), tmars.astype(np.float32)
        with_text = [i for i, m in enumerate(masked) if m is not None]
        emb = to_host(self._images(list(originals) + [masked[i] for i in with_text]))
        clip = np.einsum("ij,ij->i", emb[:n], txt)
        tmars = clip.copy()
        if with_text:
            tmars[with_text] = np.einsum("ij,ij->i", emb[n:], txt[with_text])
        return clip.astype(np.float32), tmars.astype(np.float32)


def to_host(tensor: Any) -> np.ndarray:
    """The one copy of embeddings from the device to the host (fake-CUDA tests stop here: a
    fake tensor has no values)."""
    return tensor.detach().float().cpu().numpy()


def _standard_text_tower(model: Any) -> bool:
    """open_clip's built-in CLIP text tower with a causal mask: the only one whose encode_text
    we know to be exact on a prefix of the tokens. Anything else runs the full context."""
    import open_clip

    return (
        type(model).encode_text is open_clip.CLIP.encode_text
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) == "argmax"
        and all(
            hasattr(model, a)
            for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
        )
    )


def _encode_text_prefix(model: Any, tokens: Any) -> Any:
    """open_clip's CLIP.encode_text on the first L token positions only (tokens: N x L)."""
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=None)
    if model.text_projection is not None:
        if hasattr(model.text_projection, "weight"):  # nn.Linear
            x = model.text_projection(x)
        else:
            x = x @ model.text_projection
    return x
