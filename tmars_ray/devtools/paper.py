"""`make paper`: the T-MARS paper's experiment in miniature (a benchmark, not a test).

1. One synthetic pool (a seed the demo model never saw), scored once by the real job with the
   demo model and text recognition; keep-lists for no filter, CLIP-score 50%, text-match and
   T-MARS 50% (the last two through the job's own selection methods).
2. A small CLIP (the demo architecture) trained from scratch on each keep-list with the same
   compute: the same number of steps and batch size, so the same number of samples seen.
3. Zero-shot classification of held-out text-free pictures (another unseen seed), without
   text (`visual_acc`) and with a misleading name written on them - another class's
   (`typographic_acc`), over two kinds of items in equal numbers: photos among the pool's 13
   photo subjects (prompted with their captions), and procedural shapes among the 60 colour x
   shape classes (prompted "a {colour} {shape} on {the picture's own background}"). The
   photos alone saturate (every model >= 0.99): each subject is a crop of one source photo.

The table goes to BENCHMARKS.md (command, machine, date); the last line printed is one JSON
object {"filters": {name: {"visual_acc", "typographic_acc"}}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from tmars_ray.devtools import demo_model

log = logging.getLogger(__name__)

POOL_SEED = 500  # demo-model training seeds start at demo_model.TRAIN_SEED_BASE
EVAL_SEED = 501
FILTERS = ("none", "clip-score", "text-match", "tmars")
# Short names of the photo subjects (synth's photos), written on other classes' pictures.
CLASS_WORDS = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "chelsea": "cat",
    "rocket": "rocket",
    "camera": "cameraman",
    "hubble_deep_field": "galaxies",
    "immunohistochemistry": "tissue",
    "colorwheel": "colour wheel",
    "moon": "moon",
    "brick": "brick wall",
    "grass": "grass",
    "gravel": "gravel",
    "retina": "retina",
}
MARK_BEGIN, MARK_END = "<!-- bench:paper -->", "<!-- /bench:paper -->"


@dataclasses.dataclass(frozen=True)
class PaperSettings:
    samples: int = 4000
    shards: int = 8
    steps: int = 400
    batch_size: int = 128
    per_class: int = 30
    threads: int = 2


FULL = PaperSettings()


# -- 1. pool, scores and keep-lists --------------------------------------------------------------


def keep_lists(
    work: str, s: PaperSettings, config: str | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """{filter: sorted pool indices kept} and facts about the scoring run."""
    import pyarrow.parquet as pq

    from tmars_ray.config import Config
    from tmars_ray.devtools.synth import sample_uid, write_pool
    from tmars_ray.job import run
    from tmars_ray.run.layout import KEEP_PARQUET, RunLayout
    from tmars_ray.run.manifest import RunState
    from tmars_ray.selection.select import select

    # named by what they hold: a pool or run of other settings is never reused, and a pool
    # whose writing was interrupted (no marker) is written again
    name = f"{s.samples}x{s.shards}-seed{POOL_SEED}"
    pool = os.path.join(work, f"pool-{name}")
    if not os.path.exists(os.path.join(pool, ".complete")):
        write_pool(pool, samples=s.samples, shards=s.shards, seed=POOL_SEED)
        open(os.path.join(pool, ".complete"), "w").close()
    scored = os.path.join(work, f"run-{name}")
    cfg = Config.load(
        config if config and os.path.exists(config) else None,
        input=pool,
        output=scored,
        clip_model="tmars-demo",
        clip_pretrained="tmars-demo",
        method="text-match",
        recognize_text=True,
        report=False,
    )
    cfg = dataclasses.replace(cfg, fraction=None)  # text-match keeps by its own rule
    # the scoring time is kept beside the run: a rerun resumes in ~1 s and must not report that
    timing = os.path.join(work, f"scoring-{name}.json")
    earlier = None
    if os.path.exists(timing):
        with open(timing) as f:
            earlier = json.load(f)
    t0 = time.time()
    result = run(cfg)  # scores once (resumes when already scored) and writes text-match's keep
    if result.exit_code:
        raise RuntimeError(result.message)
    facts = earlier or {"scoring_seconds": round(time.time() - t0, 1)}
    if earlier is None:
        with open(timing, "w") as f:
            json.dump(facts, f)
    state = RunState.load(scored)
    index = {sample_uid(POOL_SEED, i): i for i in range(s.samples)}
    folders = {"text-match": scored}
    for method in ("clip-score", "tmars"):
        folders[method] = os.path.join(work, f"keep-{method}")
        select([state], folders[method], method=method, fraction=0.5)
    total, failed, _ = state.failure_counts()
    kept = {"none": np.array(sorted(set(range(s.samples)) - _failed(state, index)))}
    for name, folder in folders.items():
        uids = pq.read_table(RunLayout(folder).keep_file(KEEP_PARQUET), columns=["uid"])
        kept[name] = np.array(sorted(index[u] for u in uids["uid"].to_pylist()))
    facts.update(samples=total, failed=failed)
    return kept, facts


def _failed(state, index: dict[str, int]) -> set[int]:
    import pyarrow.parquet as pq

    out = set()
    for r in state.records:
        for part in r.parts:
            t = pq.read_table(state.layout.path(part), columns=["uid", "status"]).to_pylist()
            out |= {index[x["uid"]] for x in t if x["status"] != "ok" and x["uid"] in index}
    return out


# -- 2. training ---------------------------------------------------------------------------------


def train_on(
    indices: np.ndarray, images: np.ndarray, captions: list[str], s: PaperSettings
) -> tuple[Any, list[float]]:
    import torch

    settings = demo_model.TrainSettings(
        batch_size=s.batch_size, threads=s.threads, seed=demo_model.TRAIN_SEED_BASE
    )
    torch.set_num_threads(s.threads)
    torch.manual_seed(settings.seed)  # the same initial model for every filter
    model, preprocess, tokenizer = demo_model.create_model()
    tokens = tokenizer([captions[i] for i in indices])
    history = demo_model.fit(model, preprocess, images[indices], tokens, s.steps, settings)
    return model, history


# -- 3. zero-shot evaluation ---------------------------------------------------------------------


def eval_set(per_class: int, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """(pictures, the same with a misleading word, labels, classes): text-free photo samples of
    EVAL_SEED, `per_class` of each subject, resized and cropped like the model's input."""
    from PIL import Image

    from tmars_ray.devtools.synth import _PHOTOS, generate_sample

    classes = [name for name, _ in _PHOTOS]
    want = dict.fromkeys(classes, per_class)
    geometry = demo_model._preprocess_geometry(image_size)
    clean, attacked, labels = [], [], []
    i = 0
    while any(want.values()) and i < 200 * per_class * len(classes):
        smp = generate_sample(EVAL_SEED, i)
        i += 1
        name = smp.scene.split(":", 1)[1] if smp.scene.startswith("photo:") else None
        if name not in want or not want[name] or smp.lines or smp.category != "picture":
            continue
        want[name] -= 1
        k = classes.index(name)
        wrong = classes[(k + 1 + i % (len(classes) - 1)) % len(classes)]
        picture = Image.fromarray(smp.image)
        clean.append(np.asarray(geometry(picture), np.uint8))
        attacked.append(np.asarray(geometry(_write_word(picture, CLASS_WORDS[wrong])), np.uint8))
        labels.append(k)
    return np.stack(clean), np.stack(attacked), np.array(labels), classes


def _write_word(picture, word: str):
    """The picture with `word` written large across its middle (white, black outline)."""
    from PIL import ImageDraw

    from tmars_ray.devtools.textdraw import load_font

    img = picture.copy()
    w, h = img.size
    size = max(16, min(h // 4, int(1.6 * w / max(len(word), 1))))
    font = load_font("DejaVuSans-Bold.ttf", size)
    x0, y0, x1, y1 = font.getbbox(word, stroke_width=3)
    pos = ((w - (x1 - x0)) / 2 - x0, (h - (y1 - y0)) / 2 - y0)
    ImageDraw.Draw(img).text(
        pos, word, font=font, fill=(255, 255, 255), stroke_width=3, stroke_fill=(0, 0, 0)
    )
    return img


SHAPE_CAPTION = re.compile(r"^a (\w+) (\w+) on (.+)$")


def shape_classes() -> list[tuple[str, str]]:
    """The procedural pictures' (colour, shape) classes, in a fixed order."""
    from tmars_ray.devtools.synth import _COLOURS, _SHAPES

    return [(c, sh) for c in _COLOURS for sh in _SHAPES]


def shape_eval_set(count: int, image_size: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    """(pictures, the same with another class's name written on, labels, backgrounds): `count`
    text-free procedural samples of EVAL_SEED; a label is (colour, shape), a background the
    caption's "on ..." part."""
    from PIL import Image

    from tmars_ray.devtools.synth import generate_sample

    classes = shape_classes()
    geometry = demo_model._preprocess_geometry(image_size)
    clean, attacked, labels, backgrounds = [], [], [], []
    i = 0
    while len(labels) < count and i < 200 * count:
        smp = generate_sample(EVAL_SEED, i)
        i += 1
        match = SHAPE_CAPTION.match(smp.caption)
        if not smp.scene.startswith("procedural:") or smp.lines or not match:
            continue
        colour, shape, background = match.groups()
        others = [c for c in classes if c[1] != shape and c[0] != colour]
        wrong = others[i % len(others)]
        picture = Image.fromarray(smp.image)
        clean.append(np.asarray(geometry(picture), np.uint8))
        attacked.append(np.asarray(geometry(_write_word(picture, " ".join(wrong))), np.uint8))
        labels.append((colour, shape))
        backgrounds.append(background)
    return np.stack(clean), np.stack(attacked), labels, backgrounds


def zero_shot(model, photos: tuple, shapes: tuple) -> dict:
    """Accuracies: `visual_acc` / `typographic_acc` over all items (photos and shapes in equal
    numbers), and per kind (`photo_*`, `shape_*`)."""
    import torch

    from tmars_ray.devtools.synth import _PHOTOS

    _, preprocess, tokenizer = demo_model.create_model()
    unit = torch.nn.functional.normalize
    classes = shape_classes()
    clean, attacked, labels, _ = photos
    s_clean, s_attacked, s_labels, backgrounds = shapes
    hits: dict[str, np.ndarray] = {}
    with torch.no_grad():
        txt = unit(model.encode_text(tokenizer([c for _, c in _PHOTOS])))
        # one prompt set per distinct background: only the shape's colour and kind vary
        prompts = {
            bg: unit(model.encode_text(tokenizer([f"a {c} {sh} on {bg}" for c, sh in classes])))
            for bg in sorted(set(backgrounds))
        }
        want = np.array([classes.index(lab) for lab in s_labels])
        for name, imgs, s_imgs in (
            ("visual", clean, s_clean),
            ("typographic", attacked, s_attacked),
        ):
            emb = unit(model.encode_image(demo_model._normalise(imgs, preprocess)))
            hits[f"photo_{name}"] = (emb @ txt.T).argmax(-1).numpy() == labels
            emb = unit(model.encode_image(demo_model._normalise(s_imgs, preprocess)))
            pred = [
                int((e @ prompts[bg].T).argmax()) for e, bg in zip(emb, backgrounds, strict=True)
            ]
            hits[f"shape_{name}"] = np.array(pred) == want
    out = {
        f"{name}_acc": round(
            float(np.concatenate([hits[f"photo_{name}"], hits[f"shape_{name}"]]).mean()), 4
        )
        for name in ("visual", "typographic")
    }
    out.update({f"{k}_acc": round(float(v.mean()), 4) for k, v in hits.items()})
    return out


# -- report --------------------------------------------------------------------------------------


def table(result: dict, kept: dict, facts: dict, s: PaperSettings, command: str) -> str:
    # the thread count changes speed, not the experiment
    reduced = dataclasses.replace(s, threads=FULL.threads) != FULL
    lines = [
        MARK_BEGIN,
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {platform.node()}: "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
        "no GPU; the cores were shared with other work.",
        f"Command: `{command}`"
        + (
            " - a REDUCED configuration (full: `make paper`, defaults " + _settings(FULL) + ")."
            if reduced
            else " (`make paper`)."
        ),  # fmt: skip
        f"Pool: {s.samples} synthetic samples (seed {POOL_SEED}, {s.shards} shards), scored by "
        f"`tmars run` with the demo model and text recognition in {facts['scoring_seconds']} s "
        f"({facts['failed']} failed). Training: the demo architecture from scratch, "
        f"{s.steps} steps x batch {s.batch_size} = {s.steps * s.batch_size} samples seen per "
        f"filter. Evaluation: {result['eval_images']} held-out text-free pictures (seed "
        f"{EVAL_SEED}), half photos ({len(CLASS_WORDS)}-way zero-shot over the photo subjects, "
        f"chance {1 / len(CLASS_WORDS):.3f}), half procedural shapes "
        f"({len(shape_classes())}-way over colour x shape, prompted with the picture's own "
        f"background, chance {1 / len(shape_classes()):.3f}); typographic: the same pictures with another class's name written on them.",
        "",
        "| filter | kept samples | visual_acc | typographic_acc | photos: visual / typographic "
        "| shapes: visual / typographic | final train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in FILTERS:
        r = result["detail"][name]
        lines.append(
            f"| {name} | {len(kept[name])} | {r['visual_acc']:.3f} | {r['typographic_acc']:.3f} "
            f"| {r['photo_visual_acc']:.3f} / {r['photo_typographic_acc']:.3f} "
            f"| {r['shape_visual_acc']:.3f} / {r['shape_typographic_acc']:.3f} "
            f"| {result['loss'][name]:.3f} |"
        )
    lines += ["", MARK_END]
    return "\n".join(lines)


def _settings(s: PaperSettings) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items())


def write_benchmarks(path: str, block: str) -> None:
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n## 7. The paper's experiment in miniature (`make paper`)\n\n"
        text += block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="build/paper")
    parser.add_argument("--config", default="jobs/configs/local-cpu.yaml")
    for f in dataclasses.fields(PaperSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    parser.add_argument("--write", default=None, help="append/replace the table in this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = PaperSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PaperSettings)})
    command = "python -m tmars_ray.devtools.paper " + " ".join(argv or sys.argv[1:])
    t0 = time.time()
    kept, facts = keep_lists(args.output, s, args.config)
    log.info("keep-lists: %s", {k: len(v) for k, v in kept.items()})
    images, captions, _ = demo_model.render_pairs(
        POOL_SEED, s.samples, 128, os.path.join(args.output, "cache"), workers=s.threads
    )
    photos = eval_set(s.per_class, images.shape[1])
    shapes = shape_eval_set(len(photos[2]), images.shape[1])
    result: dict[str, Any] = {"filters": {}, "detail": {}, "loss": {}}
    result["eval_images"] = len(photos[2]) + len(shapes[2])
    for name in FILTERS:
        model, history = train_on(kept[name], images, captions, s)
        acc = zero_shot(model, photos, shapes)
        result["filters"][name] = {k: acc[k] for k in ("visual_acc", "typographic_acc")}
        result["detail"][name] = acc
        result["loss"][name] = history[-1]
        log.info("%s: %s (%.0f s so far)", name, acc, time.time() - t0)
    block = table(result, kept, facts, s, command.strip())
    print(block)
    if args.write:
        write_benchmarks(args.write, block)
    print(json.dumps({"filters": result["filters"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
