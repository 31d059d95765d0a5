"""What a run folder was scored from: `<run>/input.json` and `<run>/input-shards.parquet`.

A run folder holds the scores of ONE input. Every scoring command, once it has listed its
input, `check`s the folder: a folder scored from another --input is refused (`InputMismatch`,
naming both). Its first write (after the model checks too: a refused job leaves nothing)
`record`s the listing (the shard URLs, then input.json naming their count), so a selection
can tell whether every listed shard is done (selection/complete.py) even when the scoring
stopped half way. `finish` adds the shards that could not be read at the end of a scoring
command.

URLs are stored with credentials masked by pattern (`redact(..., env={})`: the same text in
every environment, so a record's shard compares with the listing however the job was run).
Folders written before this file existed have none: their completeness cannot be checked.
"""

from __future__ import annotations

import io
import json
import os
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from tmars_ray.run import storage
from tmars_ray.run.layout import INPUT_JSON
from tmars_ray.run.layout import INPUT_LISTING as LISTING
from tmars_ray.run.redact import redact

if TYPE_CHECKING:
    from tmars_ray.run.manifest import RunState


class InputMismatch(ValueError):
    """A second --input into a run folder scored from another one."""


def masked(url: str) -> str:
    """A URL as stored and compared here: credentials masked by pattern only."""
    return redact(url, env={})


def normalise(url: str) -> str:
    """--input as compared: local paths absolute, no trailing slash, credentials masked."""
    if "://" not in url:
        url = os.path.abspath(url)
    return masked(url.rstrip("/") or url)


def read(run: str) -> dict[str, Any] | None:
    """The run's input.json, or None (not scored yet, or by a tmars-ray before it existed)."""
    try:
        return json.loads(storage.read_bytes(storage.join(run, INPUT_JSON)))
    except FileNotFoundError:
        return None


def listed_shards(run: str) -> list[str]:
    """The (masked) shard URLs the last scoring command listed."""
    data = storage.read_bytes(storage.join(run, LISTING))
    return pq.read_table(io.BytesIO(data))["shard"].to_pylist()


def _under(shard: str, root: str) -> bool:
    root = root.rstrip("/")
    return shard == root or shard.startswith(root + "/")


def check(run: str, input_url: str, root: str, state: RunState) -> None:
    """Refuse a run folder scored from another input (`InputMismatch`, naming both).

    `state`: the folder's completion records (a folder without input.json is checked by
    them: a record of a shard outside `root` means another input scored it)."""
    want = normalise(input_url)
    rec = read(run)
    if rec is not None and rec.get("input") != want:
        raise InputMismatch(_refusal(run, f"--input {rec['input']}", want, rec["input"]))
    if rec is None:
        foreign = [u for u in state.shard_urls() if not _under(u, root)]
        if foreign:
            had = (
                f"another input ({len(foreign)} of its {len(state)} done shards are not "
                f"under {masked(root)}, e.g. {masked(foreign[0])})"
            )
            raise InputMismatch(_refusal(run, had, want, "that scored them"))


def record(run: str, input_url: str, root: str, shards: list[str]) -> None:
    """Record this command's listing (the shard URLs, then input.json naming their count):
    the scoring command's first write, after `check` and the model checks."""
    buf = io.BytesIO()
    table = pa.table({"shard": pa.array([masked(s) for s in shards], pa.string())})
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(storage.join(run, LISTING), buf.getvalue())
    info = {"input": normalise(input_url), "root": masked(root), "shards": len(shards)}
    _write(run, {**info, "listing": LISTING, "scoring": "started", "failed": None})


def finish(run: str, failed: list[dict[str, Any]]) -> None:
    """End of a scoring command: the shards it could not read (their samples known read)."""
    rec = read(run)
    if rec is None:
        return
    rec["failed"] = [
        {
            "shard": masked(f["shard"]),
            "reason": masked(str(f.get("reason"))),
            "samples_read": f.get("samples_read"),
        }
        for f in failed
    ]
    rec["scoring"] = "finished"
    _write(run, rec)


def _write(run: str, rec: dict[str, Any]) -> None:
    data = (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode()
    storage.write_bytes_atomic(storage.join(run, INPUT_JSON), data)


def _refusal(run: str, had: str, want: str, resume: str) -> str:
    return (
        f"refusing --input {want}: the output {masked(run)} holds the scores of {had}; one run "
        "folder holds the scores of one input (a keep-list over both would mix them). Use a "
        f"new --output for {want}, or the same --input ({resume}) to resume that run"
    )
