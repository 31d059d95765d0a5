"""Synthetic image-caption pools with ground-truth text (`tmars demo-pool`, tests, benchmarks).

Each sample is a photo (scikit-image's bundled images, offline) or a procedural scene, with 0-3
lines of real words rendered in the DejaVu fonts that ship with matplotlib. The caption matches
the picture, the rendered text, both or neither: the categories of the T-MARS paper's LAION
study. "picture" samples are text-free or carry text unrelated to the caption (the paper's
"random text" case, which T-MARS should keep).

Everything is a pure function of (seed, index) and a pool's keys are the indices, so
`generate_sample(seed, int(key))` rebuilds the exact ground truth (ink masks included) of any
written sample. Coordinates are continuous pixel-edge coordinates: pixel (col x, row y) covers
[x, x+1) x [y, y+1).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw

from tmars_ray.devtools.textdraw import (
    composite,
    load_font,
    luminance,
    pick_colour,
    place,
    text_masks,
    warp,
)
from tmars_ray.run import storage

CATEGORIES = ("picture", "text", "both", "neither")
# picture 45% (of which ~62% text-free, i.e. ~28% of the pool), text 20%, both 20%, neither 15%
_CATEGORY_P = (0.45, 0.20, 0.20, 0.15)
_PICTURE_TEXT_FREE_P = 0.62
MIN_SIDE, MAX_SIDE = 160, 640
JPEG_QUALITY = 90
MIN_FONT_PX = 24  # keeps even x-height-only words (e.g. "museum") >= 14 px tall

# scikit-image photos without legible text of their own (page/text/coins/clock are left out:
# unlabelled text would look like detector false positives).
_PHOTOS = (
    ("astronaut", "a portrait of an astronaut in an orange spacesuit"),
    ("coffee", "a cup of coffee on a saucer"),
    ("chelsea", "a photo of a cat"),
    ("rocket", "a rocket on the launch pad at dusk"),
    ("camera", "a black and white photo of a cameraman"),
    ("hubble_deep_field", "galaxies in deep space"),
    ("immunohistochemistry", "a microscope image of stained tissue"),
    ("colorwheel", "a colour wheel"),
    ("moon", "the cratered surface of the moon"),
    ("brick", "a brick wall"),
    ("grass", "a close-up of grass"),
    ("gravel", "a close-up of gravel"),
    ("retina", "a photo of the retina of an eye"),
)
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (240, 130, 180),
    "teal": (30, 150, 150),
    "brown": (130, 80, 40),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
_SHAPES = ("circle", "square", "triangle", "diamond", "ring")
# Captions of "neither" samples: subjects that never occur in the pool.
_UNRELATED = (
    "a bowl of fruit on a table",
    "a dog running on a beach",
    "a snowy mountain lake",
    "a plate of pasta",
    "a bicycle leaning against a fence",
    "a sailing boat at sea",
    "a field of sunflowers",
    "two horses in a meadow",
)
# Rendered phrases; they share no word with any picture caption, so "picture"/"neither"
# captions never match the text by accident (tests check this).
_VOCAB = (
    "open daily",
    "big sale",
    "free shipping",
    "hello world",
    "good morning",
    "welcome",
    "summer festival",
    "fresh bread",
    "city map",
    "exit",
    "stop",
    "best price",
    "new arrivals",
    "limited edition",
    "thank you",
    "happy birthday",
    "grand opening",
    "books",
    "music night",
    "call now",
    "since 1984",
    "made by hand",
    "keep calm",
    "no parking",
    "sold out",
    "lucky day",
    "final offer",
    "travel guide",
    "garden party",
    "jazz club",
    "winter sale",
    "fast delivery",
    "quiet please",
    "holiday deals",
    "art gallery",
    "pizza",
    "hotel",
    "taxi",
    "breaking news",
    "weekend market",
    "vintage",
    "organic",
    "family",
    "adventure",
    "premium quality",
    "save 50%",
    "tickets",
    "lemonade",
    "bakery",
    "museum",
)
_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)


@dataclass
class TextLine:
    text: str
    polygon: np.ndarray  # (4, 2) float32: TL, TR, BR, BL corners of the rotated tight box
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), inside the image
    ink: np.ndarray  # (H, W) bool: exactly the pixels this line changed


@dataclass
class SynthSample:
    key: str
    uid: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, before JPEG encoding
    caption: str
    category: str
    scene: str  # e.g. "photo:chelsea", "procedural:gradient:circle"
    lines: list[TextLine] = field(default_factory=list)


def sample_uid(seed: int, index: int) -> str:
    """32 lowercase hex digits, like a DataComp uid, stable for (seed, index)."""
    return hashlib.blake2b(f"tmars-synth:{seed}:{index}".encode(), digest_size=16).hexdigest()


def sample_key(index: int) -> str:
    return f"{index:09d}"


def generate_sample(
    seed: int, index: int, sides: tuple[int, int] = (MIN_SIDE, MAX_SIDE)
) -> SynthSample:
    """Deterministic sample `index` of the pool with `seed` (independent of call order); its
    width and height are drawn from `sides` (inclusive)."""
    rng = np.random.default_rng([seed, index])
    category = str(rng.choice(CATEGORIES, p=_CATEGORY_P))
    width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
    if rng.random() < 0.5:
        image, picture, scene = _photo(rng, width, height)
    else:
        image, picture, scene = _procedural(rng, width, height)
    with_text = category != "picture" or rng.random() >= _PICTURE_TEXT_FREE_P
    lines = (
        _render_lines(rng, image, int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])))
        if with_text
        else []
    )
    if not lines and category != "picture":
        category = "picture"  # nothing fitted (practically never): the caption must stay truthful
    return SynthSample(
        key=sample_key(index),
        uid=sample_uid(seed, index),
        image=image,
        caption=_caption(rng, category, picture, [ln.text for ln in lines]),
        category=category,
        scene=scene,
        lines=lines,
    )


# -- pictures ---------------------------------------------------------------------------------


@cache
def _photo_source(name: str) -> np.ndarray:
    import skimage.data  # imported lazily: only photo samples need it

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    arr = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    arr.flags.writeable = False  # shared by every sample through the cache
    return arr


def _photo(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str, str]:
    name, caption = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
    src = _photo_source(name)
    sh, sw = src.shape[:2]
    # Largest crop with the target aspect, shrunk a little so crops differ but keep the subject.
    cw = min(sw, sh * width / height) * rng.uniform(0.75, 1.0)
    ch = cw * height / width
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    img = Image.fromarray(src).resize(
        (width, height), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch)
    )
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(img), caption, f"photo:{name}"


def _procedural(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str, str]:
    names = list(_COLOURS)
    bg1, bg2, fg = (names[i] for i in rng.choice(len(names), size=3, replace=False))
    c1, c2 = np.array(_COLOURS[bg1], np.float32), np.array(_COLOURS[bg2], np.float32)
    kind = str(rng.choice(["plain", "gradient", "texture"]))
    if kind == "gradient":
        t = rng.uniform(0, 2 * math.pi)
        xs = np.arange(width, dtype=np.float32) * math.cos(t)
        p = xs[None, :] + np.arange(height, dtype=np.float32)[:, None] * math.sin(t)
        p = ((p - p.min()) / max(float(p.max() - p.min()), 1.0))[..., None]
        img = c1 * (1 - p) + c2 * p
        background = f"a {bg1} and {bg2} gradient"
    elif kind == "texture":
        coarse = rng.random((height // 16 + 2, width // 16 + 2)).astype(np.float32)
        smooth = np.asarray(
            Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        )
        img = c1 * (0.65 + 0.35 * np.clip(smooth, 0, 1))[..., None]
        background = f"a {bg1} textured background"
    else:
        img = np.broadcast_to(c1, (height, width, 3))
        background = f"a {bg1} background"
    # Mild sensor-like noise so flat regions are not perfectly flat after JPEG.
    img = img + 3 * rng.standard_normal((height, width, 3), dtype=np.float32)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    shape = str(rng.choice(_SHAPES))
    size = rng.uniform(0.3, 0.65) * min(width, height)
    cx, cy = rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2)
    r, colour = size / 2, _COLOURS[fg]
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(3, int(size / 7)))
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    return np.array(canvas), f"a {fg} {shape} on {background}", f"procedural:{kind}:{shape}"


# -- text -------------------------------------------------------------------------------------


def _render_lines(rng: np.random.Generator, image: np.ndarray, n_lines: int) -> list[TextLine]:
    """Draw up to `n_lines` non-overlapping lines onto `image` in place; return what was drawn."""
    height, width = image.shape[:2]
    # Font size relative to the shorter side (>= 1/10 of it): at CLIP's input size (shorter side
    # resized to 128-224 px) every line stays >= ~13-22 px, large enough for a small model to read.
    min_size = max(MIN_FONT_PX, min(width, height) // 10)
    max_size = max(min_size, min(min(width, height) // 5, 96))
    lines: list[TextLine] = []
    need_outline = False  # set when a busy background defeated every plain colour
    for _ in range(n_lines * 15):  # placement attempts; a line that never fits is skipped
        if len(lines) == n_lines:
            break
        used = {ln.text.lower() for ln in lines}
        text = str(rng.choice([v for v in _VOCAB if v not in used]))
        if rng.random() < 0.3:
            text = text.upper()
        font = load_font(str(rng.choice(_FONTS)), int(rng.integers(min_size, max_size + 1)))
        stroke = 2 if need_outline else (int(rng.integers(1, 3)) if rng.random() < 0.3 else 0)
        angle = 0.0 if rng.random() < 0.7 else float(rng.uniform(-30, 30))
        fill, outline, box = text_masks(text, font, stroke)
        placed = place(rng, box, angle, width, height, [ln.bbox for ln in lines])
        if placed is None:
            continue
        centre, polygon, bbox = placed
        x0, y0, x1, y1 = bbox
        window = image[y0:y1, x0:x1]  # a view: drawing only touches the line's box
        colour, legible = pick_colour(rng, window)
        if not legible and not stroke:
            need_outline = True  # try again (elsewhere) with a contrasting outline
            continue
        before = window.copy()
        if outline is not None:
            edge = (0, 0, 0) if luminance(np.array(colour)) > 0.18 else (255, 255, 255)
            composite(window, warp(outline, box, angle, centre, bbox), edge)
        composite(window, warp(fill, box, angle, centre, bbox), colour)
        ink = np.zeros((height, width), bool)
        ink[y0:y1, x0:x1] = np.any(window != before, axis=-1)
        if not ink.any():
            continue
        lines.append(TextLine(text=text, polygon=polygon, bbox=bbox, ink=ink))
        need_outline = False
    return lines


def _caption(rng: np.random.Generator, category: str, picture: str, texts: list[str]) -> str:
    said = " ".join(texts)
    if category == "picture":
        return picture
    if category == "neither":
        return _UNRELATED[int(rng.integers(len(_UNRELATED)))]
    if category == "text":
        templates = ("{t}", '"{t}"', 'the words "{t}"')
    else:  # both
        templates = ('{p} with the words "{t}"', '"{t}": {p}', "{p} and the text {t}")
    return templates[int(rng.integers(len(templates)))].format(p=picture, t=said)


# -- pool writing -----------------------------------------------------------------------------


def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Fixed parameters so the same pixels always give the same bytes.
    Image.fromarray(image).save(
        buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, subsampling=2
    )
    return buf.getvalue()


def sample_metadata(sample: SynthSample) -> dict[str, Any]:
    """The sample's `.json` record: ids, caption, category and ground-truth text (no masks)."""
    return {
        "uid": sample.uid,
        "key": sample.key,
        "caption": sample.caption,
        "category": sample.category,
        "scene": sample.scene,
        "width": int(sample.image.shape[1]),
        "height": int(sample.image.shape[0]),
        "text_lines": [
            {
                "text": ln.text,
                "polygon": [[round(float(x), 3), round(float(y), 3)] for x, y in ln.polygon],
                "bbox": list(ln.bbox),
            }
            for ln in sample.lines
        ],
    }


def shard_ranges(samples: int, shards: int) -> list[range]:
    """Contiguous, near-equal index ranges, one per shard (the first ones get the remainder)."""
    base, extra = divmod(samples, shards)
    ranges, start = [], 0
    for s in range(shards):
        n = base + (1 if s < extra else 0)
        ranges.append(range(start, start + n))
        start += n
    return ranges


SHARD_NAME = "{:08d}"  # DataComp / img2dataset shard names: 00000000.tar, 00000001.tar, ...


def stats_record(samples: int) -> dict[str, Any]:
    """img2dataset's per-shard `{:08d}_stats.json` (DataComp's resharder reads `successes`);
    fixed times so that the same pool always gives the same bytes."""
    return {
        "count": samples,
        "successes": samples,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": 0.0,
        "start_time": 0.0,
        "end_time": 0.0,
        "status_dict": {"success": samples},
    }


def write_pool(
    output: str,
    samples: int = 100,
    shards: int = 2,
    seed: int = 0,
    fmt: str = "webdataset",
    sides: tuple[int, int] = (MIN_SIDE, MAX_SIDE),
    workers: int = 1,
) -> list[str]:
    """Write a synthetic pool under `output` (local path or fsspec URL); return the shard URLs.

    DataComp's layout, so its own tools take the pool as is: webdataset shards `00000000.tar`,
    ... with `KEY.jpg`, `KEY.txt`, `KEY.json` per sample, and img2dataset's
    `00000000_stats.json` beside each (`successes` = samples in the shard). parquet:
    `00000000.parquet`, ... with columns key, uid, image (JPEG bytes), caption, json (and the
    same stats files). The same arguments always give byte-identical files. `sides`: the range
    of image widths and heights (generate_sample). `workers` > 1 writes shards in that many
    processes (rendering is the cost; the bytes do not depend on it).
    """
    if fmt not in ("webdataset", "parquet"):
        raise ValueError(f"fmt must be 'webdataset' or 'parquet', not {fmt!r}")
    if samples < 0 or shards < 1:
        raise ValueError("need samples >= 0 and shards >= 1")
    jobs = [
        (output, shard, indices, seed, fmt, sides)
        for shard, indices in enumerate(shard_ranges(samples, shards))
    ]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_write_shard, jobs, chunksize=1)
    return [_write_shard(job) for job in jobs]


def _write_shard(job: tuple[str, int, range, int, str, tuple[int, int]]) -> str:
    """Write one shard and its stats file; return the shard's URL."""
    output, shard, indices, seed, fmt, sides = job
    writer, ext = (_write_tar, "tar") if fmt == "webdataset" else (_write_parquet, "parquet")
    name = SHARD_NAME.format(shard)
    url = storage.join(output, f"{name}.{ext}")
    with _open_for_write(url) as f:
        writer(f, (generate_sample(seed, i, sides) for i in indices))
    with _open_for_write(storage.join(output, f"{name}_stats.json")) as f:
        f.write(json.dumps(stats_record(len(indices)), indent=4).encode("utf-8"))
    return url


@contextmanager
def _open_for_write(url: str) -> Iterator[IO[bytes]]:
    """A writable stream whose file appears whole or not at all."""
    fs, path = storage.filesystem(url)
    if storage.is_remote_fs(fs):
        with fs.open(path, "wb") as f:  # an object-store PUT is atomic by itself
            yield f
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_tar(f: IO[bytes], samples: Iterable[SynthSample]) -> None:
    with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for suffix, data in (
                ("jpg", encode_jpeg(s.image)),
                ("txt", s.caption.encode("utf-8")),
                ("json", json.dumps(sample_metadata(s)).encode("utf-8")),
            ):
                # Fixed metadata: the archive's bytes depend on the samples alone.
                info = tarfile.TarInfo(f"{s.key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def _write_parquet(f: IO[bytes], samples: Iterable[SynthSample], batch_rows: int = 64) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("key", pa.string()),
            ("uid", pa.string()),
            ("image", pa.binary()),
            ("caption", pa.string()),
            ("json", pa.string()),
        ]
    )
    with pq.ParquetWriter(f, schema, compression="snappy") as writer:
        rows: list[SynthSample] = []

        def flush() -> None:
            writer.write_table(
                pa.table(
                    {
                        "key": [s.key for s in rows],
                        "uid": [s.uid for s in rows],
                        "image": [encode_jpeg(s.image) for s in rows],
                        "caption": [s.caption for s in rows],
                        "json": [json.dumps(sample_metadata(s)) for s in rows],
                    },
                    schema=schema,
                )
            )
            rows.clear()

        for s in samples:
            rows.append(s)
            if len(rows) == batch_rows:
                flush()
        if rows:
            flush()
