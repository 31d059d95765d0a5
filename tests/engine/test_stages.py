"""The pipeline's stages without Ray: detect -> mask+score on real synthetic images (as the
reader hands them on: encoded bytes), including the optional OCR pass that text-match selects
on, the fused stage, and what crosses between stages: bytes and boxes, never pixels."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tests.conftest import tiny_cfg
from tmars_ray.data import schema
from tmars_ray.data.sources import end_row
from tmars_ray.devtools.synth import encode_jpeg, generate_sample
from tmars_ray.engine.stages import DetectStage, MaskScoreStage, TmarsStage
from tmars_ray.selection import select


def _batch(samples, encode=encode_jpeg) -> dict[str, np.ndarray]:
    """A batch as the reader emits it: encoded bytes, header-probed sizes."""
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
            "image_bytes": encode(s.image),
            "status": "",
            "shard_status": "",
            "n_samples": -1,
            "error": "",
            "width": s.image.shape[1],
            "height": s.image.shape[0],
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
    batch = DetectStage(cfg)(_batch(text + plain))
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


def _samples(seed=61, n=30):
    samples = [generate_sample(seed, i) for i in range(n)]
    return [s for s in samples if s.lines][:3] + [s for s in samples if not s.lines][:2]


def test_only_bytes_and_boxes_cross_between_stages(tiny_checkpoint):
    samples = _samples()
    cfg = tiny_cfg(clip_pretrained=tiny_checkpoint)
    batch = _batch(samples)
    encoded = sum(len(b) for b in batch["image_bytes"])
    out = DetectStage(cfg)(batch)
    assert "image" not in out  # no decoded pixels leave the detection actor
    crossing = 0
    for column in out.values():
        for v in column:
            assert not isinstance(v, np.ndarray), "a decoded array would cross the object store"
            crossing += len(v) if isinstance(v, (bytes, str)) else 8
    assert crossing < 1.2 * encoded  # the bytes, plus small bookkeeping and boxes
    rows = MaskScoreStage(cfg)(out)
    assert "image_bytes" not in rows.column_names  # score rows only to the writer


def test_fused_stage_equals_the_two_stages(tiny_checkpoint):
    samples = _samples()
    cfg = tiny_cfg(clip_pretrained=tiny_checkpoint)
    split = MaskScoreStage(cfg)(DetectStage(cfg)(_batch(samples))).to_pylist()
    fused = TmarsStage(cfg)(_batch(samples)).to_pylist()
    assert repr(fused) == repr(split)  # NaN (end rows) compares unequal to itself
    assert sum(r["n_text_boxes"] > 0 for r in fused) >= 2


def test_large_images_are_detected_at_reduced_scale_in_original_coordinates(tiny_checkpoint):
    """A 3x upscaled photo is decoded at a reduced JPEG scale for the detector (its input is
    at most det_limit_side_len); its boxes still land on the text, in original pixels."""
    from PIL import Image

    from tmars_ray.data.decode import decode_image

    sample = next(s for s in (generate_sample(63, i) for i in range(40)) if s.lines)
    big = np.asarray(
        Image.fromarray(sample.image).resize(
            (sample.image.shape[1] * 3, sample.image.shape[0] * 3), Image.Resampling.BICUBIC
        )
    )
    sample.image = big
    cfg = tiny_cfg(clip_pretrained=tiny_checkpoint, det_limit_side_len=640)
    out = DetectStage(cfg)(_batch([sample]))
    import json

    boxes = [np.asarray(b, np.float32).reshape(-1, 2) for b in json.loads(out["boxes"][0])]
    full, _ = decode_image(out["image_bytes"][0], 10**9)
    reference = DetectStage(cfg).step([full])[0].polygons  # full decode, resized by the detector
    assert boxes and len(boxes) == len(reference)

    def box(p):
        return np.concatenate([p.min(axis=0), p.max(axis=0)])

    got = sorted(box(p).tolist() for p in boxes)
    want = sorted(box(np.asarray(p)).tolist() for p in reference)
    scale = max(big.shape)
    assert np.abs(np.array(got) - np.array(want)).max() < 0.02 * scale
