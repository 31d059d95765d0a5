"""The shipped demo model: addressed by name through the ordinary checkpoint path, and on a
small demo pool of a seed it never saw it shows T-MARS's mechanism through the real job:
T-MARS at 0.5 drops the pairs whose caption only names the text in the image and keeps the
picture pairs, while a CLIP-score filter at 0.5 keeps the text pairs (the model reads)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_cfg
from tmars_ray.devtools import demo_model

POOL_SEED = 41  # < demo_model.TRAIN_SEED_BASE: never seen in training
SAMPLES = 72


def test_shipped_files_and_the_ordinary_checkpoint_path() -> None:
    import torch
    from safetensors.torch import load_file

    from tmars_ray.models.clip import ModelSpec, ensure_weights, load_model

    weights = demo_model.weights_path()
    assert os.path.getsize(weights) <= 20 * 1024**2
    assert ensure_weights(ModelSpec("tmars-demo", "tmars-demo")) == weights
    model, preprocess, tokenizer, is_random = load_model(ModelSpec("tmars-demo", "tmars-demo"))
    assert not is_random
    shipped = load_file(weights)
    state = model.state_dict()
    assert set(shipped) == set(state)
    assert all(torch.equal(shipped[k], state[k]) for k in shipped)
    assert tokenizer(["a photo of a cat"]).shape[-1] == 32  # the demo config's context


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory):
    from tmars_ray.devtools.synth import generate_sample, write_pool
    from tmars_ray.job import run

    base = tmp_path_factory.mktemp("demo-model")
    write_pool(str(base / "pool"), samples=SAMPLES, shards=2, seed=POOL_SEED)
    cfg = tiny_cfg(
        input=str(base / "pool"),
        output=str(base / "run"),
        clip_model="tmars-demo",
        clip_pretrained="tmars-demo",
        method="tmars",
        fraction=0.5,
    )
    result = run(cfg)
    assert result.exit_code == 0, result.message
    assert result.summary["random_weights"] is False
    scores = pa.concat_tables(
        pq.read_table(p) for p in sorted((base / "run" / "scores").rglob("*.parquet"))
    ).to_pylist()
    assert len(scores) == SAMPLES and all(r["status"] == "ok" for r in scores)
    kept = set(pq.read_table(base / "run" / "keep" / "keep.parquet")["uid"].to_pylist())
    category = {r["uid"]: generate_sample(POOL_SEED, int(r["key"])).category for r in scores}
    return scores, kept, category, str(base / "run")


def _kept_share(kept: set[str], category: dict[str, str], cat: str) -> float:
    uids = [u for u, c in category.items() if c == cat]
    assert len(uids) >= 8, f"too few {cat!r} samples to judge"
    return sum(u in kept for u in uids) / len(uids)


def test_tmars_drops_text_pairs_and_keeps_picture_pairs(demo_run) -> None:
    _, kept, category, _ = demo_run
    assert len(kept) == SAMPLES // 2
    assert _kept_share(kept, category, "text") <= 0.15
    assert _kept_share(kept, category, "picture") >= 0.70


def test_clip_score_keeps_text_pairs(demo_run, tmp_path) -> None:
    """The same score table through the job's selection, ranked on clip_score instead."""
    from tmars_ray.selection.select import select

    _, _, category, run = demo_run
    select([run], str(tmp_path / "clip"), method="clip-score", fraction=0.5)
    kept = set(pq.read_table(tmp_path / "clip" / "keep" / "keep.parquet")["uid"].to_pylist())
    assert len(kept) == SAMPLES // 2
    assert _kept_share(kept, category, "text") >= 0.50


def test_training_pairs_have_one_closeup_per_text_sample_and_a_versioned_cache(tmp_path) -> None:
    from tmars_ray.devtools.synth import generate_sample

    seed, n = demo_model.TRAIN_SEED_BASE, 12
    images, captions, cats = demo_model.render_pairs(seed, n, 64, str(tmp_path), 1, reading=True)
    assert images.shape[1:] == (64, 64, 3) and len(images) == len(captions) == len(cats)
    with_text = [generate_sample(seed, i) for i in range(n)]
    assert cats.count("closeup") == sum(1 for s in with_text if s.lines) > 0
    words = {ln.text for s in with_text for ln in s.lines}
    closeup_captions = [c for c, k in zip(captions, cats, strict=True) if k == "closeup"]
    assert all(any(w in c for w in words) for c in closeup_captions)
    # cached under a name that changes with the generator's source: no stale pairs after an edit
    (cached,) = os.listdir(tmp_path)
    assert demo_model.generator_version() in cached
    again = demo_model.render_pairs(seed, n, 64, str(tmp_path), 1, reading=True)
    assert (again[0] == images).all() and again[1] == captions and again[2] == cats


def test_recalibrated_batchnorm_matches_the_batch_statistics() -> None:
    import numpy as np
    import torch

    torch.manual_seed(0)
    model, preprocess, _ = demo_model.create_model()
    size = 128  # the demo config's input size
    settings = demo_model.TrainSettings(batch_size=8)
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    x = demo_model._normalise(images, preprocess)
    for m in model.visual.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)  # stale statistics
    with torch.no_grad():
        model.train()
        batch_stats = model.encode_image(x)
        model.eval()
        stale = model.encode_image(x)
        demo_model.recalibrate_batchnorm(model, images, preprocess, settings)
        model.eval()
        fresh = model.encode_image(x)
    # equal up to BatchNorm's unbiased running variance (n / (n - 1) on 4x4 maps of 8 images)
    cos = torch.nn.functional.cosine_similarity
    assert cos(fresh, batch_stats).min() > 0.999
    assert cos(stale, batch_stats).min() < 0.99
