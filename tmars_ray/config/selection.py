"""Selection (CLI group `selection`): the method, how much to keep, and the earlier runs a
selection reuses (frozen threshold, refit, intersect/union). Nothing here changes a score."""

from __future__ import annotations

from dataclasses import dataclass

from tmars_ray.config.options import opt
from tmars_ray.selection import methods


@dataclass
class SelectionOptions:
    method: str = opt(
        "tmars",
        "Selection method.",
        "selection",
        choices=methods.NAMES,  # the registry's entries, live
    )
    fraction: float | None = opt(
        None,
        "Keep this share of ok samples (exact; default 0.5 for tmars/clip-score).",
        "selection",
    )
    threshold: float | None = opt(None, "Keep samples whose score >= this.", "selection")
    threshold_from: str | None = opt(
        None,
        "Reuse the threshold of an earlier run's keep/summary.json (frozen threshold).",
        "selection",
    )
    scores_from: list[str] = opt(
        [], "Earlier runs whose scores join this run's for the quantile (refit).", "selection"
    )
    intersect: list[str] = opt([], "Keep only uids also in these keep-lists.", "selection")
    union: list[str] = opt([], "Also keep uids in these keep-lists.", "selection")
    allow_mismatched_scores: bool = opt(
        False,
        "Use --threshold-from / --scores-from / --intersect / --union inputs scored under other "
        "settings (models, weights, preprocessing, precision, device) than this run's scores; "
        "refused by default. summary.json records the override and the fields that differ.",
        "selection",
    )
    text_match_threshold: float = opt(
        0.5, "text-match: drop when this share of OCR words appear in the caption.", "selection"
    )
    allow_derived_uids: bool = opt(
        False,
        "Write keep.npy even when kept uids were derived from (shard, key) because samples had "
        "no DataComp uid (such uids match nothing in DataComp; keep.parquet is always written).",
        "selection",
    )

    def check_selection(self) -> None:
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction}: must be within [0, 1]")
        if self.fraction is not None and self.threshold is not None:
            raise ValueError("give either fraction or threshold, not both")
