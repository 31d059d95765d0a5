"""The pipeline's stages without Ray: decode -> detect -> mask+score on real synthetic images,
including the optional OCR pass that the text-match baseline selects on."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tests.conftest import tiny_cfg
from tmars_ray.data import schema
from tmars_ray.data.sources import end_row
from tmars_ray.devtools.synth import encode_jpeg, generate_sample
from tmars_ray.engine.stages import DetectStage, MaskScoreStage, decode_batch
from tmars_ray.selection import select


def _batch(samples) -> dict[str, np.ndarray]:
    rows = [
        {
            "kind": "sample",
            "shard": "s",
            "shard_id": "s",
            "idx": i,
            "key": s.key,
            "uid": s.uid,
            "derived_uid": False,
            "caption": s.caption,
            "image_bytes": encode_jpeg(s.image),
            "status": "",
            "shard_status": "",
            "n_samples": -1,
            "error": "",
        }
        for i, s in enumerate(samples)
    ]
    rows.append(end_row("s", "s", len(samples), "ok"))
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_stages_with_text_recognition_feed_text_match(tiny_checkpoint, tmp_path):
    samples = [generate_sample(41, i) for i in range(40)]
    text = [s for s in samples if s.category == "text"][:3]
    plain = [s for s in samples if not s.lines][:3]
    assert len(text) == 3 and len(plain) == 3
    cfg = tiny_cfg(clip_pretrained=tiny_checkpoint, recognize_text=True)
    batch = decode_batch(_batch(text + plain), cfg)
    batch = DetectStage(cfg)(batch)
    table = MaskScoreStage(cfg)(batch)
    rows = table.to_pylist()
    assert [r["kind"] for r in rows] == ["sample"] * 6 + ["end"]  # the end row passes through
    for r in rows[:3]:
        assert r["status"] == schema.OK and r["n_text_boxes"] >= 1 and r["ocr_text"]
    for r in rows[3:6]:
        assert r["status"] == schema.OK and r["n_text_boxes"] == 0 and not r["ocr_text"]
    # text-match drops the pairs whose caption is (mostly) the rendered text
    scores = table.filter(pc.equal(table["kind"], "sample")).select(
        [f.name for f in schema.table_schema(["ocr_text", "caption"])]
    )
    (tmp_path / "scores").mkdir()
    pq.write_table(scores, tmp_path / "scores" / "part.parquet")
    summary = select.select([str(tmp_path / "scores")], str(tmp_path), method="text-match")
    kept = set(pq.read_table(tmp_path / "keep" / "keep.parquet")["uid"].to_pylist())
    assert kept == {s.uid for s in plain}, summary
