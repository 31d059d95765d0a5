"""Kept share per sample category, for T-MARS and for a CLIP-score filter at the same fraction.

Some pools carry a category per sample in its `.json` record (synthetic demo pools do: does
the caption describe the picture, the rendered text, both or neither). The score table does not
hold it, so it is read back from the source shards, bounded like the galleries: at most
`MAX_ROWS` sampled rows from at most `MAX_SHARDS` shards, each shard read once.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tmars_ray.report.views import Views, kth_largest
from tmars_ray.run import storage

log = logging.getLogger(__name__)

MAX_ROWS = 4000
MAX_SHARDS = 32
SHARD_READERS = 4
# Listed first, in this order, when present (the T-MARS paper's categories).
KNOWN_ORDER = ("picture", "text", "both", "neither")


def category_table(view: Views) -> dict[str, Any] | None:
    """{"rows": [{category, n, tmars_kept, clip_kept}], "fraction", "looked_at", "shards"} or
    None when the run has no selection or its pool carries no categories."""
    if view.fraction is None or not view.ok.any():
        return None
    tmars_kept, clip_kept = _kept_by_both(view)
    rows = np.nonzero(view.ok)[0]
    if rows.size > MAX_ROWS:
        rows = rows[np.linspace(0, rows.size - 1, MAX_ROWS).round().astype(int)]
    shard_col = view.table["shard"].to_pylist()
    key_col = view.table["key"].to_pylist()
    wanted: dict[str, set[str]] = {}
    for r in rows.tolist():
        wanted.setdefault(shard_col[r], set()).add(key_col[r])
    shards = sorted(wanted)[:MAX_SHARDS]
    with ThreadPoolExecutor(max(1, min(SHARD_READERS, len(shards)))) as pool:
        found = dict(zip(shards, pool.map(lambda s: read_categories(s, wanted[s]), shards)))
    cats: list[str] = []
    picked: list[int] = []
    for r in rows.tolist():
        c = found.get(shard_col[r], {}).get(key_col[r])
        if c is not None:
            cats.append(c)
            picked.append(r)
    if not cats:
        return None
    idx = np.array(picked)
    cat_arr = np.array(cats, dtype=object)
    names = [c for c in KNOWN_ORDER if c in set(cats)] + sorted(set(cats) - set(KNOWN_ORDER))
    out = []
    for c in names:
        m = idx[cat_arr == c]
        out.append(
            {
                "category": c,
                "n": int(m.size),
                "tmars_kept": float(tmars_kept[m].mean()),
                "clip_kept": float(clip_kept[m].mean()),
            }
        )
    return {
        "rows": out,
        "fraction": float(view.fraction),
        "looked_at": len(cats),
        "shards": len(shards),
        "all_shards": len(wanted),
    }


def _kept_by_both(view: Views) -> tuple[np.ndarray, np.ndarray]:
    """Kept flags of T-MARS and of CLIP-score at the run's kept fraction: the keep-list itself
    for the method the run used, the same fraction's cut on the sample for the other."""
    ok = view.ok

    def cut(values: np.ndarray) -> np.ndarray:
        thr = kth_largest(values[ok], view.fraction)
        return ok & (values >= thr) if thr is not None else np.zeros(len(ok), bool)

    tmars = ok & view.kept if view.method == "tmars" and view.kept is not None else None
    clip = ok & view.kept if view.method == "clip-score" and view.kept is not None else None
    return (cut(view.tmars) if tmars is None else tmars), (cut(view.clip) if clip is None else clip)


def read_categories(shard: str, keys: set[str]) -> dict[str, str]:
    """{key: category} for the wanted keys of one shard (webdataset .tar or parquet with a
    `json` column); {} when the shard cannot be read or carries no categories."""
    try:
        if shard.endswith(".parquet"):
            return _parquet_categories(shard, keys)
        return _tar_categories(shard, keys)
    except Exception as err:  # noqa: BLE001 - categories are extra; never cost the report
        log.warning("could not read categories from %s: %s", shard, err)
        return {}


def _category(data: bytes | str | None) -> str | None:
    try:
        meta = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        return None
    cat = meta.get("category") if isinstance(meta, dict) else None
    return cat if isinstance(cat, str) and cat else None


def _tar_categories(shard: str, keys: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            # the job's key rule: the member's path with its basename cut at the first dot
            dirname, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            key = posixpath.join(dirname, stem) if dirname else stem
            if ext.lower() != "json" or key not in keys or not member.isfile():
                continue
            reader = tar.extractfile(member)
            cat = _category(reader.read() if reader else None)
            if cat is not None:
                out[key] = cat
            if len(out) == len(keys):
                break
    return out


def _parquet_categories(shard: str, keys: set[str]) -> dict[str, str]:
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if not {"key", "json"} <= set(pf.schema_arrow.names):
            return out
        for batch in pf.iter_batches(batch_size=4096, columns=["key", "json"]):
            for key, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if key in keys:
                    cat = _category(data)
                    if cat is not None:
                        out[key] = cat
    return out
