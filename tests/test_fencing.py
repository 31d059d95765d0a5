"""One driver per run, for real (issue 24, DESIGN 5-6): two real `tmars run` processes on one
run folder. Driver A is stopped (SIGSTOP) past the lease ttl mid-run; driver B takes the run
over; A is resumed (SIGCONT) while B works. A must notice at once that it lost the lease and
exit non-zero without writing, deleting or publishing anything; B finishes, and the keep-list
is byte-identical to a clean run's."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_cli_flags
from tmars_ray.run.manifest import RunState

TTL = 4  # seconds: TMARS_LEASE_TTL for both drivers
SHARDS = 8


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    from tmars_ray.devtools.synth import write_pool

    out = tmp_path_factory.mktemp("fence-pool")
    write_pool(str(out), samples=8 * SHARDS, shards=SHARDS, seed=21)
    return str(out)


def _driver(pool: str, out: Path, checkpoint: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMARS_LEASE_TTL": str(TTL)}
    env.pop("RAY_ADDRESS", None)  # each driver starts its own local Ray, as users would
    cli = [sys.executable, "-m", "tmars_ray", "run", "--input", pool, "--output", str(out)]
    return subprocess.Popen(
        cli + tiny_cli_flags(checkpoint), cwd=REPO, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _segments(run: Path) -> list[str]:
    return glob.glob(str(run / "manifest" / "seg-*.parquet"))


def test_a_driver_stalled_past_its_lease_is_fenced_and_the_keep_list_is_exact(
    pool, tiny_checkpoint, tmp_path
):
    run = tmp_path / "run"
    a = _driver(pool, run, tiny_checkpoint, tmp_path / "a.log")
    b = None
    try:
        _wait_for(lambda: _segments(run) or a.poll() is not None, 300, "A's first shard")
        os.kill(a.pid, signal.SIGSTOP)
        assert a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
        stopped_with = len(_segments(run))
        assert stopped_with < SHARDS and not (run / "keep" / "summary.json").exists()
        time.sleep(TTL + 1)  # A's heartbeat ages past its ttl
        b = _driver(pool, run, tiny_checkpoint, tmp_path / "b.log")

        def b_holds() -> bool:
            try:
                return json.loads((run / "lease.json").read_text())["pid"] == b.pid
            except (FileNotFoundError, ValueError, KeyError):
                return b.poll() is not None

        _wait_for(b_holds, 120, "B to take the lease over")
        os.kill(a.pid, signal.SIGCONT)  # A resumes while B works on the run
        a_rc = a.wait(timeout=180)
        a_log = (tmp_path / "a.log").read_text()
        assert a_rc != 0, a_log[-3000:]
        assert f"lost the run lease to host {os.uname().nodename} pid {b.pid}" in a_log, a_log[
            -3000:
        ]
        b_rc = b.wait(timeout=400)
        b_log = (tmp_path / "b.log").read_text()
        assert b_rc == 0, b_log[-3000:]
        assert "taking over the lease" in b_log
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    summary = json.loads((run / "keep" / "summary.json").read_text())
    assert summary["scoring"]["shards"]["skipped_done"] >= 1  # B resumed A's finished shards
    assert len(RunState.load(str(run)).records) == SHARDS  # one consistent record per shard
    assert not (run / "lease.json").exists()  # B released it; A did not write it back

    clean = tmp_path / "clean"
    c = _driver(pool, clean, tiny_checkpoint, tmp_path / "clean.log")
    assert c.wait(timeout=400) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    for name in ("keep.parquet", "keep.npy"):
        assert (run / "keep" / name).read_bytes() == (clean / "keep" / name).read_bytes(), name
