"""Shared test set-up: offline hub, one local Ray instance per session, a tiny CLIP checkpoint,
and small synthetic pools. Infrastructure fixtures (S3 server, multi-node cluster) come from
tests/infra."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may wait on the network
os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TMARS_PROGRESS_BARS", "0")
# a completion segment per finished shard: tiny test pools finish in seconds, and the fault
# and resume tests must see shards complete one by one (production batches them every 2 s)
os.environ.setdefault("TMARS_MANIFEST_FLUSH_SECONDS", "0")

from tests.infra.fixtures import *  # noqa: E402,F403

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"
TINY_CONFIG = str(ASSETS / "tmars-tiny-vit.json")
BUILD = REPO / "build" / "test"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (fast settings, DESIGN 8/9). Its GCS
    address lets subprocess drivers (resume/kill tests) join the same instance."""
    import ray

    BUILD.mkdir(parents=True, exist_ok=True)
    ctx = ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        _temp_dir=str(Path("/tmp") / f"tmars-ray-test-{os.getpid()}"),
        runtime_env={
            "env_vars": {"HF_HUB_OFFLINE": "1", "PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK": "True"}
        },
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny random open_clip model saved as a checkpoint: loaded through the same path as
    a user's --clip-pretrained /path/to/checkpoint."""
    import torch
    from safetensors.torch import save_file

    from tmars_ray.models.clip import ModelSpec, load_model

    model, *_ = load_model(ModelSpec(TINY_CONFIG, None, allow_random=True, seed=7))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    del torch
    return str(path)


def tiny_cfg(**overrides):
    from tmars_ray.config import Config

    base = dict(
        clip_model=TINY_CONFIG,
        det_batch_size=4,
        clip_batch_size=8,
        det_limit_side_len=640,
        device="cpu",
        report=False,
        write_batch_rows=8,  # tiny pools: shards complete one after another, not all at the end
    )
    base.update(overrides)
    return Config.load(None, **base)


def tiny_cli_flags(
    checkpoint: str, det_batch_size: int = 4, clip_batch_size: int = 8, model: str = TINY_CONFIG
) -> list[str]:
    """`tmars run` flags for the tiny model and fast settings: the CLI twin of `tiny_cfg`."""
    return [
        "--clip-model", model, "--clip-pretrained", checkpoint,
        "--det-batch-size", str(det_batch_size), "--clip-batch-size", str(clip_batch_size),
        "--det-limit-side-len", "640", "--device", "cpu", "--no-report",
        "--write-batch-rows", "8",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def small_pool(tmp_path_factory) -> str:
    """24 synthetic samples in 3 webdataset shards."""
    from tmars_ray.devtools.synth import write_pool

    out = tmp_path_factory.mktemp("pool")
    write_pool(str(out), samples=24, shards=3, seed=3)
    return str(out)


sys.path.insert(0, str(REPO))


def read_scores(run: str):
    """The score table of a run: exactly the parts its completion records list (what every
    reader of a run reads; parts left by killed or retried tasks are not in it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tmars_ray.run import storage
    from tmars_ray.run.manifest import RunState

    state = RunState.load(run)
    tables = []
    for r in state.records:
        for part in r.parts:
            fs, path = storage.filesystem(state.layout.path(part))
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else None


def done_shards(run: str) -> int:
    from tmars_ray.run.manifest import RunState

    return len(RunState.load(run).records)
