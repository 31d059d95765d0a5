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
3. Zero-shot classification of held-out text-free pictures, clean and with a misleading word
   written on them (`paper_eval`); mean and spread over runs, the claim rule, plot and table
   (`paper_report`).

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
import sys
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from tmars_ray.devtools import demo_model
from tmars_ray.devtools.paper_eval import (
    CLASS_WORDS,
    EVAL_SEED,
    EVAL_VERSION,
    eval_set,
    shape_classes,
    shape_eval_set,
    zero_shot,
)
from tmars_ray.devtools.paper_report import (
    MARK_BEGIN,
    MARK_END,
    aggregate,
    claim,
    json_number,
    plot,
    results_lines,
    write_benchmarks,
)

log = logging.getLogger(__name__)

POOL_SEEDS = (500, 502)  # demo-model training seeds start at demo_model.TRAIN_SEED_BASE
FILTERS = ("none", "clip-score", "text-match", "tmars", "tmars-and-clip-score")


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
    result = run(cfg)  # scores once (resumes when already scored)
    if result.exit_code:
        raise RuntimeError(result.message)
    facts = earlier or {"scoring_seconds": round(time.time() - t0, 1)}
    if earlier is None:
        with open(timing, "w") as f:
            json.dump(facts, f)
    state = RunState.load(scored)
    # every filter's keep-list from `tmars select` on this one score table
    folders = {}
    for method, fraction in (("clip-score", 0.5), ("text-match", None), ("tmars", 0.5)):
        folders[method] = os.path.join(work, f"keep-{name}-{method}")
        select([state], folders[method], method=method, fraction=fraction)
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
    """Train and evaluate one model, or read its result from an earlier run of the same
    settings, evaluation version and keep-list (a keep-list that changed - other scores -
    trains again); the weights are kept beside the result."""
    import hashlib

    import torch

    key = (
        f"{pool_name(pool_seed, s)}-{filt}-seed{seed}-{s.steps}x{s.batch_size}"
        f"-img{s.image_size}-pc{s.per_class}-t{s.threads}-e{EVAL_VERSION}"
    )
    kept_sha = hashlib.sha256(np.asarray(kept, np.int64).tobytes()).hexdigest()
    path = os.path.join(work, "models", key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier.get("kept_sha256") == kept_sha:
            return earlier
        log.info("%s: its keep-list changed since it was trained: training again", key)
    t0 = time.time()
    model, preprocess, tokenizer, history = train_on(kept, *pairs, seed, s, config)
    out = zero_shot(model, preprocess, tokenizer, *evals)
    out.update(
        kept=int(len(kept)),
        kept_sha256=kept_sha,
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


# -- 5. report -------------------------------------------------------------------------------------


def table(res: dict[str, Any], s: PaperSettings, command: str, plot_path: str | None) -> str:
    """The BENCHMARKS block of one `experiment` result `res`."""
    makeup, eval_images = res["makeup"], res["eval_images"]
    # the thread count changes speed, not the experiment
    reduced = dataclasses.replace(s, threads=FULL.threads) != FULL
    pools = ", ".join(
        f"seed {seed}: scored in {f['scoring_seconds']} s, {f['failed']} failed"
        for seed, f in res["facts"].items()
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
        *results_lines(res["summary"], res["claims"], plot_path),
    ]
    lines += ["", MARK_END]
    return "\n".join(lines)


def _settings(s: PaperSettings) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items())


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
    block = table(res, s, command.strip(), shown)
    print(block)
    log.info("whole experiment: %.0f s", time.time() - t0)
    if args.write:
        write_benchmarks(args.write, block)
    keys = ("visual_acc", "visual_std", "typographic_acc", "typographic_std", "runs")
    last = {f: {k: json_number(r[k]) for k in keys} for f, r in res["summary"].items()}
    print(json.dumps({"filters": last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
