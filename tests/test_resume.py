"""Resume: a driver killed part-way (its whole process group) and rerun ends with a keep-list
byte-identical to an uninterrupted run, with no sample missing or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, done_shards, read_scores, tiny_cfg, tiny_cli_flags
from tmars_ray.job import run
from tmars_ray.run.manifest import RunState


def _cli(pool: str, out: str, checkpoint: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tmars_ray",
        "run",
        "--input",
        pool,
        "--output",
        out,
        *tiny_cli_flags(checkpoint, det_batch_size=2, clip_batch_size=2),
    ]


def test_killed_driver_rerun_gives_identical_keep_list(ray_session, tiny_checkpoint, tmp_path):
    from tmars_ray.devtools.synth import write_pool

    pool = str(tmp_path / "pool")
    write_pool(pool, samples=72, shards=12, seed=5)
    reference = tmp_path / "reference"
    cfg = tiny_cfg(input=pool, output=str(reference), clip_pretrained=tiny_checkpoint)
    assert run(cfg).exit_code == 0

    out = tmp_path / "interrupted"
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        _cli(pool, str(out), tiny_checkpoint),
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if done_shards(str(out)) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(RunState.load(str(out)).records)
    assert 0 < done_before < 12

    rerun = subprocess.run(
        _cli(pool, str(out), tiny_checkpoint),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = RunState.load(str(out)).records
    assert len(records) == 12
    for name in ("keep.parquet", "keep.npy"):
        assert (out / "keep" / name).read_bytes() == (reference / "keep" / name).read_bytes(), name
    table = read_scores(str(out))
    keys = table.select(["shard", "key"]).to_pylist()
    assert len(keys) == 72 and len({(k["shard"], k["key"]) for k in keys}) == 72
    ref = read_scores(str(reference)).sort_by("uid")
    assert table.sort_by("uid").equals(ref)  # every score bit-identical
