"""The scoring phase on Ray Data: shards -> read tasks -> T-MARS actors (detect, mask, score;
or, split, detection actors -> mask+score actors) -> part-writer tasks -> small completion
records to the driver. Encoded image bytes travel between stages; each stage decodes what it needs.

Samples are rows (both actor pools batch freely across shards); each shard's reader ends with
an `end` row carrying the shard's sample count. Workers write the score parts; the driver gets
one small record per part and per shard end, adds them up (`writer.ShardTracker`) and writes a
shard's completion record when its rows add up. Nothing per-sample reaches the driver.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tmars_ray.config import Config
from tmars_ray.data import sources
from tmars_ray.engine import isolation, resources
from tmars_ray.engine.cluster import init_ray
from tmars_ray.engine.resources import fused
from tmars_ray.engine.stages import (
    DetectStage,
    DeviceTmarsStage,
    MaskScoreStage,
    TmarsStage,
    actor_options,
)
from tmars_ray.engine.writer import CRASH_ONCE_ENV, ShardTracker, write_parts
from tmars_ray.run import inputs, manifest, storage
from tmars_ray.run.manifest import ManifestWriter, RunState, ShardRecord
from tmars_ray.run.redact import install_log_filter

log = logging.getLogger(__name__)

READ_ROWS = 32  # rows per table a read task emits (small tables: the stages overlap)
BLOCK_BYTES = 1 << 20  # Ray Data block size target (encoded images: ~10-50 per block)

# Variables the model workers need; handed to each stage, never re-declared in ray.init (a job
# submitted with its own runtime env that sets them would fail to merge).
WORKER_ENV = (
    "HF_HUB_OFFLINE",
    "PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK",
    isolation.CRASH_KEY_ENV,
)


@dataclass
class ScoreResult:
    run: str
    shards_total: int
    shards_skipped: int  # already done with the same fingerprint (resume / re-filtering)
    shards_scored: int
    samples_scored: int  # rows written in this invocation
    seconds: float
    state: RunState | None = None  # the run folder after scoring
    cfg: Config | None = None  # the configuration with auto resources resolved
    notes: list[str] = field(default_factory=list)
    failed_shards: list[dict[str, Any]] = field(default_factory=list)  # never marked done


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in WORKER_ENV if k in os.environ}


def _with_env(stage_cls: type, pool: str) -> type:
    """The stage, isolating poison samples, with the driver's worker variables applied in
    its process before the model loads (setdefault: a job's own runtime env wins). Its models
    get the pool's device explicitly (cuda exactly when its actors hold GPUs), so a model that
    cannot use the device fails instead of silently running on the CPU."""
    base = isolation.isolating(stage_cls)

    class Stage(base):  # type: ignore[misc, valid-type]
        def __init__(self, cfg: Config, env: dict[str, str]) -> None:
            install_log_filter()  # worker logs: no credential in any record
            for k, v in env.items():
                os.environ.setdefault(k, v)
            super().__init__(dataclasses.replace(cfg, device=cfg.model_device(pool)))

    Stage.__name__ = Stage.__qualname__ = stage_cls.__name__
    return Stage


def read_batch(items: pa.Table, cfg: Config) -> Iterator[pa.Table]:
    """Read task: the rows of a block of shards (small remote ones fetched ahead), in tables
    of about READ_ROWS rows."""
    install_log_filter()  # read workers log storage errors, which may hold URLs
    rows: list[dict[str, Any]] = []
    for row in sources.read_shards(items.to_pylist(), cfg):
        rows.append(row)
        if len(rows) >= READ_ROWS:
            yield pa.Table.from_pylist(rows)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows)


def shards_per_task(cfg: Config, n: int) -> int:
    """Shards read by one task: 1 for few shards; for many small shards, enough per task that
    tasks and blocks stay in the thousands, while every read slot still gets several tasks."""
    if cfg.shards_per_read_task > 0:
        return cfg.shards_per_read_task
    return max(1, min(64, n // (8 * max(1, cfg.read_tasks))))


def build_dataset(cfg: Config, items: list[dict[str, str]]):
    """The lazy Ray Data pipeline over `items` (shards still to score)."""
    import ray

    # paddlex lowers the root log level; Ray Data's debug dumps would flood the job log
    logging.getLogger("ray.data").setLevel(logging.INFO)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("TMARS_PROGRESS_BARS", "1") == "1"
    # small blocks keep the stages overlapping: with Ray's 128 MB default a shard of images is
    # one block, and the scoring actors wait until the detector has done all of it
    ctx.target_max_block_size = BLOCK_BYTES
    # a stage's own error (FatalStepError naming the stage) reaches the driver as itself, not
    # as Ray Data's UserCodeException with the cause lost in pickling
    ctx.raise_original_map_exception = True
    blocks = max(1, math.ceil(len(items) / shards_per_task(cfg, len(items))))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    tasks = ray.data.TaskPoolStrategy(size=cfg.read_tasks)
    env = worker_env()
    ds = ds.map_batches(
        read_batch,
        fn_kwargs={"cfg": cfg},
        batch_format="pyarrow",
        batch_size=None,  # a block of items: the shards one read task reads
        num_cpus=cfg.decode_num_cpus,
        compute=tasks,
    )
    for stage, pool, batch_size in model_stages(cfg):
        ds = ds.map_batches(
            _with_env(stage, pool),
            fn_constructor_kwargs={"cfg": cfg, "env": env},
            batch_format="numpy",
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(
                min_size=getattr(cfg, f"{pool}_actors_min"),
                max_size=getattr(cfg, f"{pool}_actors_max"),
            ),
            # bounded retries: a poison sample is isolated, not retried forever
            **{**actor_options(cfg, pool), "max_task_retries": isolation.MAX_TASK_RETRIES},
        )
    return ds.map_batches(
        write_parts,
        fn_kwargs={
            "run": cfg.output,
            "optional": optional_columns(cfg),
            "crash_once": os.environ.get(CRASH_ONCE_ENV),
        },
        batch_format="pyarrow",
        # a part per shard per batch: large batches keep a 10k-sample shard to a few parts
        # (fewer PUTs now, fewer GETs at selection) instead of one per scoring batch
        batch_size=max(1, cfg.write_batch_rows),
        num_cpus=cfg.decode_num_cpus,
        compute=tasks,
    )


def model_stages(cfg: Config) -> list[tuple[type, str, int]]:
    """(stage class, resource pool, batch size) of the model stages, in order."""
    if fused(cfg):
        stage = DeviceTmarsStage if cfg.device_step() else TmarsStage
        return [(stage, "score", cfg.clip_batch_size)]
    return [
        (DetectStage, "det", cfg.det_batch_size),
        (MaskScoreStage, "score", cfg.clip_batch_size),
    ]


def optional_columns(cfg: Config) -> list[str]:
    return (["ocr_text", "caption"] if cfg.recognize_text else []) + (
        ["clip_score_2", "tmars_score_2"] if cfg.clip_model_2 else []
    )


def _discard_partial(state: RunState) -> None:
    """Score folders of shards that are not done are partial output: remove them. One listing
    of scores/ (its top level only); parts inside done shards that no record lists are left
    alone - they are never read - except those of superseded records (`_discard_superseded`)."""
    _discard_superseded(state)
    fs, root = storage.filesystem(state.layout.scores_dir)
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return
    done = state.shard_ids()
    stale = [e for e in entries if e.rstrip("/").rsplit("/", 1)[-1] not in done]
    if stale:
        storage.check_fence()  # a driver that lost its lease must not delete the new one's parts
        log.info("discarding partial output of %d unfinished shard(s)", len(stale))
        fs.rm(stale, recursive=True)


def _discard_superseded(state: RunState) -> None:
    """Delete what a rescored shard's old record left: every file in the superseded record's
    folder that no current record lists (its old parts, and parts of interrupted rescoring).
    Only hygiene: readers never read an unlisted part, so a crash here loses nothing."""
    if not state.superseded:
        return
    listed = {p.strip("/") for p in state.listed_parts()}  # relative to the run folder
    base = storage.filesystem(state.url)[1].rstrip("/")
    for folder in sorted({r.shard_id for r in state.superseded}):
        fs, path = storage.filesystem(state.layout.shard_scores_dir(folder))
        fs.invalidate_cache(path)
        try:
            old = [p for p in fs.find(path) if p[len(base) :].strip("/") not in listed]
        except FileNotFoundError:
            continue
        if old:
            storage.check_fence()
            fs.rm(old)
    log.info("removed the old rows of %d rescored shard(s)", len(state.superseded))


def check_fingerprints(cfg: Config, state: RunState, run: str) -> None:
    """Refuse to mix scores made under another fingerprint; name the fields that differ."""
    from tmars_ray.engine.fingerprint import describe_mismatch

    fingerprint = cfg.scoring_fingerprint()
    other = sorted(fp for fp in state.fingerprints() if fp != fingerprint)
    if other:
        raise RuntimeError(
            f"{run} holds shards scored under another configuration "
            f"({describe_mismatch(cfg, run, other[0])}); use a new --output, or the same "
            "settings to resume"
        )


def score_pool(
    cfg: Config, state: RunState | None = None, before_work: Callable[[], None] | None = None
) -> ScoreResult:
    """Score every shard of `cfg.input` not yet done under `cfg.output` (resumable).
    `before_work` runs once there is work to do, before anything starts on the cluster."""
    from tmars_ray.engine.fingerprint import warn_version_changes

    start = time.monotonic()
    cfg = resources.resolve(cfg)  # auto resource options follow the cluster
    root, shards, sizes, versions = sources.list_shards_identified(cfg.input, cfg.input_format)
    items = sources.shard_items(root, shards, sizes, versions)
    # a shard is done only as it was listed when scored: rewritten in place, it is scored again
    identities = {it["shard"]: (it.get("size"), it.get("version")) for it in items}
    fingerprint = cfg.scoring_fingerprint()
    state = state if state is not None else RunState.load(cfg.output)
    inputs.check(cfg.output, cfg.input, root, state)  # one input per run folder
    check_fingerprints(cfg, state, cfg.output)
    done = state.done(fingerprint, identities)
    notes = (
        [
            f"library version changed: {d}"
            for d in warn_version_changes(cfg, cfg.output, fingerprint)
        ]
        if done
        else []
    )
    changed = state.changed(fingerprint, identities)  # one pass: a million rows at scale
    notes += _identity_notes(cfg.output, state, changed)
    stale_here = {r.shard for r in changed}
    stale: set[str] = set()  # stale in an earlier run
    # re-filtering: shards an earlier run (--scores-from) scored with the same fingerprint are
    # not scored again; selection reads their rows from that run
    earlier: set[str] = set()
    for url in cfg.scores_from:
        prev = RunState.load(url)
        check_fingerprints(cfg, prev, url)
        earlier |= prev.done(fingerprint, identities)
        stale |= {r.shard for r in prev.changed(fingerprint, identities)}
        notes += [
            f"{url}: library version changed: {d}"
            for d in warn_version_changes(cfg, url, fingerprint)
        ]
    # rewritten shards: their old rows (here or in an earlier run) are retracted before they
    # are scored again, so a crash or a failed rescore never leaves stale rows selectable
    stale = stale_here | (stale - earlier - done)  # current elsewhere: nothing to hide
    ids = {it["shard"]: it["shard_id"] for it in items if it["shard"] in stale}
    todo = [it for it in items if it["shard"] not in done and it["shard"] not in earlier]
    log.info(
        "%d shards under %s: %d already scored (%d by earlier runs), %d to score",
        len(items),
        root,
        len(items) - len(todo),
        sum(it["shard"] in earlier for it in items) if earlier else 0,
        len(todo),
    )
    if todo:
        _check_uids(cfg, todo[0])
        # the driver's checks (weights: a child process importing torch, ~3 s) overlap Ray's
        # start (~3 s); both end before anything is written or submitted
        with _background(before_work) as checked:
            init_ray(cfg)
        checked()
    # the first writes, once every check passed: the listing, then the retractions
    inputs.record(cfg.output, cfg.input, root, shards)
    state = manifest.retract(state, {u: ids[u] for u in stale}, fingerprint, identities)
    _discard_partial(state)
    if not todo:
        seconds = time.monotonic() - start
        return ScoreResult(cfg.output, len(items), len(items), 0, 0, seconds, state, cfg, notes)
    manifest.write_fingerprint(cfg.output, fingerprint, cfg.fingerprint_fields())
    writer = ManifestWriter(cfg.output, identities=identities, after=state.segments)
    tracker = ShardTracker(writer, fingerprint, {it["shard_id"]: it["shard"] for it in todo})
    try:
        for batch in build_dataset(cfg, todo).iter_batches(batch_format="pyarrow", batch_size=None):
            tracker.add(batch)
    except Exception as err:
        text = str(err)
        if "error raised in its creation task" in text:  # a model actor could not start
            raise StageStartError(
                "a model stage could not start: " + text.strip().splitlines()[-1]
            ) from None
        raise
    finally:
        tracker.finish()  # whatever completed stays completed
    missing = tracker.unfinished()
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) did not complete: {missing[:5]}")
    # records in write order: a rescored shard's new record supersedes its old one
    state = state.plus(tracker.done, writer.names)
    _discard_superseded(state)  # before compaction drops the superseded records
    manifest.compact(state)
    return ScoreResult(
        run=cfg.output,
        shards_total=len(items),
        shards_skipped=len(items) - len(todo),
        shards_scored=len(tracker.done),
        samples_scored=tracker.samples,
        seconds=time.monotonic() - start,
        state=state,
        cfg=cfg,
        notes=notes,
        failed_shards=tracker.failed,
    )


def _identity_notes(run: str, state: RunState, changed: list[ShardRecord]) -> list[str]:
    """Say which done shards changed since they were scored (`changed`: their records), and
    how many cannot be checked."""
    notes = []
    if changed:
        notes.append(
            f"{len(changed)} shard(s) changed since they were scored (size, ETag or mtime; "
            f"e.g. {changed[0].shard}): scoring them again, their old rows are replaced"
        )
    legacy = state.unidentified()
    if legacy:
        notes.append(
            f"{run}: {legacy} shard(s) were recorded by an older tmars-ray without their size "
            "and ETag/mtime: a rewrite of those is not detected (a new --output rescores all)"
        )
    for note in notes:
        log.warning(note)
    return notes


@contextmanager
def _background(fn: Callable[[], None] | None) -> Iterator[Callable[[], None]]:
    """Runs `fn` in a thread while the body runs; yields a function that re-raises what `fn`
    raised (call it after the block, which waits for the thread)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            if fn is not None:
                fn()
        except BaseException as err:  # handed to the caller's thread
            errors.append(err)

    thread = threading.Thread(target=target, name="driver-checks", daemon=True)
    thread.start()

    def result() -> None:
        if errors:
            raise errors[0]

    try:
        yield result
    finally:
        thread.join()


class StageStartError(RuntimeError):
    """A model actor failed in its constructor (weights, detector, device): no retry helps."""


class UidColumnError(ValueError):
    """The pool has no DataComp uid where --uid-column says (checked before any work)."""


def _check_uids(cfg: Config, item: dict[str, Any]) -> None:
    if cfg.allow_derived_uids:
        return
    n, valid = sources.uid_coverage(item, cfg)
    if n and not valid:
        raise UidColumnError(
            f"none of the first {n} samples of {item['shard']} has a DataComp uid in "
            f"{cfg.uid_column!r} (--uid-column): every uid would be derived from (shard, key) and "
            "match nothing in DataComp. Name the right field with --uid-column, or pass "
            "--allow-derived-uids to score with derived uids."
        )
