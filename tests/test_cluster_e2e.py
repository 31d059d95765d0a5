"""The product where users run it: a real two-node Ray cluster (cluster/local scripts), the job
submitted with `ray job submit --working-dir .`, the pool read from a real S3 server and every
output written back to it; model actors land on the node that offers the accelerator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import REPO, done_shards, read_scores, tiny_cli_flags

pytestmark = pytest.mark.e2e

ACTORS_ON_NODES = """
import json, ray
from ray.util.state import list_actors, list_nodes
ray.init()
nodes = {n.node_id: n.resources_total for n in list_nodes()}
# actors that were placed on a node (a pool may also hold a never-started spare)
out = [(a.class_name, nodes.get(a.node_id, {})) for a in list_actors(limit=1000)
       if "Stage" in a.class_name and a.node_id]
print(json.dumps(out))
"""


def test_submitted_job_reads_and_writes_s3_on_a_two_node_cluster(
    ray_cluster, s3_server, tiny_checkpoint, tmp_path, monkeypatch
):
    """Submitted as users on offline clusters do: the job's own runtime env sets
    HF_HUB_OFFLINE and the S3 credentials. The driver must not re-declare them (Ray refuses to
    merge, and its error once printed the secret), and no log line may carry the secret."""
    from tmars_ray.devtools.synth import write_pool

    pool = tmp_path / "pool"
    write_pool(str(pool), samples=16, shards=2, seed=31)
    s3_server.upload_dir(pool, "s3://tmars-e2e/pool")
    job = ray_cluster.submit_job(
        [
            "python",
            "jobs/tmars_filter.py",
            "--input",
            "s3://tmars-e2e/pool/",
            "--output",
            "s3://tmars-e2e/runs/r1",
            "--config",
            "jobs/configs/local-cpu.yaml",
            *tiny_cli_flags(tiny_checkpoint, model="tests/assets/tmars-tiny-vit.json"),
            "--actor-resources",
            '{"accel": 0.25}',
        ],
        working_dir=REPO,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **s3_server.env()}},
        timeout=600,
    )
    secret = s3_server.env()["AWS_SECRET_ACCESS_KEY"]
    assert secret not in job.stdout and secret not in job.stderr
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "kept 8 of 16" in job.stdout

    fs = s3_server.filesystem()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)  # read the run back through the product's own reader
    scores = read_scores("s3://tmars-e2e/runs/r1")
    assert scores.num_rows == 16 and set(scores["status"].to_pylist()) == {"ok"}
    assert done_shards("s3://tmars-e2e/runs/r1") == 2
    summary = json.loads(fs.cat("tmars-e2e/runs/r1/keep/summary.json"))
    assert summary["counts"]["kept"] == 8
    with fs.open("tmars-e2e/runs/r1/keep/keep.npy", "rb") as f:
        keep = np.load(f)
    assert keep.dtype == np.dtype("u8,u8") and len(keep) == 8
    for secret in s3_server.env().values():  # credentials never land in outputs
        if len(secret) > 8:
            assert secret not in json.dumps(summary)

    placed = ray_cluster.run_python(ACTORS_ON_NODES)
    assert placed.returncode == 0, placed.stderr[-2000:]
    actors = json.loads(placed.stdout.strip().splitlines()[-1])
    assert {name for name, _ in actors} >= {"MapWorker(MapBatches(TmarsStage))"}
    assert all(res.get("accel") == 1 for _, res in actors), actors


VITB32_CKPT = REPO / "build" / "e2e" / "vitb32-random.pt"  # cached: reruns reuse it


@pytest.fixture(scope="session")
def vitb32_checkpoint() -> str:
    """A ViT-B-32-sized random open_clip ViT-B-32 saved as a state-dict file (~600 MB): what a
    user's --clip-pretrained /path/to/vitb32.pt looks like to the job. Made once, then reused."""
    if not VITB32_CKPT.exists():
        import open_clip
        import torch

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        VITB32_CKPT.parent.mkdir(parents=True, exist_ok=True)
        tmp = VITB32_CKPT.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(VITB32_CKPT)
    return str(VITB32_CKPT)


def test_readme_submit_with_defaults_vitb32(ray_cluster, s3_server, vitb32_checkpoint, tmp_path):
    """Exactly as the README shows users: no --config, no --actor-resources, the S3 settings and
    HF_HUB_OFFLINE in the job's runtime env, a ViT-B-32 checkpoint file (a file checkpoint is
    real weights as far as the job knows: no --allow-random-weights). The keep-list on S3
    equals an independent selection from the score table."""
    import pyarrow.parquet as pq

    from tmars_ray.devtools.synth import write_pool

    pool = tmp_path / "pool"
    write_pool(str(pool), samples=12, shards=2, seed=41)  # ViT-B-32 on 2 cores: ~20 img/s
    s3_server.upload_dir(pool, "s3://tmars-readme/pool")
    job = ray_cluster.submit_job(
        [
            "python",
            "jobs/tmars_filter.py",
            "--input",
            "s3://tmars-readme/pool/",
            "--output",
            "s3://tmars-readme/run/",
            "--clip-model",
            "ViT-B-32",
            "--clip-pretrained",
            vitb32_checkpoint,
        ],  # fmt: skip
        working_dir=REPO,
        runtime_env={"env_vars": {**s3_server.env(), "HF_HUB_OFFLINE": "1"}},
        timeout=900,
    )
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "RANDOM CLIP WEIGHTS" not in job.stdout

    fs = s3_server.filesystem()
    tables = []
    for path in fs.find("tmars-readme/run/scores/"):
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=["uid", "status", "tmars_score"]))
    rows = [r for t in tables for r in t.to_pylist()]
    assert len(rows) == 12
    ok = [r for r in rows if r["status"] == "ok"]
    ranked = sorted(ok, key=lambda r: (-r["tmars_score"], r["uid"]))
    expected = sorted(r["uid"] for r in ranked[: int(0.5 * len(ok))])
    with fs.open("tmars-readme/run/keep/keep.parquet", "rb") as f:
        kept = pq.read_table(f)["uid"].to_pylist()
    assert kept == expected and len(kept) == len(ok) // 2


# Ray's working_dir plugin unpacks with overwrite=True: on a cache miss for a package already on
# disk it deletes the directory and unpacks it again, leaving a driver inside it with a stale
# cwd (os.getcwd() raises FileNotFoundError). This entrypoint puts the driver in that state.
STALE_CWD_ENTRYPOINT = """
import os, runpy, shutil, sys
here = os.getcwd()
shutil.copytree(here, here + ".new")
shutil.rmtree(here)
os.rename(here + ".new", here)  # same path, new directory: the driver's cwd is gone
try:
    os.getcwd()
    raise SystemExit("cwd still alive: the test would prove nothing")
except FileNotFoundError:
    pass
os.environ["PWD"] = here  # what the job's shell set; the test's `python -c` has no shell
sys.argv = [os.path.join(here, "jobs/tmars_filter.py")] + sys.argv[1:]  # relative paths stay
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_driver_survives_a_stale_cwd(ray_cluster, s3_server, tiny_checkpoint, tmp_path):
    """Nothing in the driver depends on its cwd staying alive (the weights check once spawned
    a multiprocessing child, which calls os.getcwd(), and died with a bare FileNotFoundError)."""
    from tmars_ray.devtools.synth import write_pool

    pool = tmp_path / "pool"
    write_pool(str(pool), samples=8, shards=2, seed=43)
    s3_server.upload_dir(pool, "s3://tmars-stale/pool")
    job = ray_cluster.submit_job(
        [
            "python",
            "-c",
            STALE_CWD_ENTRYPOINT,
            "--input",
            "s3://tmars-stale/pool/",
            "--output",
            "s3://tmars-stale/run/",
            *tiny_cli_flags(tiny_checkpoint, model="tests/assets/tmars-tiny-vit.json"),
        ],  # fmt: skip
        working_dir=REPO,
        runtime_env={"env_vars": {**s3_server.env(), "HF_HUB_OFFLINE": "1"}},
        timeout=600,
    )
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-2000:]
    assert "kept 4 of 8" in job.stdout
