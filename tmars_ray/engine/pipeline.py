"""The scoring phase on Ray Data: shards -> read+decode tasks -> detection actors ->
mask+score actors -> the driver, which writes each shard's score file once the shard is
complete and then its manifest record.

Samples are rows (so both actor pools batch freely across shards); each shard's reader ends
with an `end` row that carries the shard's sample count, which is how the driver knows a
shard is complete even though blocks arrive in any order. Only score rows (no pixels) reach
the driver, and it holds rows only for shards in flight, so its memory does not grow with
the pool.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tmars_ray.config import Config
from tmars_ray.data import schema, sources
from tmars_ray.engine.stages import DetectStage, MaskScoreStage, actor_options, decode_batch
from tmars_ray.run import manifest, storage

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    run: str
    shards_total: int
    shards_skipped: int  # already done with the same fingerprint (resume / re-filtering)
    shards_scored: int
    samples_scored: int  # rows written in this invocation
    seconds: float
    records: list[manifest.ShardRecord] = field(default_factory=list)


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    env_vars = {
        k: os.environ[k]
        for k in ("HF_HUB_OFFLINE", "PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK")
        if k in os.environ
    }
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)


class ShardWriter:
    """Driver side: buffers score rows per shard, writes a shard when all its rows are there."""

    def __init__(self, cfg: Config, run: str, items: list[dict[str, str]], optional: list[str]):
        self.cfg, self.run = cfg, run
        self.fingerprint = cfg.scoring_fingerprint()
        self.shard_of = {it["shard_id"]: it["shard"] for it in items}
        self.schema = schema.table_schema(optional)
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.rows: dict[str, int] = defaultdict(int)
        self.ends: dict[str, dict[str, Any]] = {}
        self.records: list[manifest.ShardRecord] = []
        self.samples = 0
        self.start = self.last_log = time.monotonic()

    def add(self, batch: pa.Table) -> None:
        is_end = pc.equal(batch["kind"], "end")
        for end in batch.filter(is_end).to_pylist():
            self.ends[end["shard_id"]] = end
            self._maybe_finish(end["shard_id"])
        samples = batch.filter(pc.invert(is_end))
        if samples.num_rows == 0:
            return
        for shard_id in pc.unique(samples["shard_id"]).to_pylist():
            part = samples.filter(pc.equal(samples["shard_id"], shard_id))
            self.parts[shard_id].append(part)
            self.rows[shard_id] += part.num_rows
            self._maybe_finish(shard_id)
        self._progress()

    def _maybe_finish(self, shard_id: str) -> None:
        end = self.ends.get(shard_id)
        if end is None or self.rows[shard_id] < end["n_samples"]:
            return
        if self.rows[shard_id] > end["n_samples"]:
            raise RuntimeError(f"shard {self.shard_of[shard_id]}: more rows than samples read")
        table = self._score_table(self.parts.pop(shard_id, []))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes_atomic(manifest.score_path(self.run, shard_id), buf.getvalue())
        counts = (
            dict(
                zip(*np.unique(table["status"].to_numpy(zero_copy_only=False), return_counts=True))
            )
            if table.num_rows
            else {}
        )
        record = manifest.ShardRecord(
            shard=self.shard_of[shard_id],
            shard_id=shard_id,
            score_file=f"{manifest.SCORES_DIR}/{shard_id}.parquet",
            rows=table.num_rows,
            fingerprint=self.fingerprint,
            shard_status=end["shard_status"],
            error=end["error"] or None,
            status_counts={str(k): int(v) for k, v in sorted(counts.items())},
        )
        manifest.write_record(self.run, record)  # last: the shard is done from here on
        self.records.append(record)
        self.samples += table.num_rows
        del self.ends[shard_id], self.rows[shard_id]
        if record.shard_status != schema.SHARD_OK:
            log.warning("shard %s: %s %s", record.shard, record.shard_status, record.error or "")

    def _score_table(self, parts: list[pa.Table]) -> pa.Table:
        if not parts:
            return self.schema.empty_table()
        t = pa.concat_tables(parts, promote_options="permissive")
        t = t.sort_by("idx")  # deterministic file content whatever order rows arrived in
        ok = pc.equal(t["status"], schema.OK)
        cols = {}
        for f in self.schema:
            col = t[f.name] if f.name in t.column_names else pa.nulls(t.num_rows)
            if f.name in ("n_text_boxes", "text_area", "boxes") or "score" in f.name:
                col = pc.if_else(ok, col.cast(f.type), pa.scalar(None, f.type))
            elif f.name in ("width", "height"):
                col = pc.if_else(pc.greater(col, 0), col.cast(f.type), pa.scalar(None, f.type))
            cols[f.name] = col.cast(f.type)
        return pa.table(cols, schema=self.schema)

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_log >= 10:
            self.last_log = now
            rate = self.samples / max(now - self.start, 1e-9)
            log.info(
                "scored %d/%d shards, %d samples (%.1f samples/s)",
                len(self.records),
                len(self.shard_of),
                self.samples,
                rate,
            )

    def unfinished(self) -> list[str]:
        done = {r.shard_id for r in self.records}
        return [self.shard_of[s] for s in self.shard_of if s not in done]


def _discard_partial(run: str, done_ids: set[str]) -> None:
    """Score files (or temp files) of shards not in the manifest are partial: remove them."""
    fs, root = storage.filesystem(storage.join(run, manifest.SCORES_DIR))
    if not fs.exists(root):
        return
    for path in fs.find(root):
        # <shard_id>.parquet or <shard_id>/part-*: shard ids may themselves contain ".parquet"
        # (input shards that are parquet files), so strip the suffix once, from the end
        top = path[len(root.rstrip("/")) + 1 :].split("/", 1)[0]
        shard_id = top[: -len(".parquet")] if top.endswith(".parquet") else top
        if ".tmp-" in path.rsplit("/", 1)[-1] or shard_id not in done_ids:
            fs.rm(path)


def build_dataset(cfg: Config, items: list[dict[str, str]]):
    """The lazy Ray Data pipeline over `items` (shards still to score)."""
    import ray

    # paddlex lowers the root log level; Ray Data's debug dumps would flood the job log
    logging.getLogger("ray.data").setLevel(logging.INFO)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("TMARS_PROGRESS_BARS", "1") == "1"
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    tasks = ray.data.TaskPoolStrategy(size=cfg.read_tasks)
    ds = ds.flat_map(
        sources.read_shard,
        fn_kwargs={"cfg": cfg},
        num_cpus=cfg.decode_num_cpus,
        compute=tasks,
    )
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"cfg": cfg},
        batch_format="numpy",
        batch_size=cfg.det_batch_size,
        num_cpus=cfg.decode_num_cpus,
        compute=tasks,
    )
    ds = ds.map_batches(
        DetectStage,
        fn_constructor_kwargs={"cfg": cfg},
        batch_format="numpy",
        batch_size=cfg.det_batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.det_actors_min, max_size=cfg.det_actors_max
        ),
        **actor_options(cfg, "det"),
    )
    ds = ds.map_batches(
        MaskScoreStage,
        fn_constructor_kwargs={"cfg": cfg},
        batch_format="numpy",
        batch_size=cfg.clip_batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.score_actors_min, max_size=cfg.score_actors_max
        ),
        **actor_options(cfg, "score"),
    )
    return ds


def score_pool(cfg: Config) -> ScoreResult:
    """Score every shard of `cfg.input` not yet done under `cfg.output` (resumable)."""
    start = time.monotonic()
    root, shards = sources.list_shards(cfg.input, cfg.input_format)
    items = sources.shard_items(root, shards)
    fingerprint = cfg.scoring_fingerprint()
    done = manifest.done_shards(cfg.output, fingerprint)
    stale = [r for r in manifest.read_records(cfg.output) if r.fingerprint != fingerprint]
    if stale:
        raise RuntimeError(
            f"{cfg.output} holds {len(stale)} shard(s) scored with another model/configuration; "
            "use a new --output (or --scores-from to reuse them)"
        )
    _discard_partial(cfg.output, {r.shard_id for r in done.values()})
    # re-filtering: shards an earlier run (--scores-from) scored with the same fingerprint are
    # not scored again; selection reads their rows from that run
    earlier = {s for run in cfg.scores_from for s in manifest.done_shards(run, fingerprint)}
    todo = [it for it in items if it["shard"] not in done and it["shard"] not in earlier]
    log.info(
        "%d shards under %s: %d already scored (%d by earlier runs), %d to score",
        len(items),
        root,
        len(items) - len(todo),
        len(earlier & {it["shard"] for it in items}),
        len(todo),
    )
    optional = (["ocr_text", "caption"] if cfg.recognize_text else []) + (
        ["clip_score_2", "tmars_score_2"] if cfg.clip_model_2 else []
    )
    writer = ShardWriter(cfg, cfg.output, todo, optional)
    if todo:
        init_ray(cfg)
        for batch in build_dataset(cfg, todo).iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(batch)
        writer._progress(force=True)
        missing = writer.unfinished()
        if missing:
            raise RuntimeError(f"{len(missing)} shard(s) did not complete: {missing[:5]}")
    return ScoreResult(
        run=cfg.output,
        shards_total=len(items),
        shards_skipped=len(items) - len(todo),
        shards_scored=len(writer.records),
        samples_scored=writer.samples,
        seconds=time.monotonic() - start,
        records=manifest.read_records(cfg.output),
    )
