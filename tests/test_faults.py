"""Faults: a model actor SIGKILLed mid-run (a preempted worker, an OOM kill) costs time, never
rows. The job completes, every sample has exactly one row, and the scores do not depend on
which actor died."""

from __future__ import annotations

import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import done_shards, read_scores, tiny_cfg, tiny_cli_flags
from tmars_ray.job import run
from tmars_ray.run.manifest import RunState

SHARDS, SAMPLES = 4, 24


@pytest.fixture(scope="module")
def fault_pool(tmp_path_factory) -> str:
    from tmars_ray.devtools.synth import write_pool

    out = tmp_path_factory.mktemp("faultpool")
    write_pool(str(out), samples=SAMPLES, shards=SHARDS, seed=11)
    return str(out)


def _stage_pids(stage: str) -> list[int]:
    """PIDs of live actors of one pipeline stage in *this* test's Ray instance: the actor table
    of our GCS (so other Ray instances on the machine are never touched), matched on the
    process title Ray gives actor workers (`ray::MapWorker(MapBatches(<stage>))...`).
    ray.util.state would need the dashboard, which the test instance does not run."""
    import psutil
    from ray._private import state

    pids = []
    for info in state.actors().values():
        if info["State"] != "ALIVE" or not info["Pid"]:
            continue
        try:
            title = " ".join(psutil.Process(info["Pid"]).cmdline())
        except psutil.Error:
            continue
        if f"({stage})" in title and ".__init__" not in title:
            pids.append(info["Pid"])
    return pids


def _run_killing(stage: str, cfg) -> tuple[object, int]:
    """Run the job in a thread; as soon as the stage's actor is past its constructor (it lives
    only while the pool is being scored) and before every shard is done, SIGKILL it. Returns
    (job result, pid killed)."""
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.update(result=run(cfg)), daemon=True)
    thread.start()
    killed, deadline = 0, time.monotonic() + 400
    while thread.is_alive() and time.monotonic() < deadline:
        if not killed and done_shards(cfg.output) < SHARDS:
            pids = _stage_pids(stage)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.02)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive(), "job did not finish after the kill"
    assert killed, f"no {stage} actor was killed mid-run (job finished first?)"
    return box["result"], killed


def _check_exactly_once(cfg) -> pq.Table:
    records = RunState.load(cfg.output).records
    assert len(records) == SHARDS and all(r.shard_status == "ok" for r in records)
    table = read_scores(cfg.output)
    keys = [(r["shard"], r["key"]) for r in table.select(["shard", "key"]).to_pylist()]
    assert len(keys) == len(set(keys)) == SAMPLES
    assert set(table["status"].to_pylist()) == {"ok"}
    return table.sort_by([("shard", "ascending"), ("key", "ascending")])


@pytest.fixture(scope="module")
def killed_runs(ray_session) -> dict:
    """stage -> (score table, keep.parquet bytes) of its killed run, to compare the two."""
    return {}


@pytest.mark.parametrize("stage", ["TmarsStage", "DetectStage"])
def test_killed_model_actor_loses_no_sample(
    stage, killed_runs, fault_pool, tiny_checkpoint, tmp_path
):
    # the fused actor (the default layout) and the detection actor of the split layout
    cfg = tiny_cfg(
        input=fault_pool,
        output=str(tmp_path / "run"),
        clip_pretrained=tiny_checkpoint,
        det_batch_size=2,
        clip_batch_size=2,
        stage_layout="fused" if stage == "TmarsStage" else "split",
    )
    result, pid = _run_killing(stage, cfg)
    assert result.exit_code == 0, result.message
    table = _check_exactly_once(cfg)
    keep = (tmp_path / "run" / "keep" / "keep.parquet").read_bytes()
    killed_runs[stage] = (table, keep)
    if len(killed_runs) == 2:  # whichever actor died, in either layout: the same scores
        (t1, k1), (t2, k2) = killed_runs.values()
        assert t1.equals(t2) and k1 == k2


def _s3_rows(run: str) -> list[dict]:
    table = read_scores(run)
    return table.to_pylist() if table is not None else []


def _check_recorded_shards_are_whole(fs, run: str) -> int:
    """Every shard the manifest calls done has its listed parts with exactly its rows."""
    state = RunState.load(run)
    for rec in state.records:
        rows = sum(pq.read_metadata(state.layout.path(p).removeprefix("s3://"), filesystem=fs).num_rows
                   for p in rec.parts)  # fmt: skip
        assert rows == rec.rows == sum(rec.status_counts.values())
    return len(state.records)


def test_s3_outage_mid_run_retries_or_fails_cleanly(s3_env, fault_pool, tiny_checkpoint, tmp_path):
    """The S3 server is stopped mid-run and started again a few seconds later. Either the
    retries carry the job through, or it fails with a clear error having recorded nothing it
    did not write - and the rerun completes it. Either way: every sample exactly once."""
    import subprocess
    import sys

    from tests.conftest import REPO

    s3 = s3_env
    s3.create_bucket("faults")
    s3.upload_dir(fault_pool, "s3://faults/pool")
    fs = s3.filesystem()
    run_url = "s3://faults/run"
    cmd = [
        sys.executable,
        "-m",
        "tmars_ray",
        "run",
        "--input",
        "s3://faults/pool",
        "--output",
        run_url,
        *tiny_cli_flags(tiny_checkpoint, det_batch_size=2, clip_batch_size=2),
    ]
    # its own local Ray (RAY_ADDRESS=local: never another Ray instance on this machine); the
    # workers inherit the driver's AWS environment, as with a plain local `tmars run`
    env = {**os.environ, **s3.env(), "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if fs.exists("faults/run/scores") and fs.find("faults/run/scores"):
                break  # workers are writing score parts: the run is under way
            time.sleep(0.1)
        done_before = done_shards(run_url)
        assert proc.poll() is None and done_before < SHARDS, "run finished before the outage"
        s3.stop()
        time.sleep(5)
        s3.start()
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not s3.running:
            s3.start()
    log.seek(0)
    output = log.read()
    fs.invalidate_cache()
    _check_recorded_shards_are_whole(s3.pyarrow_filesystem(), run_url)
    if rc != 0:  # a clear failure, then the rerun finishes the job
        assert "Error" in output and ("connect" in output.lower() or "s3" in output.lower())
        rerun = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        fs.invalidate_cache()
    assert _check_recorded_shards_are_whole(s3.pyarrow_filesystem(), run_url) == SHARDS
    rows = _s3_rows(run_url)
    keys = [(r["shard"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)) == SAMPLES, output[-3000:]
    assert {r["status"] for r in rows} == {"ok"}
    kept = pq.read_table("faults/run/keep/keep.parquet", filesystem=fs)["uid"].to_pylist()
    assert len(kept) == SAMPLES // 2 and kept == sorted(set(kept))
    print(f"S3 outage run: exit {rc}, {done_before} shard(s) done before the outage")


@pytest.mark.e2e
def test_worker_node_removed_mid_run(ray_cluster, fault_pool, tiny_checkpoint, tmp_path):
    """The node running the model actors dies mid-run (its raylet SIGKILLed) and a new node
    joins: the actors restart there, lost work is redone, every sample ends up exactly once.
    Leaves the session cluster as it found it (head + one accel worker named w1)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    # both model pools on the accel worker (half an accel each), reads anywhere
    config = tmp_path / "cluster.yaml"
    config.write_text("actor_resources: {accel: 0.5}\n")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "tmars_ray",
        "run",
        "--config",
        str(config),
        "--input",
        fault_pool,
        "--output",
        str(out),
        *tiny_cli_flags(tiny_checkpoint, det_batch_size=2, clip_batch_size=2),
    ]
    env = {**ray_cluster.client_env(), "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    rejoined = False
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "scores").exists() and any((out / "scores").iterdir()):
                break  # workers are writing score parts: the model actors are at work
            time.sleep(0.1)
        done_before = done_shards(str(out))
        assert proc.poll() is None and done_before < SHARDS, "run finished before the kill"
        ray_cluster.kill_worker("w1")
        assert ray_cluster.add_worker() == "w1"
        rejoined = True
        rc = proc.wait(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not rejoined and "w1" not in ray_cluster.nodes():
            ray_cluster.add_worker()
    log.seek(0)
    output = log.read()
    assert rc == 0, output[-4000:] + ray_cluster.logs_tail()
    cfg = tiny_cfg(input=fault_pool, output=str(out))
    _check_exactly_once(cfg)
    kept = pq.read_table(out / "keep" / "keep.parquet")["uid"].to_pylist()
    assert len(kept) == SAMPLES // 2 and kept == sorted(set(kept))
    print(f"node removal: {done_before} shard(s) done before the worker died")
