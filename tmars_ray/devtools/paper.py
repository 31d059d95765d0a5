"""`make paper`: the T-MARS paper's experiment in miniature, under DataComp's rule (a benchmark,
not a test; <= 60 min on 2 cores, resumable).

1. Pools: synthetic pools of two seeds the demo model never saw (the make-up is stated: see
   `pool_makeup`), each scored once by the real job (`tmars run`) with the demo model and text
   recognition; keep-lists from `tmars select` on that one score table: no filter, CLIP-score
   50%, text-match, T-MARS 50%, and T-MARS 50% intersected with CLIP-score 50% (the paper's
   best combination).
2. Training, DataComp's rule: samples seen = pool size whatever the filter, so a filter changes
   which pictures are seen (and how often), not the compute. A small CLIP (the demo
   architecture at `image_size`) from scratch, on the pool's own JPEGs; `seeds` initialisations
   and data orders per filter, the same ones for every filter.
3. Zero-shot classification of held-out text-free pictures (another unseen seed), without
   text (`visual_acc`) and with a misleading name written on them - another class's
   (`typographic_acc`), over two kinds of items in equal numbers: photos among the pool's 13
   photo subjects (prompted with their captions), and procedural shapes among the 60 colour x
   shape classes (prompted "a {colour} {shape} on {the picture's own background}").

Every score run, pair cache and trained model's result is cached under `--output` by what it
depends on, so an interrupted `make paper` resumes. The table and a plot go to BENCHMARKS.md;
the last line printed is one JSON object {"filters": {name: {"visual_acc", "visual_std",
"typographic_acc", "typographic_std", "runs"}}} (mean and sample standard deviation over
pools x seeds).
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

POOL_SEEDS = (500, 502)  # demo-model training seeds start at demo_model.TRAIN_SEED_BASE
EVAL_SEED = 501
EVAL_VERSION = 2  # bump when the evaluation changes: cached results of another one are not reused
FILTERS = ("none", "clip-score", "text-match", "tmars", "tmars-and-clip-score")
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
    samples: int = 20_000  # per pool; also the samples seen per training (DataComp's rule)
    shards: int = 16
    pools: int = 2  # pool seeds: the first `pools` of POOL_SEEDS
    seeds: int = 3  # training seeds per filter and pool
    batch_size: int = 64
    image_size: int = 64  # the trained model's input side (a multiple of 32)
    min_side: int = 160  # pool image sides (small images: cheap to score, still readable)
    max_side: int = 320
    per_class: int = 30
    threads: int = 2

    @property
    def steps(self) -> int:
        """Training steps: samples seen = pool size (in whole batches)."""
        return self.samples // self.batch_size


FULL = PaperSettings()


def pool_name(seed: int, s: PaperSettings) -> str:
    return f"{s.samples}x{s.shards}-seed{seed}-side{s.min_side}-{s.max_side}"


# -- 1. pool, scores and keep-lists --------------------------------------------------------------


def keep_lists(
    work: str, seed: int, s: PaperSettings, config: str | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """{filter: sorted pool indices kept} for the pool of `seed`, and facts about its scoring."""
    import pyarrow.parquet as pq

    from tmars_ray.config import Config
    from tmars_ray.devtools.synth import sample_uid, write_pool
    from tmars_ray.job import run
    from tmars_ray.run.layout import KEEP_PARQUET, RunLayout
    from tmars_ray.run.manifest import RunState
    from tmars_ray.selection.select import select

    # named by what they hold: a pool or run of other settings is never reused, and a pool
    # whose writing was interrupted (no marker) is written again
    name = pool_name(seed, s)
    pool = os.path.join(work, f"pool-{name}")
    if not os.path.exists(os.path.join(pool, ".complete")):
        write_pool(
            pool, s.samples, s.shards, seed, sides=(s.min_side, s.max_side), workers=s.threads
        )
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
    folders = {"text-match": scored}
    for method in ("clip-score", "tmars"):
        folders[method] = os.path.join(work, f"keep-{name}-{method}")
        select([state], folders[method], method=method, fraction=0.5)
    both = os.path.join(work, f"keep-{name}-tmars-and-clip-score")
    select([state], both, method="tmars", fraction=0.5, intersect=[folders["clip-score"]])
    folders["tmars-and-clip-score"] = both
    index = {sample_uid(seed, i): i for i in range(s.samples)}
    kept = {"none": _ok_indices(state, index)}
    for filt, folder in folders.items():
        uids = pq.read_table(RunLayout(folder).keep_file(KEEP_PARQUET), columns=["uid"])
        kept[filt] = np.array(sorted(index[u] for u in uids["uid"].to_pylist()), np.int64)
    total, failed, _ = state.failure_counts()
    facts.update(samples=total, failed=failed)
    return kept, facts


def _ok_indices(state, index: dict[str, int]) -> np.ndarray:
    """Pool indices of the samples scored `ok` (what "no filter" keeps)."""
    import pyarrow.parquet as pq

    ok = set()
    for r in state.records:
        for part in r.parts:
            t = pq.read_table(state.layout.path(part), columns=["uid", "status"]).to_pylist()
            ok |= {index[x["uid"]] for x in t if x["status"] == "ok"}
    return np.array(sorted(ok), np.int64)


def pool_pairs(
    work: str, seed: int, s: PaperSettings
) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """(images uint8 N x S x S x 3 at the trained model's input, captions, json records) of the
    pool's own shards in index order: training sees the very bytes that were scored. Cached."""
    import io
    import tarfile

    from PIL import Image

    name = pool_name(seed, s)
    cache = os.path.join(work, f"pairs-{name}-{s.image_size}.npz")
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            records = [json.loads(r) for r in z["records"]]
            return z["images"], list(z["captions"]), records
    geometry = demo_model._preprocess_geometry(s.image_size)
    pool = os.path.join(work, f"pool-{name}")
    images = np.zeros((s.samples, s.image_size, s.image_size, 3), np.uint8)
    captions, records = [""] * s.samples, [{}] * s.samples
    for shard in sorted(f for f in os.listdir(pool) if f.endswith(".tar")):
        with tarfile.open(os.path.join(pool, shard)) as tar:
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                data = tar.extractfile(member).read()
                i = int(key)
                if ext == "jpg":
                    im = Image.open(io.BytesIO(data)).convert("RGB")
                    images[i] = np.asarray(geometry(im), np.uint8)
                elif ext == "txt":
                    captions[i] = data.decode("utf-8")
                elif ext == "json":
                    records[i] = json.loads(data)
    tmp = f"{cache}.tmp-{os.getpid()}.npz"
    np.savez(
        tmp,
        images=images,
        captions=np.array(captions),
        records=np.array([json.dumps(r) for r in records]),
    )
    os.replace(tmp, cache)
    return images, captions, records


def pool_makeup(records: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of the pool: each caption category (synth: "text" = the caption is the written
    text), pictures carrying text their caption does not mention, any text at all, and text
    that overlaps the caption (text + both: the paper found nearly 40% in LAION)."""
    n = max(len(records), 1)
    cats = [r["category"] for r in records]
    share = {c: cats.count(c) / n for c in ("picture", "text", "both", "neither")}
    with_text = [bool(r["text_lines"]) for r in records]
    share["picture_with_unrelated_text"] = (
        sum(c == "picture" and t for c, t in zip(cats, with_text, strict=True)) / n
    )
    share["any_text"] = sum(with_text) / n
    share["text_in_caption"] = share["text"] + share["both"]
    return {k: round(v, 4) for k, v in share.items()}


# -- 2. training ---------------------------------------------------------------------------------


def model_config(work: str, image_size: int) -> str:
    """The demo architecture with another input side, as an open_clip config file."""
    with open(demo_model.config_path()) as f:
        cfg = json.load(f)
    cfg["vision_cfg"]["image_size"] = image_size
    path = os.path.join(work, f"tmars-paper-{image_size}.json")
    os.makedirs(work, exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=4)
    return path


def train_on(
    indices: np.ndarray,
    images: np.ndarray,
    captions: list[str],
    seed: int,
    s: PaperSettings,
    config: str,
) -> tuple[Any, Any, Any, list[float]]:
    """(model, preprocess, tokenizer, loss per epoch): the demo architecture from scratch on
    the pairs at `indices`, `s.steps` steps of `s.batch_size` (samples seen = pool size)."""
    import torch

    settings = demo_model.TrainSettings(
        batch_size=s.batch_size,
        threads=s.threads,
        seed=demo_model.TRAIN_SEED_BASE + seed,
        warmup_steps=max(1, s.steps // 10),
    )
    torch.set_num_threads(s.threads)
    torch.manual_seed(settings.seed)  # the same initial model for every filter
    model, preprocess, tokenizer = demo_model.create_model(config)
    tokens = tokenizer([captions[i] for i in indices])
    history = demo_model.fit(model, preprocess, images[indices], tokens, s.steps, settings)
    return model, preprocess, tokenizer, history


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


# -- 4. one trained model per (pool, filter, seed), cached ---------------------------------------


def run_model(
    work: str,
    pool_seed: int,
    filt: str,
    seed: int,
    kept: np.ndarray,
    pairs: tuple[np.ndarray, list[str]],
    evals: tuple[tuple, tuple],
    s: PaperSettings,
    config: str,
) -> dict[str, Any]:
    """Train and evaluate one model, or read its result from an earlier run (same settings,
    same evaluation version); the weights are kept beside the result."""
    import torch

    key = (
        f"{pool_name(pool_seed, s)}-{filt}-seed{seed}-{s.steps}x{s.batch_size}"
        f"-img{s.image_size}-t{s.threads}-e{EVAL_VERSION}"
    )
    path = os.path.join(work, "models", key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t0 = time.time()
    model, preprocess, tokenizer, history = train_on(kept, *pairs, seed, s, config)
    out = zero_shot(model, preprocess, tokenizer, *evals)
    out.update(
        kept=int(len(kept)),
        samples_seen=s.steps * s.batch_size,
        loss=history[-1],
        seconds=round(time.time() - t0, 1),
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), os.path.join(work, "models", key + ".pt"))
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


# -- 5. aggregate, claims, report ----------------------------------------------------------------

METRICS = ("visual", "typographic", "photo_visual", "photo_typographic", "shape_visual",
           "shape_typographic")  # fmt: skip


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per filter: mean and sample standard deviation (ddof 1) of each accuracy over its runs."""
    out = {}
    for filt, results in runs.items():
        row: dict[str, float] = {"runs": len(results)}
        for m in METRICS:
            v = np.array([r[f"{m}_acc"] for r in results], float)
            row[f"{m}_acc"] = round(float(v.mean()), 4)
            row[f"{m}_std"] = round(float(v.std(ddof=1)) if len(v) > 1 else float("nan"), 4)
        row["kept"] = round(float(np.mean([r["kept"] for r in results])), 1)
        row["loss"] = round(float(np.mean([r["loss"] for r in results])), 3)
        out[filt] = row
    return out


def claim(summary: dict, runs: dict, a: str, b: str, metric: str = "visual") -> dict[str, Any]:
    """Is filter `a` above filter `b` on `metric`? Claimed only when the difference of the means
    exceeds the sum of the two standard deviations (their mean +- std intervals do not touch);
    also how many paired runs (same pool, same seed) `a` wins."""
    ma, mb = summary[a][f"{metric}_acc"], summary[b][f"{metric}_acc"]
    spread = summary[a][f"{metric}_std"] + summary[b][f"{metric}_std"]
    diff = ma - mb
    wins = sum(
        x[f"{metric}_acc"] > y[f"{metric}_acc"] for x, y in zip(runs[a], runs[b], strict=True)
    )
    return {
        "difference": round(diff, 4),
        "spread": round(spread, 4),
        "above": bool(diff > spread),  # NaN spread (one run) never claims
        "paired_wins": f"{wins}/{len(runs[a])}",
    }


def plot(summary: dict, path: str) -> None:
    """Mean accuracy by filter with error bars (one standard deviation), visual and typographic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    for k, (metric, label) in enumerate((("visual", "visual"), ("typographic", "typographic"))):
        ax.bar(
            x + (k - 0.5) * 0.38,
            [summary[n][f"{metric}_acc"] for n in names],
            0.36,
            yerr=[summary[n][f"{metric}_std"] for n in names],
            capsize=4,
            label=label,
        )
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("zero-shot accuracy")
    lo = min(summary[n][f"{m}_acc"] for n in names for m in ("visual", "typographic"))
    ax.set_ylim(max(0.0, lo - 0.1), None)
    ax.legend(fontsize=8)
    ax.set_title("make paper: mean over pools x seeds, error bars 1 std", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def table(
    summary: dict, claims: dict, makeup: dict, facts: dict, s: PaperSettings, command: str,
    eval_images: int, plot_path: str | None,
) -> str:  # fmt: skip
    # the thread count changes speed, not the experiment
    reduced = dataclasses.replace(s, threads=FULL.threads) != FULL
    pools = ", ".join(
        f"seed {seed}: scored in {f['scoring_seconds']} s, {f['failed']} failed"
        for seed, f in facts.items()
    )
    lines = [
        MARK_BEGIN,
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {platform.node()}: "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
        "no GPU.",
        f"Command: `{command}`"
        + (
            " - a REDUCED configuration (full: `make paper`, defaults " + _settings(FULL) + ")."
            if reduced
            else " (`make paper`)."
        ),  # fmt: skip
        f"Pools: {s.pools} x {s.samples} synthetic samples ({s.shards} shards, images "
        f"{s.min_side}-{s.max_side} px; {pools}), scored by `tmars run` with the demo model and "
        "text recognition. Make-up (mean over the pools): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in makeup.items())
        + f". Training (DataComp's rule): the demo architecture at {s.image_size} px from "
        f"scratch, {s.steps} steps x batch {s.batch_size} = {s.steps * s.batch_size} samples "
        f"seen for every filter (= the pool size), {s.seeds} seeds x {s.pools} pools per filter. "
        f"Evaluation: {eval_images} held-out text-free pictures (seed {EVAL_SEED}), half photos "
        f"({len(CLASS_WORDS)}-way zero-shot over the photo subjects, chance "
        f"{1 / len(CLASS_WORDS):.3f}), half procedural shapes ({len(shape_classes())}-way over "
        f"colour x shape, chance {1 / len(shape_classes()):.3f}); typographic: the same "
        "pictures with another class's name written on them. Mean +- sample std over runs.",
        "",
        "| filter | kept (mean) | visual_acc | typographic_acc | photos: visual / typographic "
        "| shapes: visual / typographic | final train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in summary.items():
        lines.append(
            f"| {name} | {r['kept']:.0f} | {_pm(r, 'visual')} | {_pm(r, 'typographic')} "
            f"| {_pm(r, 'photo_visual')} / {_pm(r, 'photo_typographic')} "
            f"| {_pm(r, 'shape_visual')} / {_pm(r, 'shape_typographic')} | {r['loss']:.3f} |"
        )
    lines.append("")
    for (a, b), c in claims.items():
        verdict = (
            "**above, beyond the spread**" if c["above"] else "**not shown** (within the spread)"
        )
        lines.append(
            f"- {a} vs {b}, visual: difference {c['difference']:+.4f}, spread (sum of stds) "
            f"{c['spread']:.4f}: {verdict}; {a} higher in {c['paired_wins']} paired runs."
        )
    if plot_path:
        lines += ["", f"![accuracy by filter]({plot_path})"]
    lines += ["", MARK_END]
    return "\n".join(lines)


def _pm(row: dict, metric: str) -> str:
    return f"{row[f'{metric}_acc']:.3f} +- {row[f'{metric}_std']:.3f}"


def _json_number(v: float) -> float | None:
    return None if isinstance(v, float) and np.isnan(v) else v


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


def experiment(work: str, s: PaperSettings, config: str | None) -> dict[str, Any]:
    """The whole experiment: {"runs": {filter: [result per (pool, seed)]}, "summary", "claims",
    "makeup", "facts", "eval_images"}."""
    if s.pools > len(POOL_SEEDS) or s.pools < 1:
        raise ValueError(f"pools must be 1..{len(POOL_SEEDS)}")
    if s.image_size % 32:
        raise ValueError("image_size must be a multiple of 32 (the demo ResNet's stride)")
    t0 = time.time()
    arch = model_config(work, s.image_size)
    photos = eval_set(s.per_class, s.image_size)
    shapes = shape_eval_set(len(photos[2]), s.image_size)
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in FILTERS}
    facts, makeups = {}, []
    for pool_seed in POOL_SEEDS[: s.pools]:
        kept, facts[pool_seed] = keep_lists(work, pool_seed, s, config)
        log.info("pool %d keep-lists: %s", pool_seed, {k: len(v) for k, v in kept.items()})
        images, captions, records = pool_pairs(work, pool_seed, s)
        makeups.append(pool_makeup(records))
        for filt in FILTERS:
            for seed in range(s.seeds):
                r = run_model(
                    work, pool_seed, filt, seed, kept[filt], (images, captions),
                    (photos, shapes), s, arch,
                )  # fmt: skip
                runs[filt].append(r)
                log.info(
                    "pool %d %s seed %d: visual %.3f typographic %.3f (%.0f s so far)",
                    pool_seed, filt, seed, r["visual_acc"], r["typographic_acc"],
                    time.time() - t0,
                )  # fmt: skip
    summary = aggregate(runs)
    claims = {
        (a, b): claim(summary, runs, a, b)
        for a, b in (("tmars", "none"), ("tmars", "clip-score"), ("tmars-and-clip-score", "none"))
    }
    makeup = {k: round(float(np.mean([m[k] for m in makeups])), 4) for k in makeups[0]}
    return {
        "runs": runs,
        "summary": summary,
        "claims": claims,
        "makeup": makeup,
        "facts": facts,
        "eval_images": len(photos[2]) + len(shapes[2]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Defaults are the full experiment (`make paper`); smaller settings are reported "
        "as REDUCED.",
    )
    parser.add_argument("--output", default="build/paper", help="work folder (caches; resumable)")
    parser.add_argument("--config", default="jobs/configs/local-cpu.yaml", help="scoring config")
    for f in dataclasses.fields(PaperSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    parser.add_argument("--write", default=None, help="replace the table in this Markdown file")
    parser.add_argument(
        "--plot", default=None, help="plot file (default: paper.png beside --write, if given)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = PaperSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PaperSettings)})
    command = "python -m tmars_ray.devtools.paper " + " ".join(argv or sys.argv[1:])
    t0 = time.time()
    res = experiment(args.output, s, args.config)
    plot_file = args.plot or (
        os.path.join(os.path.dirname(os.path.abspath(args.write)), "benchmarks", "paper.png")
        if args.write
        else None
    )
    shown = None
    if plot_file:
        plot(res["summary"], plot_file)
        base = os.path.dirname(os.path.abspath(args.write)) if args.write else os.getcwd()
        shown = os.path.relpath(plot_file, base)
    block = table(
        res["summary"], res["claims"], res["makeup"], res["facts"], s, command.strip(),
        res["eval_images"], shown,
    )  # fmt: skip
    print(block)
    log.info("whole experiment: %.0f s", time.time() - t0)
    if args.write:
        write_benchmarks(args.write, block)
    keys = ("visual_acc", "visual_std", "typographic_acc", "typographic_std", "runs")
    last = {f: {k: _json_number(r[k]) for k in keys} for f, r in res["summary"].items()}
    print(json.dumps({"filters": last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
