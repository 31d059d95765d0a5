"""Complete or say so: does a selection cover every shard its runs were asked to score?

Each run source records the shards its last scoring command listed (run/inputs.py). The
selection is `complete` only when every listed shard of every run source has a completion
record in one of the selection's run sources (a shard an earlier run scored, read through
--scores-from, counts). Otherwise summary.json says `complete: false`, how many shards are
missing and, where known, how many samples (a shard that could not be read counts the samples
read before it failed; a shard never scored, e.g. because the run stopped, counts none).
`complete` is None when it cannot be checked: a run folder from before listings were kept,
or plain score files (no listing).

`check_own` refuses a run whose records are not its own: a part outside its scores/ folder, or
a shard outside the input root the run was scored from (records planted from another input).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

from tmars_ray.run import inputs
from tmars_ray.run.layout import SCORES_DIR
from tmars_ray.run.manifest import RunState

EXAMPLES = 20  # missing shards named in the summary (all are counted)


def check_own(state: RunState) -> None:
    """Raise ValueError when a record of `state` points outside the run or its input."""
    for rec in state.records:
        for rel in rec.parts:
            norm = posixpath.normpath(rel.strip("/"))
            if rel.startswith("/") or norm.split("/")[0] != SCORES_DIR or ".." in rel.split("/"):
                raise ValueError(
                    f"{state.url}: the record of shard {inputs.masked(rec.shard)} lists part "
                    f"{rel!r}, which is not under the run's {SCORES_DIR}/; refusing to read "
                    "score files the run does not own - rescore that shard"
                )
    info = inputs.read(state.url)
    if info is None:
        return
    root = info["root"].rstrip("/")
    foreign = [
        r.shard for r in state.records if not (inputs.masked(r.shard) + "/").startswith(root + "/")
    ]
    if foreign:
        raise ValueError(
            f"{state.url} was scored from --input {info['input']}, but {len(foreign)} of its "
            f"completion records are of shards outside {root} (e.g. "
            f"{inputs.masked(foreign[0])}): the folder mixes inputs; select from a run folder "
            "of one input (rescore the other input into its own --output)"
        )


def completeness(runs: Sequence[RunState], plain_sources: int = 0) -> dict[str, Any]:
    """Summary fields: `complete`, `missing_shards` and the details under `completeness`."""
    done = {inputs.masked(r.shard) for st in runs for r in st.records}
    listed: set[str] = set()
    unchecked: list[str] = []
    failed: dict[str, dict[str, Any]] = {}
    stopped: list[str] = []
    for st in runs:
        info = inputs.read(st.url)
        if info is None:
            unchecked.append(st.url)
            continue
        listed.update(inputs.listed_shards(st.url))
        failed.update({f["shard"]: f for f in info.get("failed") or []})
        if info.get("scoring") != "finished":
            stopped.append(st.url)
    missing = sorted(listed - done)
    failed_missing = [failed[s] for s in missing if s in failed]
    at_least = sum(f.get("samples_read") or 0 for f in failed_missing)
    unknown = len(missing) - sum(1 for f in failed_missing if f.get("samples_read"))
    if missing:
        complete: bool | None = False
    elif unchecked or not runs or plain_sources:
        complete = None
    else:
        complete = True
    details = {
        "listed_shards": len(listed),
        "done_shards": len(listed) - len(missing),
        "missing_shards": len(missing),
        "failed_shards": len(failed_missing),
        "missing_samples_at_least": at_least,
        "missing_samples_unknown_in_shards": unknown,
        "missing_examples": missing[:EXAMPLES],
        "stopped_runs": stopped,  # their last scoring command did not finish
        "unchecked_sources": unchecked,
        "text": _text(complete, len(listed), missing, failed_missing, at_least, unknown),
    }
    if unchecked or plain_sources:
        what = [f"{len(unchecked)} run folder(s) without an input listing"] if unchecked else []
        what += [f"{plain_sources} plain score source(s)"] if plain_sources else []
        details["text"] += f" ({' and '.join(what)} could not be checked)"
    return {"complete": complete, "missing_shards": len(missing), "completeness": details}


def _text(
    complete: bool | None,
    listed: int,
    missing: list[str],
    failed: list[dict[str, Any]],
    at_least: int,
    unknown: int,
) -> str:
    if complete:
        return f"complete: all {listed} input shard(s) are scored"
    if not missing:
        return f"completeness unknown: {listed} listed shard(s), all scored"
    why = f"{len(failed)} could not be read, " if failed else ""
    samples = f"at least {at_least} samples missing" if at_least else "samples missing: unknown"
    if at_least and unknown:
        samples += f", plus an unknown number in {unknown} shard(s)"
    return (
        f"INCOMPLETE: {len(missing)} of {listed} input shard(s) are not in this keep-list "
        f"({why}{len(missing) - len(failed)} not scored); {samples}. Rerun the same scoring "
        "command to score them, then select again"
    )
