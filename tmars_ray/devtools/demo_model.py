"""Train the demo CLIP (`make demo-model`): a small open_clip model trained, on the project's
own synthetic pairs, both to see (pictures) and to read (rendered words).

It stands in for pretrained weights on machines that cannot download them, so that T-MARS's
effect is visible offline: such a model scores "text" pairs high on the original image and low
once the text is masked. The shipped one reads the generator's phrases (BENCHMARKS.md
section 6: numbers, recipe and why it needs a curriculum). It is shipped as
`tmars_ray/models/assets/tmars-demo.{json,safetensors}` and addressed as
`--clip-model tmars-demo --clip-pretrained tmars-demo`.

Reproducible: the training pairs are a pure function of (seed, index), rendered once and cached
under build/; the data order and initialisation come from fixed seeds; training runs on the
CPU with a fixed thread count. Plain PyTorch + open_clip's ClipLoss.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from tmars_ray.models.clip import DEMO_MODEL_NOTE

log = logging.getLogger(__name__)

MODEL_NAME = "tmars-demo"
# Seeds of the training pairs start here; demo pools, tests and benchmarks use small seeds
# (< TRAIN_SEED_BASE), so the model never sees a pool it is checked on.
TRAIN_SEED_BASE = 1_000_000


def asset_path(name: str) -> str:
    """Path of a file shipped in tmars_ray/models/assets/."""
    return str(resources.files("tmars_ray.models").joinpath("assets", name))


def config_path() -> str:
    return asset_path(f"{MODEL_NAME}.json")


def weights_path() -> str:
    return asset_path(f"{MODEL_NAME}.safetensors")


@dataclass(frozen=True)
class TrainSettings:
    samples: int = 16_000
    steps: int = 3_600
    # Curriculum: the first `reading_steps` see only close-ups of text lines captioned by their
    # words. Reading is slow to emerge from pool-scale pairs (pictures are learnt first and
    # dominate the loss); close-ups alone teach it, then the mixed pool keeps it.
    reading_steps: int = 2_400
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1  # on weights with >= 2 dims only (not norms, biases, logit scale)
    warmup_steps: int = 100
    text_warmup_steps: int = 200  # see warm_up_text_tower
    seed: int = TRAIN_SEED_BASE
    threads: int = 1  # the result depends on the thread count; 1 leaves a core for rendering
    reading: bool = True  # extra pairs captioned by the rendered words (see render_pairs)


# -- training pairs ---------------------------------------------------------------------------


def _preprocess_geometry(image_size: int):
    """The model's own resize + centre crop (everything before ToTensor/Normalize), so that
    cached pixels are exactly what the scoring path feeds the model."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
        ]
    )


READING_TEMPLATES = ("{t}", '"{t}"', 'the words "{t}"')


def _render_range(
    args: tuple[int, int, int, int, bool],
) -> tuple[np.ndarray, list[str], list[str]]:
    import io

    from PIL import Image

    from tmars_ray.devtools.synth import encode_jpeg, generate_sample

    seed, start, stop, image_size, reading = args
    geometry = _preprocess_geometry(image_size)
    images, captions, categories = [], [], []
    for i in range(start, stop):
        s = generate_sample(seed, i)
        # Through JPEG like a pool sample, so train and score inputs look alike.
        im = Image.open(io.BytesIO(encode_jpeg(s.image))).convert("RGB")
        images.append(np.asarray(geometry(im), np.uint8))
        captions.append(s.caption)
        categories.append(s.category)
        if not (reading and s.lines):
            continue
        template = READING_TEMPLATES[i % len(READING_TEMPLATES)]
        if s.category not in ("text", "neither"):
            # the same picture captioned by its words: reading, at the scale pools show it
            images.append(images[-1])
            captions.append(template.format(t=" ".join(ln.text for ln in s.lines)))
            categories.append("reading")
        # one line close up, captioned by its words: glyphs large enough to learn from
        line = s.lines[i % len(s.lines)]
        images.append(np.asarray(_crop_square(im, line.bbox, image_size), np.uint8))
        captions.append(template.format(t=line.text))
        categories.append("closeup")
    return np.stack(images), captions, categories


def _crop_square(im, bbox: tuple[int, int, int, int], size: int):
    """A square crop around `bbox` (a little margin, inside the image), resized to `size`."""
    from PIL import Image

    x0, y0, x1, y1 = bbox
    side = min(max(x1 - x0, y1 - y0) * 1.2, min(im.size))
    cx = min(max((x0 + x1) / 2, side / 2), im.size[0] - side / 2)
    cy = min(max((y0 + y1) / 2, side / 2), im.size[1] - side / 2)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return im.resize((size, size), Image.Resampling.BICUBIC, box=box)


RENDER_VERSION = 2  # bump when _render_range changes what it caches


def generator_version() -> str:
    """Short hash of the generator's source: cached pairs from an older generator are not reused."""
    from tmars_ray.devtools import synth, textdraw

    h = hashlib.sha256()
    for module in (synth, textdraw):
        with open(module.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:10]


def render_pairs(
    seed: int,
    samples: int,
    image_size: int,
    cache_dir: str | None = None,
    workers: int = 2,
    reading: bool = False,
) -> tuple[np.ndarray, list[str], list[str]]:
    """(images uint8 N x S x S x 3, captions, categories) of synthetic samples 0..N-1 of `seed`,
    in index order. With `reading`, each sample with text is followed by extra pairs captioned
    by its words: the whole picture (category "reading") and one line close up ("closeup").

    Rendered in fixed chunks, each cached on disk (rendering is most of the CPU cost of a short
    run; a longer run reuses the chunks of a shorter one)."""
    chunk = 500
    jobs = [
        (seed, a, min(a + chunk, samples), image_size, reading) for a in range(0, samples, chunk)
    ]

    version = f"-g{generator_version()}-r{RENDER_VERSION}" if cache_dir else ""

    def path(job: tuple[int, int, int, int, bool]) -> str | None:
        if not cache_dir:
            return None
        name = "pairs-{}-{}-{}-{}".format(*job[:4]) + ("-reading" if job[4] else "")
        name += version
        return os.path.join(cache_dir, name + ".npz")

    parts: dict[int, tuple[np.ndarray, list[str], list[str]]] = {}
    for k, job in enumerate(jobs):
        p = path(job)
        if p and os.path.exists(p):
            with np.load(p, allow_pickle=False) as z:
                parts[k] = (z["images"], list(z["captions"]), list(z["categories"]))
    todo = [k for k in range(len(jobs)) if k not in parts]

    def keep(k: int, part: tuple[np.ndarray, list[str], list[str]]) -> None:
        parts[k] = part
        p = path(jobs[k])
        if p:  # written as each chunk arrives: an interrupted run keeps what it rendered
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp-{os.getpid()}.npz"
            np.savez(tmp, images=part[0], captions=np.array(part[1]), categories=np.array(part[2]))
            os.replace(tmp, p)

    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for k, part in zip(todo, pool.imap(_render_range, [jobs[k] for k in todo])):
                keep(k, part)
    else:
        for k in todo:
            keep(k, _render_range(jobs[k]))
    ordered = [parts[k] for k in range(len(jobs))]
    if not ordered:
        return np.zeros((0, image_size, image_size, 3), np.uint8), [], []
    images = np.concatenate([p[0] for p in ordered])
    return images, [c for p in ordered for c in p[1]], [c for p in ordered for c in p[2]]


# -- model ------------------------------------------------------------------------------------


def create_model(config: str | None = None):
    """(model, preprocess, tokenizer) of the demo architecture with fresh weights."""
    import open_clip

    config = config or config_path()
    name = os.path.splitext(os.path.basename(config))[0]
    if name not in open_clip.list_models():
        open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model, preprocess, open_clip.get_tokenizer(name)


def input_size(model) -> int:
    """The side of the model's square input (open_clip stores an int or a pair)."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _normalise(images_u8, preprocess):
    """uint8 NHWC batch -> the model's normalised NCHW float tensor."""
    import torch

    norm = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (x - mean) / std


def train(
    settings: TrainSettings, cache_dir: str = "build/demo-model", config: str | None = None
) -> tuple[object, list[float]]:
    """Train the demo model from scratch; returns (model in eval mode, mean loss per epoch)."""
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    model, preprocess, tokenizer = create_model(config)
    t0 = time.time()
    images, captions, categories = render_pairs(
        settings.seed,
        settings.samples,
        input_size(model),
        cache_dir,
        workers=settings.threads,
        reading=settings.reading,
    )
    # "neither" captions describe something absent: pure noise for a contrastive model.
    cats = np.array(categories)
    use = cats != "neither"
    images, cats = images[use], cats[use]
    tokens = tokenizer([c for c, u in zip(captions, use, strict=True) if u])
    log.info("training pairs: %d (rendered/loaded in %.0f s)", len(images), time.time() - t0)
    warm_up_text_tower(model, tokenizer, settings)
    closeups = np.flatnonzero(cats == "closeup")
    phases = [(closeups, settings.reading_steps), (None, settings.steps - settings.reading_steps)]
    history = fit(model, preprocess, images, tokens, settings.steps, settings, phases=phases)
    return model, history


def warm_up_text_tower(model, tokenizer, settings: TrainSettings) -> None:
    """A few cheap steps of ClipLoss between two wordings of the same phrase, text tower only.

    A fresh text tower maps all phrases to nearly one direction (mean cosine ~0.75), so the
    image tower starts out chasing targets it cannot tell apart; afterwards they are spread
    (mean cosine ~0)."""
    import torch
    from open_clip.loss import ClipLoss

    from tmars_ray.devtools.synth import _VOCAB

    if settings.text_warmup_steps <= 0:
        return
    rng = np.random.default_rng(settings.seed)
    params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    params = [p for p in params if p is not model.logit_scale]
    opt = torch.optim.AdamW(params, lr=settings.lr)
    loss_fn, scale = ClipLoss(), model.logit_scale.exp().detach()
    vocab = list(_VOCAB)

    def encode(words: list[str]):
        templates = [READING_TEMPLATES[int(rng.integers(len(READING_TEMPLATES)))] for _ in words]
        feats = model.encode_text(tokenizer([t.format(t=w) for t, w in zip(templates, words)]))
        return torch.nn.functional.normalize(feats, dim=-1)

    for _ in range(settings.text_warmup_steps):
        words = [vocab[k] for k in rng.permutation(len(vocab))[:32]]
        words = [w.upper() if rng.random() < 0.3 else w for w in words]
        loss = loss_fn(encode(words), encode(words), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fit(
    model,
    preprocess,
    images: np.ndarray,
    tokens,
    steps: int,
    settings: TrainSettings,
    phases: list[tuple[np.ndarray | None, int]] | None = None,
) -> list[float]:
    """`steps` AdamW steps of open_clip's ClipLoss over (images, tokens), in epochs of a seeded
    permutation (warm-up, then cosine decay); the model ends in eval mode with its BatchNorm
    statistics recomputed on the training images. `phases` [(row indices or None for all,
    steps), ...] restricts the first steps to subsets (a curriculum). Returns the mean loss per
    epoch (per phase when phased)."""
    import torch
    from open_clip.loss import ClipLoss

    n, bs = len(images), settings.batch_size
    if n < bs:
        raise ValueError(f"{n} training pairs, fewer than one batch of {bs}")
    # No weight decay on norms, biases and the logit scale (as open_clip's own training does).
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name != "logit_scale" else rest).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        p = (step - settings.warmup_steps) / max(1, steps - settings.warmup_steps)
        return settings.lr * 0.5 * (1 + math.cos(math.pi * p))

    loss_fn = ClipLoss()
    order_rng = torch.Generator().manual_seed(settings.seed)
    history: list[float] = []
    step, t0 = 0, time.time()
    model.train()
    for rows, phase_steps in phases or [(None, steps)]:
        rows = np.arange(n) if rows is None else np.asarray(rows)
        end = min(steps, step + phase_steps)
        if end > step and len(rows) < bs:
            raise ValueError(f"{len(rows)} training pairs in a phase, fewer than one batch of {bs}")
        while step < end:
            perm = rows[torch.randperm(len(rows), generator=order_rng).numpy()]
            losses = []
            for b in range(len(rows) // bs):
                if step == end:
                    break
                idx = np.sort(perm[b * bs : (b + 1) * bs])
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                img_f, txt_f, scale = model(_normalise(images[idx], preprocess), tokens[idx])
                loss = loss_fn(img_f, txt_f, scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                losses.append(loss.item())
                step += 1
            history.append(float(np.mean(losses)))
            log.info(
                "epoch %d: loss %.3f, step %d/%d (%.0f s)",
                len(history),
                history[-1],
                step,
                steps,
                time.time() - t0,
            )
    recalibrate_batchnorm(model, images, preprocess, settings)
    model.eval()
    return history


def recalibrate_batchnorm(model, images: np.ndarray, preprocess, settings: TrainSettings) -> None:
    """Recompute BatchNorm running statistics as a plain average over training batches.

    The running averages lag behind weights that moved fast late in training: measured on
    close-ups, reading accuracy in eval mode was up to 0.1 below the same model with fresh
    statistics."""
    import torch

    norms = [
        m for m in model.visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    rng = np.random.default_rng(settings.seed)
    model.train()
    with torch.no_grad():
        for _ in range(32):
            idx = np.sort(
                rng.choice(len(images), min(len(images), settings.batch_size), replace=False)
            )
            model.encode_image(_normalise(images[idx], preprocess))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def save(model, output: str) -> str:
    """Weights as safetensors (the ordinary checkpoint path loads them)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes a map's keys in no fixed order, so the same weights
    # would not always give the same bytes
    save_file(state, output, metadata={"note": f"{MODEL_NAME}: {DEMO_MODEL_NOTE}"})
    return output


# -- quick check (ground-truth masks, no detector) ---------------------------------------------


def category_keep_shares(
    model, preprocess, tokenizer, seed: int, samples: int, fraction: float = 0.5
) -> dict[str, dict[str, float]]:
    """Kept share per category for CLIP-score and T-MARS at `fraction`, masking the
    ground-truth text lines (a fast proxy of the real job, which detects them)."""
    import io

    import torch
    from PIL import Image

    from tmars_ray.devtools.synth import CATEGORIES, encode_jpeg, generate_sample
    from tmars_ray.models.mask import mask_text

    originals, masked, captions, cats = [], [], [], []
    for i in range(samples):
        s = generate_sample(seed, i)
        im = np.asarray(Image.open(io.BytesIO(encode_jpeg(s.image))).convert("RGB"))
        originals.append(preprocess(Image.fromarray(im)))
        polys = [ln.polygon for ln in s.lines]
        masked.append(preprocess(Image.fromarray(mask_text(im, polys).masked)))
        captions.append(s.caption)
        cats.append(s.category)
    with torch.no_grad():
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        a = torch.nn.functional.normalize(model.encode_image(torch.stack(originals)), dim=-1)
        b = torch.nn.functional.normalize(model.encode_image(torch.stack(masked)), dim=-1)
    scores = {"clip-score": (a * txt).sum(-1).numpy(), "tmars": (b * txt).sum(-1).numpy()}
    cats_a = np.array(cats)
    out: dict[str, dict[str, float]] = {}
    for method, sc in scores.items():
        keep = sc >= np.quantile(sc, 1 - fraction)
        out[method] = {
            c: round(float(keep[cats_a == c].mean()), 3) for c in CATEGORIES if (cats_a == c).any()
        }
    return out


def reading_accuracy(model, preprocess, tokenizer, seed: int, samples: int) -> dict[str, float]:
    """How well the model reads, on samples of an unseen seed: the share of text-line close-ups
    whose nearest of the generator's phrases is the right one (chance: 1 in ~50), and of whole
    "text" images whose nearest "text" caption among the others is their own."""
    import io

    import torch
    from PIL import Image

    from tmars_ray.devtools.synth import _VOCAB, encode_jpeg, generate_sample

    size = input_size(model)
    vocab = [v.lower() for v in _VOCAB]
    crops, labels, texts, text_captions = [], [], [], []
    for i in range(samples):
        s = generate_sample(seed, i)
        if not s.lines:
            continue
        im = Image.open(io.BytesIO(encode_jpeg(s.image))).convert("RGB")
        crops.append(preprocess(_crop_square(im, s.lines[0].bbox, size)))
        labels.append(vocab.index(s.lines[0].text.lower()))
        if s.category == "text":
            texts.append(preprocess(im))
            text_captions.append(s.caption)

    def unit(x):
        return torch.nn.functional.normalize(x, dim=-1)

    with torch.no_grad():
        words = unit(model.encode_text(tokenizer(vocab)))
        hits = (unit(model.encode_image(torch.stack(crops))) @ words.T).argmax(1).numpy()
        sim = (
            unit(model.encode_image(torch.stack(texts)))
            @ unit(model.encode_text(tokenizer(text_captions))).T
        )
    return {
        "closeup_phrase_acc": round(float((hits == np.array(labels)).mean()), 3),
        "text_caption_retrieval": round(
            float((sim.argmax(1) == torch.arange(len(texts))).float().mean()), 3
        ),
        "closeups": len(labels),
        "text_images": len(texts),
    }


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="build/demo-model/tmars-demo.safetensors")
    parser.add_argument("--cache", default="build/demo-model", help="rendered-pairs cache folder")
    d = TrainSettings()
    parser.add_argument("--samples", type=int, default=d.samples)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--reading-steps", type=int, default=d.reading_steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--check-seed", type=int, default=7, help="unseen pool seed for the check")
    parser.add_argument("--check-samples", type=int, default=400)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.check_seed >= TRAIN_SEED_BASE:
        parser.error(f"--check-seed must be < {TRAIN_SEED_BASE} (training seeds)")
    settings = TrainSettings(
        samples=args.samples,
        steps=args.steps,
        reading_steps=args.reading_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
    )
    t0 = time.time()
    model, history = train(settings, args.cache)
    save(model, args.output)
    _, preprocess, tokenizer = create_model()
    shares = category_keep_shares(model, preprocess, tokenizer, args.check_seed, args.check_samples)
    reading = reading_accuracy(model, preprocess, tokenizer, args.check_seed, args.check_samples)
    result = {
        "output": args.output,
        "sha256": file_sha256(args.output),
        "loss_per_epoch": [round(v, 4) for v in history],
        "train_seconds": round(time.time() - t0, 1),
        "check": {
            "seed": args.check_seed,
            "samples": args.check_samples,
            "kept_share": shares,
            "reading": reading,
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
