"""One driver per run folder: a lease file renewed by a heartbeat, and a fence.

Two drivers on one run (a manual rerun while a scheduled one runs) would each delete the other's
"partial" output. The lease (`<run>/lease.json`: holder host/pid/id, heartbeat time) refuses a
second live driver with an error that names the holder; a lease whose heartbeat is older than
`ttl` belongs to a dead (or stalled) driver and is taken over (at once when the holder ran on
this host and its process is gone).

Every renewal and every take-over is a compare-and-swap: read the lease, check who holds it,
write only if that is still what was read. On S3 the write is conditional (If-Match on the
ETag read, If-None-Match for a new lease: SeaweedFS and AWS S3 honour both; a server that
ignores them degrades to read-then-write, caught by the read-back below); on a local or shared
POSIX folder the read-check-write runs under an flock on `lease.json.lock`. A taker also
writes, waits a moment and reads back. A driver whose renewal finds another holder (or no
lease) is fenced: `storage.check_fence` - called before every driver write, delete and publish
- raises LeaseLost, and the driver stops. A driver stalled past the ttl (GC pause, SIGSTOP,
network) renews synchronously at its next write, so it cannot write before noticing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from tmars_ray.run import storage
from tmars_ray.run.layout import RunLayout

log = logging.getLogger(__name__)

DEFAULT_TTL = float(os.environ.get("TMARS_LEASE_TTL", "120"))
LOCK_NAME = "lease.json.lock"
LOCK_WAIT = 10.0  # seconds to wait for the local lock (held only for a read and a write)


class LeaseHeld(RuntimeError):
    """Another live driver works on this run folder."""


class LeaseLost(LeaseHeld):
    """This driver's lease was taken over while it stalled: it must not touch the run again."""


class _Conflict(Exception):
    """A conditional write found the lease changed since it was read."""


class Lease:
    def __init__(self, run: str, ttl: float | None = None, settle: float = 0.3) -> None:
        self.path = RunLayout(run).lease
        # read at construction, not import: tests and users set TMARS_LEASE_TTL per process
        ttl = float(os.environ.get("TMARS_LEASE_TTL", DEFAULT_TTL)) if ttl is None else ttl
        self.run, self.ttl, self.settle = run, ttl, settle
        self.id = uuid.uuid4().hex
        self.info = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid()}
        self.lost: str | None = None  # why this driver no longer holds the lease
        self._confirmed = 0.0  # wall time of the last renewal that found this driver holding it
        self._etag: str | None = None
        self._mutex = threading.Lock()  # the heartbeat and a synchronous check never overlap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- storage ---------------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        return self._read_tagged()[0]

    def _read_tagged(self) -> tuple[dict[str, Any] | None, str | None]:
        """(lease, ETag on S3). The ETag is read first: a write between the two leaves an
        older ETag beside a newer body, so the conditional write fails instead of passing."""
        fs, path = storage.filesystem(self.path)
        etag = None
        try:
            if storage.is_remote_fs(fs):
                fs.invalidate_cache(path)
                etag = fs.info(path).get("ETag")
            return json.loads(fs.cat_file(path)), etag
        except (FileNotFoundError, ValueError):
            return None, None

    def _write(self, etag: str | None, create: bool) -> None:
        """Write this driver's lease, on S3 only if the object is still `etag` (or, `create`,
        still absent); raises _Conflict when it is not."""
        data = json.dumps({**self.info, "heartbeat": time.time(), "ttl": self.ttl}).encode()
        fs, path = storage.filesystem(self.path)
        if not storage.is_remote_fs(fs):
            storage.write_bytes_atomic(self.path, data, fenced=False)  # under the flock
            return
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"} if create else {}
        try:
            out = fs.pipe_file(path, data, **cond)
        except OSError as err:
            if err.errno == errno.EINVAL and "precondition" in str(err).lower():
                raise _Conflict(str(err)) from None
            if err.errno == errno.ENOSYS and cond:  # server without conditional writes
                log.warning("%s: no conditional PUT on this server; lease is read-then-write", path)
                out = fs.pipe_file(path, data)
            else:
                raise
        self._etag = (out or {}).get("ETag") if isinstance(out, dict) else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Local folders: an exclusive flock around read-check-write (S3: conditional PUT)."""
        fs, path = storage.filesystem(self.path)
        if storage.is_remote_fs(fs):
            yield
            return
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(os.path.join(os.path.dirname(path), LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:  # its holder is stopped inside: go on
                        log.warning("%s held for %.0f s; going on without it", LOCK_NAME, LOCK_WAIT)
                        break
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- acquire / renew / check -----------------------------------------------------------
    def acquire(self) -> Lease:
        with self._locked():
            held, etag = self._read_tagged()
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
            try:
                self._write(etag if held else None, create=not held)
            except _Conflict:  # another driver wrote it since: it is alive or took it first
                raise LeaseHeld(_held_message(self.run, self._read() or {}, 0.0)) from None
        time.sleep(self.settle)
        held = self._read()
        if not held or held.get("id") != self.id:
            raise LeaseHeld(_held_message(self.run, held or {}, 0.0))
        self._confirmed = time.time()
        storage.set_fence(self.check)
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        """Compare, then write: renew only while the lease still names this driver."""
        with self._mutex:
            if self.lost:
                return
            with self._locked():
                held, etag = self._read_tagged()
                if not held or held.get("id") != self.id:
                    self._lose(held)
                    return
                try:
                    self._write(etag, create=False)
                except _Conflict:
                    self._lose(self._read())
                    return
            self._confirmed = time.time()

    def _lose(self, held: dict[str, Any] | None) -> None:
        silent = time.time() - self._confirmed
        to = (
            f"host {held.get('host')} pid {held.get('pid')}"
            if held
            else "another driver (which has since released it)"
        )
        self.lost = (
            f"lost the run lease to {to}: {self.run} was taken over after this driver was "
            f"silent for {silent:.0f} s (lease ttl {self.ttl:.0f} s: a stall such as a GC "
            "pause, SIGSTOP or a network partition). This driver stopped without writing, "
            "deleting or publishing anything more; the other driver's output stands. Rerun "
            "the command once it has finished, if needed."
        )
        log.error("%s", self.lost)

    def check(self) -> None:
        """Raise LeaseLost unless this driver still holds the lease. Cheap while the heartbeat
        is recent; after a stall (no confirmed renewal for ttl/2) it renews first."""
        if self.lost is None and time.time() - self._confirmed > self.ttl / 2:
            try:
                self._renew()
            except Exception as err:  # storage trouble: safe while no one can have taken it
                if time.time() - self._confirmed >= self.ttl:
                    raise LeaseLost(
                        f"could not renew the run lease of {self.run} for "
                        f"{time.time() - self._confirmed:.0f} s (ttl {self.ttl:.0f} s): another "
                        f"driver may hold it now; stopping ({err})"
                    ) from err
        if self.lost is not None:
            raise LeaseLost(self.lost)

    @property
    def held(self) -> bool:
        return self.lost is None

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl / 4)) and self.lost is None:
            try:
                self._renew()
            except Exception as err:  # noqa: BLE001 - retried at the next beat
                log.warning("could not renew the lease of %s: %s", self.run, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        storage.set_fence(None)
        if self.lost is not None:
            return  # not ours any more: the lease file belongs to the driver that took it
        with self._locked():
            held = self._read()
            if held and held.get("id") == self.id:
                fs, path = storage.filesystem(self.path)
                fs.rm(path)
        fs, path = storage.filesystem(self.path)
        folder = os.path.dirname(path)
        # a job that stopped before any output leaves no empty run (the lock file is kept
        # otherwise: unlinking it would let two processes lock two different files)
        if not storage.is_remote_fs(fs) and os.listdir(folder) == [LOCK_NAME]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, LOCK_NAME))
                os.rmdir(folder)

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
