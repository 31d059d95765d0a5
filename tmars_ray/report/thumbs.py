"""Gallery tiles: captions and thumbnails (original with its boxes, and masked) re-read from
the source shards, each needed shard once and a few shards at a time. Never raises: a tile whose
image cannot be shown gets a note saying why."""

from __future__ import annotations

import base64
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tmars_ray.config import Config
from tmars_ray.data import schema
from tmars_ray.report.sample import Sample
from tmars_ray.run import storage

log = logging.getLogger(__name__)

THUMB_PX = 256  # longest side of a thumbnail
SHARD_READERS = 4  # source shards read concurrently for thumbnails
CAPTION_CHARS = 300


def fill_tiles(sample: Sample, tiles: list[dict[str, Any]], cfg: Config) -> None:
    """Caption and thumbnails of every tile, in place. Never raises: a tile whose image cannot
    be shown gets a `note` saying why (the template shows a placeholder)."""
    if not tiles:
        return
    boxes = _boxes_of(sample, sorted({t["row"] for t in tiles}))
    wanted: dict[str, set[str]] = {}
    for t in tiles:
        wanted.setdefault(t["shard"], set()).add(t["key"])
    with ThreadPoolExecutor(min(SHARD_READERS, len(wanted))) as pool:
        found = dict(zip(wanted, pool.map(lambda s: _read_samples(s, wanted[s], cfg), wanted)))
    done: dict[int, tuple] = {}  # a row can sit in several galleries: thumbnail it once
    for t in tiles:
        if t["row"] in done:
            t["caption"], t["image"], t["masked"], t["note"] = done[t["row"]]
            continue
        _fill_tile(t, found[t["shard"]], boxes, cfg)
        done[t["row"]] = (t["caption"], t["image"], t["masked"], t["note"])


def _fill_tile(
    t: dict[str, Any], got: dict[str, tuple] | str, boxes: dict[int, list], cfg: Config
) -> None:
    """One tile from its shard's read result (or the shard's error message)."""
    if isinstance(got, str):
        t["note"] = got
        return
    if t["key"] not in got:
        t["note"] = "sample not found in its source shard"
        return
    image_bytes, caption = got[t["key"]]
    if caption is not None:
        t["caption"] = caption[:CAPTION_CHARS] + ("…" if len(caption) > CAPTION_CHARS else "")
    if image_bytes is None:
        t["note"] = "the sample has no image"
        return
    try:
        t["image"], t["masked"], t["note"] = _thumbnails(image_bytes, boxes.get(t["row"]), cfg)
    except Exception as err:  # noqa: BLE001 - one bad image must not cost the report
        t["note"] = f"thumbnail failed: {type(err).__name__}"


def _boxes_of(sample: Sample, rows: list[int]) -> dict[int, list]:
    """Polygons of the given sample rows, reading only the row groups that hold them."""
    t = sample.table
    by_file: dict[int, list[tuple[int, int]]] = {}
    for r in rows:
        by_file.setdefault(t["_file"][r].as_py(), []).append((t["_row"][r].as_py(), r))
    out: dict[int, list] = {}
    for fi, items in by_file.items():
        try:
            fs, path = storage.filesystem(sample.files[fi])
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                if "boxes" not in pf.schema_arrow.names:
                    continue
                starts = np.cumsum(
                    [0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                )
                groups: dict[int, pa.Array] = {}
                for file_row, r in items:
                    g = int(np.searchsorted(starts, file_row, side="right") - 1)
                    if g not in groups:
                        groups[g] = pf.read_row_group(g, columns=["boxes"])["boxes"]
                    out[r] = groups[g][file_row - int(starts[g])].as_py() or []
        except Exception as err:  # noqa: BLE001 - missing boxes only lose the outlines
            log.warning("could not read boxes from %s: %s", sample.files[fi], err)
    return out


def _read_samples(shard: str, keys: set[str], cfg: Config) -> dict[str, tuple] | str:
    """{key: (image bytes, caption)} for the wanted keys of one shard, reading it once and
    stopping as soon as all are found; a message when the shard cannot be read."""
    from tmars_ray.data.sources import read_shard

    out: dict[str, tuple] = {}
    try:
        for row in read_shard({"shard": shard, "shard_id": "", "shard_rel": ""}, cfg):
            if row["kind"] == "end":
                if row["shard_status"] != schema.SHARD_OK and not out:
                    return f"source shard unreadable ({row['shard_status']})"
                break
            if row["key"] in keys:
                out[row["key"]] = (row["image_bytes"] or None, row["caption"] or None)
                if len(out) == len(keys):
                    break
    except Exception as err:  # noqa: BLE001 - a missing pool only costs the thumbnails
        return f"source shard unreadable ({type(err).__name__})"
    return out


def _thumbnails(
    data: bytes, boxes: list | None, cfg: Config
) -> tuple[str | None, str | None, str | None]:
    """(image with boxes drawn, masked image, note) as JPEG data URIs."""
    from PIL import Image, ImageDraw

    from tmars_ray.data.decode import decode_image
    from tmars_ray.models.mask import mask_text

    arr, status = decode_image(data, cfg.max_image_pixels)
    if arr is None:
        return None, None, status
    polys = [np.asarray(b, dtype=np.float32).reshape(-1, 2) for b in boxes or [] if len(b) >= 6]
    ring = cfg.mask_ring
    h, w = arr.shape[:2]
    work = 4 * THUMB_PX
    if max(h, w) > work:
        # mask a reduced copy (polygons and ring scaled alike): the same picture at thumbnail
        # size, without masking a 80-megapixel array for a 256-pixel tile
        s = work / max(h, w)
        arr = np.asarray(
            Image.fromarray(arr).resize(
                (max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR
            )
        )
        polys = [p * s for p in polys]
        ring = max(1, round(ring * s))
        h, w = arr.shape[:2]
    masked = mask_text(arr, polys, ring).masked
    scale = min(1.0, THUMB_PX / max(h, w, 1))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    original = Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(original)
    for p in polys:
        draw.polygon(
            [(float(x) * scale, float(y) * scale) for x, y in p], outline=(255, 32, 32), width=2
        )
    masked_img = Image.fromarray(masked).resize(size, Image.Resampling.LANCZOS)
    return _jpeg_uri(original), _jpeg_uri(masked_img), None


def _jpeg_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
