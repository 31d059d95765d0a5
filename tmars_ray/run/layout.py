"""Every path under a run folder, in one place.

<run>/scores/<shard_id>/part-*.parquet   score rows, written by the workers
<run>/manifest/seg-*.parquet             completion records (a shard is done when listed)
<run>/fingerprints/<hash>.json           what each scoring fingerprint stands for
<run>/keep/keep.parquet, keep.npy        the keep-list
<run>/keep/summary.json                  written last; names the keep files it belongs to
<run>/report.html                        the visual report
<run>/lease.json                         the live driver's lease (one driver per run)
<run>/logs/driver-<time>-<host>-<pid>.log  a driver's log: INFO+ records, its final error's traceback
"""

from __future__ import annotations

from dataclasses import dataclass

from tmars_ray.run import storage

SCORES_DIR = "scores"
MANIFEST_DIR = "manifest"
FINGERPRINTS_DIR = "fingerprints"
KEEP_DIR = "keep"
KEEP_PARQUET = "keep.parquet"
KEEP_NPY = "keep.npy"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
LEASE_JSON = "lease.json"
LOGS_DIR = "logs"
INPUT_JSON = "input.json"  # what the run was scored from (run/inputs.py)
INPUT_LISTING = "input-shards.parquet"  # the shards that input listed


@dataclass(frozen=True)
class RunLayout:
    """Paths (URLs) under one run folder. Relative paths (`rel_*`) are what records store."""

    url: str

    def path(self, rel: str) -> str:
        return storage.join(self.url, *rel.strip("/").split("/"))

    # -- scoring -----------------------------------------------------------------------------
    @property
    def scores_dir(self) -> str:
        return storage.join(self.url, SCORES_DIR)

    def shard_scores_dir(self, shard_id: str) -> str:
        return storage.join(self.url, SCORES_DIR, shard_id)

    @staticmethod
    def rel_part(shard_id: str, name: str) -> str:
        return f"{SCORES_DIR}/{shard_id}/{name}"

    @property
    def manifest_dir(self) -> str:
        return storage.join(self.url, MANIFEST_DIR)

    def segment(self, name: str) -> str:
        return storage.join(self.url, MANIFEST_DIR, name)

    def fingerprint_file(self, fingerprint: str) -> str:
        return storage.join(self.url, FINGERPRINTS_DIR, f"{fingerprint}.json")

    @property
    def lease(self) -> str:
        return storage.join(self.url, LEASE_JSON)

    def driver_log(self, name: str) -> str:
        return storage.join(self.url, LOGS_DIR, name)

    # -- selection and report ----------------------------------------------------------------
    @property
    def keep_dir(self) -> str:
        return storage.join(self.url, KEEP_DIR)

    def keep_file(self, name: str) -> str:
        return storage.join(self.url, KEEP_DIR, name)

    @property
    def summary(self) -> str:
        return self.keep_file(SUMMARY_JSON)

    @property
    def report(self) -> str:
        return storage.join(self.url, REPORT_HTML)
