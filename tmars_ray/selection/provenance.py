"""Provenance checks: a threshold, a refit or a set operation only makes sense over scores made
the same way (DESIGN 5). A threshold fitted on ViT-L/14 or fp16 GPU scores means nothing on
ViT-B-32 CPU scores.

What is compared: the scoring fingerprint's fields (`Config.fingerprint_fields`: models,
weights by content, detector and its settings, preprocessing, precision, device type per
model), read from the run folders themselves (`fingerprints/<hash>.json`, one per fingerprint
its completion records name), so `tmars select` on an existing run checks the same thing as
`tmars run`. Fields that say how the input is read (columns, format, pixel and member-size
guards) and the CUDA batch size are not compared: they do not change what a score means.

Who is compared with the selection's own scores (its first run source):
- every other run source (`--scores-from`, repeated `--scores`);
- `--threshold-from`, `--intersect`, `--union`: the keep/ a summary.json seals; its scores'
  fields come from the summary's `provenance.fields`, else (older summaries) from the
  fingerprint files of the run folder around that keep/.
A plain keep-list file with no summary beside it, or plain score parquet, carries no record of
how it was scored: it is taken as it is and listed under `provenance.unchecked`.
A mismatch raises `ProvenanceMismatch` naming every differing field, unless
`allow_mismatched_scores`; then summary.json records the override and the differences.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from tmars_ray.run import storage
from tmars_ray.run import summary as run_summary
from tmars_ray.run.layout import KEEP_DIR, SUMMARY_JSON
from tmars_ray.run.manifest import RunState, read_fingerprint

# fingerprint fields that do not change what a score means (how input is read; CUDA batch)
NOT_COMPARED = (
    "input_format",
    "image_column",
    "caption_column",
    "uid_column",
    "key_column",
    "max_image_pixels",
    "max_member_bytes",
    "clip_batch_size",
)


class ProvenanceMismatch(ValueError):
    """Scores (or a threshold or keep-list fitted on scores) made under other settings."""


def comparable(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(fields.items()) if k not in NOT_COMPARED}


def run_fields(state: RunState) -> tuple[dict[str, Any] | None, list[str]]:
    """(comparable fields, fingerprints) of a run's scores; fields None when none recorded.
    Two fingerprints of one run that differ in compared fields are a mismatch already."""
    prints = sorted(state.fingerprints())
    found: dict[str, Any] | None = None
    for fp in prints:
        stored = read_fingerprint(state.url, fp)
        if stored is None:
            continue
        fields = comparable(stored.get("fields", {}))
        if found is not None and fields != found:
            raise ProvenanceMismatch(
                f"{state.url}: its shards were scored under different settings "
                f"({describe(diff(found, fields))}); rescore it under one configuration"
            )
        found = fields
    return found, prints


def _summary_of(url: str) -> tuple[dict[str, Any], str] | None:
    """(summary, keep_dir) sealing the keep-list or summary given as `url`, or None (a lone
    keep file without a summary beside it)."""
    keep_dir = run_summary.keep_dir_of(url)
    summary_url = storage.join(keep_dir, SUMMARY_JSON)
    if not storage.exists(summary_url):
        return None
    return json.loads(storage.read_bytes(summary_url)), keep_dir


def keep_fields(url: str) -> tuple[dict[str, Any] | None, str]:
    """(comparable fields, why unknown) of the scores behind a published selection."""
    found = _summary_of(url)
    if found is None:
        return None, "a keep-list file without summary.json: no record of its scores"
    summary, keep_dir = found
    recorded = (summary.get("provenance") or {}).get("fields")
    if recorded is not None:
        return comparable(recorded), ""
    # older summaries: the fingerprints of the run folder around keep/
    prints = sorted(summary.get("scoring_fingerprints") or {})
    if not prints and summary.get("fingerprint"):
        prints = [summary["fingerprint"]]
    if posixpath.basename(keep_dir.rstrip("/")) == KEEP_DIR and prints:
        run = keep_dir.rstrip("/").rsplit("/", 1)[0]
        stored = [read_fingerprint(run, fp) for fp in prints]
        if stored and all(s is not None for s in stored):
            fields = [comparable(s.get("fields", {})) for s in stored]  # type: ignore[union-attr]
            if all(f == fields[0] for f in fields):
                return fields[0], ""
    return None, "its summary.json records no scoring settings"


def diff(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: {"here": ours.get(k), "there": theirs.get(k)}
        for k in sorted(set(ours) | set(theirs))
        if ours.get(k) != theirs.get(k)
    }


def describe(d: dict[str, dict[str, Any]]) -> str:
    return "; ".join(f"{k}: {v['there']!r} there, {v['here']!r} here" for k, v in d.items())


def check(
    own: dict[str, Any] | None,
    own_name: str,
    others: list[tuple[str, str, dict[str, Any] | None, str]],
    allow_mismatched: bool = False,
) -> dict[str, Any]:
    """Compare `own` (the selection's scores, named `own_name`) with each (role, source,
    fields, why-unknown) of `others`. Returns the summary's `provenance` record; raises
    ProvenanceMismatch on a difference unless `allow_mismatched`."""
    mismatches, unchecked, checked = [], [], []
    for role, source, fields, why in others:
        if own is None or fields is None:
            reason = why if fields is None else f"{own_name}: no record of how it was scored"
            unchecked.append({"role": role, "source": source, "reason": reason})
            continue
        d = diff(own, fields)
        checked.append({"role": role, "source": source})
        if d:
            mismatches.append({"role": role, "source": source, "fields": d})
    if mismatches and not allow_mismatched:
        lines = [
            f"{m['role']} {m['source']} was scored under other settings "
            f"than {own_name}: field(s) {', '.join(m['fields'])} differ "
            f"({describe(m['fields'])})"
            for m in mismatches
        ]
        raise ProvenanceMismatch(
            "\n".join(lines) + "\nA threshold or keep-list fitted on other scores does not "
            "transfer; rescore under the same settings, or pass --allow-mismatched-scores to "
            "use it anyway (recorded in summary.json)."
        )
    return {
        "fields": own,
        "checked": checked,
        "unchecked": unchecked,
        "mismatched_scores_allowed": bool(allow_mismatched),
        "mismatches": mismatches,
        "not_compared": list(NOT_COMPARED),
    }
