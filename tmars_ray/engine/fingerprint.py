"""Fingerprint checks: scores made under different settings must never be mixed unnoticed."""

from __future__ import annotations

import logging
from typing import Any

from tmars_ray.config import Config
from tmars_ray.run import manifest

log = logging.getLogger(__name__)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]  # fmt: skip


def describe_mismatch(cfg: Config, run: str, other: str) -> str:
    """Which fields differ between fingerprint `other` (recorded in `run`) and `cfg`'s."""
    stored = manifest.read_fingerprint(run, other)
    if stored is None:
        return f"fingerprint {other}, whose settings were not recorded"
    diffs = _diff(stored.get("fields", {}), cfg.fingerprint_fields()["fields"])
    return "; ".join(diffs) or f"fingerprint {other}"


def warn_version_changes(cfg: Config, run: str, fingerprint: str) -> list[str]:
    """Library versions that changed since `run` scored under the same fingerprint (a warning:
    same settings, so scores should agree, but they were not made by the same code)."""
    stored = manifest.read_fingerprint(run, fingerprint)
    if stored is None:
        return []
    diffs = _diff(stored.get("versions", {}), cfg.fingerprint_fields()["versions"])
    for d in diffs:
        log.warning("library version changed since %s was scored: %s", run, d)
    return diffs
