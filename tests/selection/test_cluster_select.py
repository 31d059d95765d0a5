"""`tmars select` with RAY_ADDRESS set runs on the cluster: a real two-node Ray cluster
(cluster/local scripts), and the keep-list equals the single-node one byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.selection.test_select import random_pool, split, write_run
from tmars_ray.selection import select as sel

pytestmark = pytest.mark.e2e


def test_tmars_select_on_a_two_node_cluster_equals_single_node(ray_cluster, tmp_path):
    rows = random_pool(np.random.default_rng(50), 3000, dup_share=0.05)
    rows["derived_uid"] = [False] * 3000
    run = write_run(tmp_path / "run", split(rows, [700, 1500, 2200]))
    local = str(tmp_path / "local")
    want = sel.select([run], local, method="tmars", fraction=0.4)
    env = {
        **ray_cluster.client_env(),  # RAY_ADDRESS: the CLI selects on this cluster
        "TMARS_SELECT_PARTITIONS": "3",
        "TMARS_SELECT_RUN_ROWS": "500",
        "HF_HUB_OFFLINE": "1",
    }
    out = str(tmp_path / "cluster")
    cmd = [sys.executable, "-m", "tmars_ray", "select", "--scores", run, "--output", out]
    proc = subprocess.run(
        [*cmd, "--fraction", "0.4"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + ray_cluster.logs_tail()
    got = json.loads(open(os.path.join(out, "keep", "summary.json")).read())
    assert got["execution"].pop("task_peak_rss_mb") > 0
    assert got["execution"] == {
        "mode": "ray",
        "partitions": 3,
        "scan_tasks": 4,  # one per shard: each holds >= TMARS_SELECT_RUN_ROWS rows
        "partition_bounds": "uid top bits",
    }
    for name in ("keep.parquet", "keep.npy"):
        a = open(os.path.join(local, "keep", name), "rb").read()
        assert a == open(os.path.join(out, "keep", name), "rb").read(), name
    assert got["counts"] == want["counts"] and got["threshold"] == want["threshold"]
