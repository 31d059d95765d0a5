"""Poison samples: a sample that kills its model worker (segfault, OOM kill, abort) must not be
retried forever nor take its batch down with it.

Ray restarts a dead model actor and retries its task a bounded number of times
(`MAX_TASK_RETRIES`). Before running a batch, the wrapped stage notes the batch's sample ids in
a small local file keyed by its actor id (a restarted actor keeps its id). When the same batch
comes back, the previous attempt died: the stage then runs it one sample at a time, noting
the sample in flight; a sample in flight when the process died again gets status
`worker_crash` and the rest of the batch goes on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa

from tmars_ray.data import schema
from tmars_ray.models.tmars import FatalStepError
from tmars_ray.run.driverlog import batch_input, describe

log = logging.getLogger(__name__)

MAX_TASK_RETRIES = 16  # a poison batch costs 1 + one per poison sample; a lost node a few
# Test-only fault injection: a stage aborts its process on the sample with this key.
CRASH_KEY_ENV = "TMARS_TEST_CRASH_ON_KEY"

Batch = dict[str, np.ndarray]


def _state_path() -> str:
    import ray

    actor = ray.get_runtime_context().get_actor_id() or f"pid{os.getpid()}"
    folder = os.path.join(tempfile.gettempdir(), "tmars-inflight")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{actor}.json")


def _ids(batch: Batch) -> list[str]:
    play = (batch["kind"] == "sample") & (batch["status"] == "")
    return [f"{s}/{i}" for s, i in zip(batch["shard_id"][play], batch["idx"][play])]


def _row(batch: Batch, i: int) -> Batch:
    return {k: v[i : i + 1] for k, v in batch.items()}


def _concat(outs: list[Any]) -> Any:
    if isinstance(outs[0], pa.Table):
        return pa.concat_tables(outs, promote_options="permissive")
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _maybe_crash(batch: Batch) -> None:
    key = os.environ.get(CRASH_KEY_ENV)
    if key and key in set(batch["key"][batch["status"] == ""].tolist()):
        log.error("test fault injection: aborting on sample %s", key)
        os.abort()


def isolating(stage_cls: type) -> type:
    """A subclass of a batch stage class (`__init__(cfg, ...)`, `__call__(batch)`) that
    isolates samples which kill the process."""

    class Isolating(stage_cls):  # type: ignore[misc, valid-type]
        @_names_its_input
        def __call__(self, batch: Batch) -> Any:
            path = _state_path()
            ids = _ids(batch)
            sig = hashlib.sha1("\n".join(ids).encode()).hexdigest()
            state = _load(path)
            if state.get("batch") != sig:
                _save(path, {"batch": sig, "bad": [], "current": None})
                _maybe_crash(batch)
                out = super().__call__(batch)
                _clear(path)
                return out
            # this batch killed the process before: one sample at a time
            bad = set(state["bad"]) | ({state["current"]} if state.get("current") else set())
            status = batch["status"].astype(object)
            for i, sid in enumerate(f"{s}/{j}" for s, j in zip(batch["shard_id"], batch["idx"])):
                if sid in bad and status[i] == "":
                    log.error("sample %s killed its worker repeatedly: worker_crash", sid)
                    status[i] = schema.WORKER_CRASH
            batch = {**batch, "status": status}
            outs = []
            for i in range(len(status)):
                sid = f"{batch['shard_id'][i]}/{batch['idx'][i]}"
                _save(path, {"batch": sig, "bad": sorted(bad), "current": sid})
                row = _row(batch, i)
                _maybe_crash(row)
                outs.append(super().__call__(row))
            _clear(path)
            return _concat(outs)

    Isolating.__name__ = Isolating.__qualname__ = stage_cls.__name__
    return Isolating


_STAGE_NAMES = {"DetectStage": "detect", "MaskScoreStage": "score"}  # the fused ones do both


def _names_its_input(call: Any) -> Any:
    """A batch's error names the samples it happened on: a FatalStepError gets `.input` (the
    shard and keys), any other exception becomes a StageError naming the stage (driverlog)."""

    @functools.wraps(call)
    def named(self: Any, batch: Batch) -> Any:
        try:
            return call(self, batch)
        except Exception as err:
            play = batch["kind"] == "sample"
            where = batch_input(batch["shard"][play].tolist(), batch["key"][play].tolist())
            if isinstance(err, FatalStepError):
                err.input = err.input or where
                raise
            raise describe(
                err, _STAGE_NAMES.get(type(self).__name__, "detect and score"), where
            ) from err

    return named


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save(path: str, state: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def _clear(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
