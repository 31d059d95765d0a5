"""One driver per run folder, with two real processes: the second refuses and names the holder;
a dead holder's lease is taken over once its heartbeat is older than its ttl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import REPO, tiny_cli_flags
from tmars_ray.run.lease import Lease, LeaseHeld, LeaseLost

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


def _foreign(path: str, url: str | None = None) -> bytes:
    """Another driver's lease, as a take-over writes it."""
    from tmars_ray.run import storage

    body = json.dumps({"id": "other-driver", "host": "elsewhere", "pid": 4242,
                       "heartbeat": time.time(), "ttl": 30}).encode()  # fmt: skip
    storage.write_bytes_atomic(url or path, body, fenced=False)
    return body


@pytest.mark.parametrize("where", ["local", "s3"])
def test_renewal_checks_the_holder_and_fences_a_driver_that_lost_it(where, tmp_path, request):
    """The heartbeat never overwrites another driver's lease, and once it has seen one, every
    write of this driver is refused with 'lost the run lease to <holder>'."""
    from tmars_ray.run import storage

    if where == "s3":
        s3 = request.getfixturevalue("s3_env")
        run = s3.create_bucket("lease-fence") + f"/run-{uuid.uuid4().hex[:6]}"
    else:
        run = str(tmp_path / "run")
    lease = Lease(run, ttl=2).acquire()
    try:
        storage.write_bytes_atomic(storage.join(run, "ok.txt"), b"held")  # allowed while held
        body = _foreign(lease.path)
        time.sleep(2.0)  # several heartbeats (every ttl/4)
        assert storage.read_bytes(lease.path) == body  # renewal compared, did not overwrite
        assert not lease.held
        with pytest.raises(LeaseLost, match="lost the run lease to host elsewhere pid 4242"):
            storage.write_bytes_atomic(storage.join(run, "after.txt"), b"x")
        assert not storage.exists(storage.join(run, "after.txt"))
    finally:
        lease.release()
    assert storage.read_bytes(lease.path) == body  # release leaves the new holder's lease
    storage.write_bytes_atomic(storage.join(run, "later.txt"), b"x")  # no lease: no fence


def test_a_stalled_driver_renews_before_it_writes_and_finds_it_lost(tmp_path):
    """A stall past the ttl (here: the heartbeat stopped) lets another driver take over; the
    stalled driver's next write renews first, sees the new holder and is refused."""
    from tmars_ray.run import storage

    run = str(tmp_path / "run")
    stalled = Lease(run, ttl=2).acquire()
    stalled._stop.set()  # the heartbeat thread ends: as if the process were stopped
    stalled._thread.join()
    time.sleep(2.5)
    taker = Lease(run, ttl=30)
    taker.acquire()  # the stalled driver's heartbeat is older than its ttl
    storage.set_fence(stalled.check)  # the stalled process's view of its own lease
    with pytest.raises(LeaseLost, match=f"lost the run lease to host .* pid {os.getpid()}"):
        storage.write_bytes_atomic(storage.join(run, "x"), b"x")
    assert json.loads(storage.read_bytes(stalled.path))["id"] == taker.id
    stalled.release()
    assert json.loads(storage.read_bytes(taker.path))["id"] == taker.id
    taker.release()
