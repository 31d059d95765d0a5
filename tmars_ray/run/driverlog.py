"""The run's driver log, and errors a user can act on.

Every `tmars run` / `tmars score` writes `<run>/logs/driver-<time>-<host>-<pid>.log`: the
driver's log records at INFO and up, then the full traceback of the error that ended it, all
redacted like every record. On object storage the log is written to the temp dir and put once
at the end; when the run folder cannot be written it stays in the temp dir, and the error says
so and where it is.

A failure names the stage and the input it happened on and says what to try. `stage(name,
input)` turns an unexpected exception into a `StageError`; what Ray workers raise reaches the
driver wrapped (RayTaskError), so `describe` looks through the wrappers for what our own
exceptions know: a `StageError` a worker raised (writing parts), the shard and keys a model
stage's `FatalStepError` carries, the shard in a `StorageError`'s message, and which of the
driver's steps raised (listing inputs, lease, manifest, publish).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone

from tmars_ray.run import storage
from tmars_ray.run.layout import RunLayout
from tmars_ray.run.redact import RedactingFilter, redact

_STORAGE = "; ".join(  # the part of a hint about object storage
    [
        "for s3:// check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
        "AWS_PROFILE) and the endpoint (AWS_ENDPOINT_URL)",
        "a submitted job needs them in its runtime env",
    ]
)
_RESUME = "rerun the same command to resume (finished shards are kept)"
HINTS = {
    "run folder": f"check that --output can be written from this machine; {_STORAGE}",
    "listing inputs": "check that --input names a folder, prefix, glob or file of .tar/.parquet "
    f"shards that this machine can read; {_STORAGE}",
    "reading shard": f"check that every node can read the shard; {_STORAGE}; {_RESUME}",
    "model load": "check --clip-model and --clip-pretrained (an open_clip checkpoint of that "
    "model, readable on every node, or a pretrained tag available offline) and the detector",
    "detect": f"check the detector, its files and the device; {_RESUME}",
    "score": f"check the CLIP model, its weights and the device; {_RESUME}",
    "detect and score": f"check the models, their weights and the device; {_RESUME}",
    "writing parts": f"check that the workers can write under --output; {_STORAGE}; {_RESUME}",
    "manifest": f"check that the driver can read and write --output; {_STORAGE}; {_RESUME}",
    "publish": f"check that --output/keep/ can be written; {_STORAGE}; the scores are kept: "
    "rerun `tmars select` or the same command",
    "select": "check the score tables (--scores-from, --threshold-from) and the selection "
    "options; the scores are kept: rerun `tmars select` or the same command",
    "scoring": _RESUME,
}
OOM_HINT = (
    "it ran out of memory: lower --clip-batch-size and --det-batch-size (or --write-batch-rows), "
    "or give the actors more memory"
)
_OOM = re.compile(r"out of memory|OutOfMemory|MemoryError|\bOOM\b", re.IGNORECASE)
_STORAGE_TEXT = re.compile(
    r"AccessDenied|Forbidden|InvalidAccessKeyId|SignatureDoesNotMatch|NoCredentials|"
    r"credentials|EndpointConnection|Could not connect|Connection refused|NoSuchBucket|"
    r"ExpiredToken|ClientConnectorError"
)
_READ_FAILED = re.compile(r"reading (?P<shard>\S+) failed: ")  # data/sources.py StorageError
# driver steps inside a phase, told by where our innermost frame was: (file, function prefix,
# stage, whether its input is the run folder rather than the phase's input)
_STEPS = (
    ("tmars_ray/data/sources.py", "list_shards", "listing inputs", False),
    ("tmars_ray/run/lease.py", "", "run folder", True),
    ("tmars_ray/run/inputs.py", "", "run folder", True),
    ("tmars_ray/run/manifest.py", "", "manifest", True),
    ("tmars_ray/run/summary.py", "", "publish", True),
)
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): .+$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its worker tracebacks
LOGGERS = ("", "ray", "ray.data")  # Ray's loggers do not propagate to the root


class StageError(RuntimeError):
    """An unexpected failure with where it happened: the stage, the input (shard and keys, a
    folder) and what to try. Crosses Ray's process boundary as itself."""

    def __init__(self, stage: str, input: str = "", detail: str = "", hint: str = "") -> None:
        self.stage, self.input, self.detail, self.hint = stage, input, detail, hint
        super().__init__(f"{stage} failed" + (f" on {input}" if input else "") + f": {detail}")

    def __reduce__(self):
        return (StageError, (self.stage, self.input, self.detail, self.hint))


@contextmanager
def stage(
    name: str, input: str = "", *, run: str = "", keep: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Exceptions in the block (except `keep`: errors already meant for the user) become a
    StageError naming the stage, with the original as its cause."""
    try:
        yield
    except keep:
        raise
    except StageError:
        raise
    except Exception as err:
        raise describe(err, name, input, run) from err


def describe(err: BaseException, name: str, input: str = "", run: str = "") -> StageError:
    """The StageError for `err`, raised in phase `name` on `input`: what our own exceptions
    in its chain know wins over the phase."""
    for e in _chain(err):
        ours = isinstance(getattr(e, "stage", None), str) and hasattr(e, "input")
        if ours and getattr(e, "cause", None) is None:  # StageError, FatalStepError
            where = getattr(e, "input", "") or input
            hint = getattr(e, "hint", "") or hint_for(e.stage, err)
            return StageError(e.stage, where, getattr(e, "detail", "") or _detail(e), hint)
        m = _READ_FAILED.match(str(e)) if type(e).__name__ == "StorageError" else None
        if m:
            return StageError("reading shard", m["shard"], _detail(e), hint_for("reading shard", e))
    step = _raised_in(err)
    if step:
        name, input = step[0], (run or input) if step[1] else input
    return StageError(name, input, _detail(err), hint_for(name, err))


def hint_for(name: str, err: BaseException) -> str:
    text = " ".join(f"{type(e).__name__} {e}" for e in _chain(err))
    if _OOM.search(text):
        return OOM_HINT
    hint = HINTS.get(name, _RESUME)
    return hint if _STORAGE in hint or not _STORAGE_TEXT.search(text) else f"{hint}; {_STORAGE}"


def batch_input(shards: Sequence[str], keys: Sequence[str]) -> str:
    """Where a batch's error happened: its first shard and that shard's keys."""
    if not len(shards):
        return ""
    first = shards[0]
    mine = [str(k) for s, k in zip(shards, keys) if s == first]
    where = f"{first} key {mine[0]}" if len(mine) == 1 else (
        f"{first} keys {mine[0]}..{mine[-1]} ({len(mine)} samples)"
    )  # fmt: skip
    others = len(set(shards)) - 1
    return where + (f" and {others} more shard(s)" if others else "")


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and what it wraps: Ray's `.cause`, `__cause__`, `__context__` (even suppressed)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]


def _detail(err: BaseException) -> str:
    """`Type: message` in a few lines. Ray's errors hold a worker's whole traceback: their
    cause, or else the traceback's last error line, stands for them."""
    cause = getattr(err, "cause", None)
    e = cause if isinstance(cause, BaseException) else err
    text = _ANSI.sub("", str(e)).strip()
    last = _ERROR_LINE.findall(text) if "\n" in text else []
    if last:
        return last[-1][:600]
    text = text if len(text) <= 600 else text[:600] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _raised_in(err: BaseException) -> tuple[str, bool] | None:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "tmars_ray" in f.filename]
    for f in reversed(frames):  # innermost first
        path = f.filename.replace(os.sep, "/")
        for suffix, func, name, in_run in _STEPS:
            if path.endswith(suffix) and f.name.startswith(func):
                return name, in_run
    return None


def full_traceback(err: BaseException) -> str:
    """Every exception of the chain with its traceback, suppressed contexts too (`raise ...
    from None` keeps the user's message short, not the log)."""
    parts = []
    for e in _chain(err):
        parts.append("".join(traceback.format_exception(type(e), e, e.__traceback__, chain=False)))
    sep = "\nThe above exception led to the following one:\n\n"
    return _ANSI.sub("", sep.join(reversed(parts)))


class _Handler(logging.FileHandler):
    """Its own format, whatever formatter `ray.init` puts on the root logger's handlers;
    every line redacted, Ray's colours dropped."""

    FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", redact(self.FORMAT.format(record)))


class _Once(logging.Filter):
    """A record reaching the handler through several loggers is written once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_tmars_driver_log", False):
            return False
        record._tmars_driver_log = True
        return True


class DriverLog:
    """The driver log of one command on the run folder `run`: attached to the driver's loggers
    from construction to `close`, which returns where the log is."""

    def __init__(self, run: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
        name = f"driver-{stamp}-{host}-{os.getpid()}.log"
        self.url = RunLayout(run).driver_log(name)
        self.problem = ""  # why the log is not at self.url (it is at self.local then)
        self.remote = storage.is_remote(self.url)
        temp = os.path.join(tempfile.gettempdir(), f"tmars-{name}")
        self.local = temp if self.remote else self.url
        if not self.remote:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.url)), exist_ok=True)
                open(self.url, "a").close()
            except OSError as err:
                self.problem, self.local = self._unwritable(err), temp
        self.handler = _Handler(self.local, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        self.handler.addFilter(_Once())
        self.handler.addFilter(RedactingFilter())
        for logger in LOGGERS:
            logging.getLogger(logger).addHandler(self.handler)
        self._write(f"tmars driver log: {' '.join(sys.argv)} (pid {os.getpid()})")

    def _unwritable(self, err: BaseException) -> str:
        return f"could not write {self.url}: {_detail(err)}"

    def _write(self, text: str, level: int = logging.INFO) -> None:
        record = logging.LogRecord("tmars_ray.driverlog", level, __file__, 0, text, None, None)
        self.handler.handle(record)  # this file only, never the console

    def error(self, err: BaseException, message: str) -> None:
        """The message the user sees, then the full traceback."""
        self._write(f"{message}\n{full_traceback(err)}", logging.ERROR)

    @property
    def location(self) -> str:
        return self.url if not self.problem else self.local

    def close(self) -> str:
        """Detach; on object storage put the log. Returns where it is (a line for the user
        naming the local copy and why, when it could not go to the run folder)."""
        for logger in LOGGERS:
            logging.getLogger(logger).removeHandler(self.handler)
        self.handler.close()
        if self.remote and not self.problem:
            try:
                with open(self.local, "rb") as f:
                    # not run output: also written by a driver that lost the run lease
                    storage.write_bytes_atomic(self.url, f.read(), fenced=False)
                os.remove(self.local)
            except Exception as err:  # noqa: BLE001 - the output is unreachable: keep it here
                self.problem = self._unwritable(err)
        if self.problem:
            return redact(f"{self.local} (not in the run folder: {self.problem})")
        return self.url
