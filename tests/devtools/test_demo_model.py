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
