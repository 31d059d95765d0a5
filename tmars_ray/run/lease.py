"""One driver per run folder: a lease file renewed by a heartbeat.

Two drivers on one run (a manual rerun while a scheduled one runs) would each delete the other's
"partial" output. The lease (`<run>/lease.json`: holder host/pid/id, heartbeat time) refuses a
second live driver with an error that names the holder; a lease whose heartbeat is older than
`ttl` belongs to a dead driver and is taken over (at once when the holder ran on this host
and its process is gone). Object stores have no compare-and-swap, so
a taker writes, waits a moment and reads back: of two simultaneous takers, one sees the
other's id and backs off.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from tmars_ray.run import storage
from tmars_ray.run.layout import RunLayout

log = logging.getLogger(__name__)

DEFAULT_TTL = float(os.environ.get("TMARS_LEASE_TTL", "120"))


class LeaseHeld(RuntimeError):
    """Another live driver works on this run folder."""


class Lease:
    def __init__(self, run: str, ttl: float = DEFAULT_TTL, settle: float = 0.3) -> None:
        self.path = RunLayout(run).lease
        self.run, self.ttl, self.settle = run, ttl, settle
        self.id = uuid.uuid4().hex
        self.info = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        body = {**self.info, "heartbeat": time.time(), "ttl": self.ttl}
        storage.write_bytes_atomic(self.path, json.dumps(body).encode())

    def acquire(self) -> Lease:
        held = self._read()
        if held and held.get("id") != self.id:
            age = time.time() - float(held.get("heartbeat", 0))
            if age < float(held.get("ttl", self.ttl)) and not _dead_here(held):
                raise LeaseHeld(_held_message(self.run, held, age))
            log.warning(
                "taking over the lease of %s from a driver silent for %.0f s (%s pid %s)",
                self.run,
                age,
                held.get("host"),
                held.get("pid"),
            )
        self._write()
        time.sleep(self.settle)
        held = self._read()
        if not held or held.get("id") != self.id:
            raise LeaseHeld(_held_message(self.run, held or {}, 0.0))
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl / 4)):
            try:
                self._write()
            except Exception as err:  # noqa: BLE001 - retried at the next beat
                log.warning("could not renew the lease of %s: %s", self.run, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held and held.get("id") == self.id:
            fs, path = storage.filesystem(self.path)
            fs.rm(path)
            folder = os.path.dirname(path)
            if not storage.is_remote_fs(fs) and not os.listdir(folder):
                os.rmdir(folder)  # a job that stopped before any output leaves no empty run

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _dead_here(held: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (killed): no need to wait."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _held_message(run: str, held: dict[str, Any], age: float) -> str:
    return (
        f"{run} is in use by another driver (host {held.get('host')}, pid {held.get('pid')}, "
        f"last heartbeat {age:.0f} s ago). Wait for it to finish, or use another --output. "
        f"A dead driver's lease expires {held.get('ttl', DEFAULT_TTL):.0f} s after its last "
        "heartbeat."
    )
