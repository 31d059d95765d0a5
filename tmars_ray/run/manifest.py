"""Completion manifest: one small JSON record per finished shard, written last and atomically.

Layout of a run folder:
    <run>/scores/<shard_id>.parquet    the shard's rows (exactly one per input sample)
    <run>/manifest/<shard_id>.json     written only after the parquet is complete

A shard is done iff its record exists. Score files without a record are partial output of an
interrupted run and are discarded on resume. One record per shard (instead of one growing file)
keeps writes O(1) and lets many writers finish shards concurrently.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import asdict, dataclass, field

from tmars_ray.run import storage

SCORES_DIR = "scores"
MANIFEST_DIR = "manifest"


@dataclass
class ShardRecord:
    shard: str  # source shard URL as read
    shard_id: str  # file-name-safe id, unique within the input
    score_file: str  # relative to the run folder
    rows: int  # rows written (== samples read from the shard)
    fingerprint: str  # Config.scoring_fingerprint() it was scored with
    shard_status: str = "ok"  # schema.SHARD_* (why a shard ended early)
    error: str | None = None  # shard-level error message, if any
    status_counts: dict[str, int] = field(default_factory=dict)


def shard_id_for(shard_url: str, input_root: str) -> str:
    """Stable, file-name-safe id of a shard: its path below the input root, plus a short hash
    so that two shards whose sanitised names collide still get distinct ids."""
    rel = (
        shard_url[len(input_root) :].lstrip("/") if shard_url.startswith(input_root) else shard_url
    )
    rel = rel or posixpath.basename(shard_url)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("._") or "shard"
    digest = hashlib.sha1(shard_url.encode()).hexdigest()[:8]
    return f"{safe[:120]}-{digest}"


def score_path(run: str, shard_id: str) -> str:
    return storage.join(run, SCORES_DIR, f"{shard_id}.parquet")


def record_path(run: str, shard_id: str) -> str:
    return storage.join(run, MANIFEST_DIR, f"{shard_id}.json")


def write_record(run: str, record: ShardRecord) -> None:
    storage.write_bytes_atomic(
        record_path(run, record.shard_id), json.dumps(asdict(record), sort_keys=True).encode()
    )


def read_records(run: str) -> list[ShardRecord]:
    """All completion records of a run, sorted by shard id (deterministic order)."""
    fs, root = storage.filesystem(storage.join(run, MANIFEST_DIR))
    if not fs.exists(root):
        return []
    records = []
    for path in sorted(fs.find(root)):
        if path.endswith(".json"):
            with fs.open(path, "rb") as f:
                records.append(ShardRecord(**json.loads(f.read())))
    return sorted(records, key=lambda r: r.shard_id)


def done_shards(run: str, fingerprint: str) -> dict[str, ShardRecord]:
    """Records of shards already scored with this fingerprint, keyed by source shard URL."""
    return {r.shard: r for r in read_records(run) if r.fingerprint == fingerprint}
