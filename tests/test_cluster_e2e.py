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
