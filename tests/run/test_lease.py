"""One driver per run folder, with two real processes: the second refuses and names the holder;
a dead holder's lease is taken over once its heartbeat is older than its ttl."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, tiny_cli_flags
from tmars_ray.run.lease import Lease, LeaseHeld

HOLD = """
import sys, time
from tmars_ray.run.lease import Lease
Lease(sys.argv[1], ttl=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(run: str, ttl: float) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, run, str(ttl)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_driver_refuses_then_takes_over_a_dead_lease(tmp_path, small_pool, tiny_checkpoint):
    run = str(tmp_path / "run")
    holder = hold(run, ttl=4)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cli = [sys.executable, "-m", "tmars_ray", "score", "--input", small_pool, "--output", run]
        second = subprocess.run(
            cli + tiny_cli_flags(tiny_checkpoint),
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {holder.pid}" in second.stderr and "in use by another driver" in second.stderr
        with pytest.raises(LeaseHeld):
            Lease(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(4.5)  # the dead driver's heartbeat ages past its ttl
    lease = Lease(run, ttl=30).acquire()
    lease.release()
    assert not os.path.exists(os.path.join(run, "lease.json"))


def test_live_lease_is_renewed(tmp_path):
    run = str(tmp_path / "run")
    holder = hold(run, ttl=2)
    try:
        time.sleep(3)  # longer than the ttl: only the heartbeat keeps it alive
        with pytest.raises(LeaseHeld):
            Lease(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
