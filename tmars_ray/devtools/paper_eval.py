"""`make paper`'s evaluation: zero-shot classification of held-out text-free pictures (a
seed no pool uses), without text (`visual`) and with another class's name written on them
(`typographic`), over two kinds of items in equal numbers: photos among the pools' 13 photo
subjects (prompted with their captions), and procedural shapes among the 60 colour x shape
classes (prompted "a {colour} {shape} on {the picture's own background}"). The photos alone
saturate (every model >= 0.98): each subject is a crop of one source photo."""

from __future__ import annotations

import re

import numpy as np

from tmars_ray.devtools import demo_model

EVAL_SEED = 501
EVAL_VERSION = 2  # bump when the evaluation changes: cached results of another one are not reused
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


def zero_shot(model, preprocess, tokenizer, photos: tuple, shapes: tuple) -> dict:
    """Accuracies: `visual_acc` / `typographic_acc` over all items (photos and shapes in equal
    numbers), and per kind (`photo_*`, `shape_*`)."""
    import torch

    from tmars_ray.devtools.synth import _PHOTOS

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
