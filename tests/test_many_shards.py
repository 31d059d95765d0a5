"""Many tiny shards in a real S3 server: the job completes, a driver killed part-way resumes
(done shards skipped, nothing lost or duplicated), and selection reads the run from S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, done_shards, read_scores, tiny_cli_flags
from tmars_ray.devtools.bench_scale import tiny_pool

SHARDS, PER_SHARD = 300, 2


def test_many_tiny_shards_in_s3_complete_and_resume(ray_session, s3_env, tiny_checkpoint, tmp_path):
    tiny_pool(tmp_path / "pool", SHARDS, PER_SHARD, seed=3)  # 6x6 px: the detector skips them
    s3_env.upload_dir(tmp_path / "pool", "s3://many/pool")
    run = "s3://many/run"
    cli = [sys.executable, "-m", "tmars_ray", "run", "--input", "s3://many/pool",
           "--output", run, *tiny_cli_flags(tiny_checkpoint)]  # fmt: skip
    # its own local Ray: workers inherit the driver's AWS environment, as with a plain local
    # `tmars run` (on a cluster, the nodes or the job's runtime env carry it)
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cli, env=env, cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "w"),
    )  # fmt: skip
    fs = s3_env.filesystem()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if fs.exists("many/run/manifest") and fs.ls("many/run/manifest", refresh=True):
            break  # the first completion records are in: interrupt now
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = done_shards(run)
    assert 0 < before < SHARDS

    rerun = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert done_shards(run) == SHARDS
    table = read_scores(run)
    keys = list(zip(table["shard"].to_pylist(), table["key"].to_pylist()))
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD
    assert set(table["status"].to_pylist()) == {"ok"}
    assert f"kept {SHARDS * PER_SHARD // 2} of {SHARDS * PER_SHARD}" in rerun.stdout
