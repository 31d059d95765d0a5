"""Job behaviour (CLI group `job`): the failure budgets that set the exit code, and the report."""

from __future__ import annotations

from dataclasses import dataclass

from tmars_ray.config.options import opt


@dataclass
class JobOptions:
    max_failures: float = opt(
        0.01, "Failure budget: exit non-zero when more than this share of samples failed.", "job"
    )
    max_failed_shards: int = opt(
        0,
        "Failed-shard budget: exit non-zero when more shards than this could not be read "
        "(not a readable tar or parquet, gone, or image column missing / of the wrong type). "
        "Failed shards are listed in summary.json and read again by the next run.",
        "job",
    )
    report: bool = opt(True, "Write report.html next to the keep-list.", "job")

    def check_job(self) -> None:
        if not 0.0 <= self.max_failures <= 1.0:
            raise ValueError(f"max_failures={self.max_failures}: must be within [0, 1]")
        if self.max_failed_shards < 0:
            raise ValueError(f"max_failed_shards={self.max_failed_shards}: must be >= 0")
