"""The synthetic pool: determinism, shard layout, categories and exact ground truth."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tmars_ray.devtools import synth
from tmars_ray.devtools.synth import CATEGORIES, generate_sample, shard_ranges, write_pool

HEX32 = re.compile(r"^[0-9a-f]{32}$")
POOL_SIZE = 150  # large enough that every category and the text-free case show up


@pytest.fixture(scope="module")
def pool() -> list[tuple[synth.SynthSample, np.ndarray]]:
    """Samples of seed 0, each with its image as it was just before text was drawn."""
    backgrounds: list[np.ndarray] = []
    original = synth._render_lines

    def spy(rng, image, n_lines):
        backgrounds.append(image.copy())
        return original(rng, image, n_lines)

    mp = pytest.MonkeyPatch()
    mp.setattr(synth, "_render_lines", spy)
    try:
        out = []
        for i in range(POOL_SIZE):
            n_before = len(backgrounds)
            s = generate_sample(0, i)
            out.append((s, backgrounds[-1] if len(backgrounds) > n_before else s.image))
    finally:
        mp.undo()
    return out


@pytest.fixture(scope="module")
def wds_pool(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_pool(str(tmp_path_factory.mktemp("wds")), samples=40, shards=2, seed=0)


def _read_tar(path: str) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
        return infos, {i.name: tar.extractfile(i).read() for i in infos}


def _signed_distance(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance of each point inside a convex polygon (negative outside)."""
    poly = polygon.astype(np.float64)
    edges = np.roll(poly, -1, axis=0) - poly
    area2 = np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
    rel = points[:, None, :] - poly[None, :, :]
    cross = edges[None, :, 0] * rel[..., 1] - edges[None, :, 1] * rel[..., 0]
    return (np.sign(area2) * cross / np.linalg.norm(edges, axis=1)).min(axis=1)


def test_generate_sample_is_deterministic_and_well_formed() -> None:
    for i in (0, 7, 123):
        a, b = generate_sample(5, i), generate_sample(5, i)
        assert np.array_equal(a.image, b.image)
        assert (a.caption, a.category, a.uid, a.key) == (b.caption, b.category, b.uid, b.key)
        assert [ln.text for ln in a.lines] == [ln.text for ln in b.lines]
        for la, lb in zip(a.lines, b.lines, strict=True):
            assert np.array_equal(la.polygon, lb.polygon) and np.array_equal(la.ink, lb.ink)
        assert HEX32.match(a.uid) and a.key == f"{i:09d}"
        h, w, c = a.image.shape
        assert a.image.dtype == np.uint8 and c == 3
        assert synth.MIN_SIDE <= h <= synth.MAX_SIDE and synth.MIN_SIDE <= w <= synth.MAX_SIDE
    assert generate_sample(5, 0).uid != generate_sample(6, 0).uid
    assert generate_sample(5, 0).uid != generate_sample(5, 1).uid


def test_categories_text_free_samples_and_captions(pool) -> None:
    samples = [s for s, _ in pool]
    by_cat = defaultdict(list)
    for s in samples:
        by_cat[s.category].append(s)
    assert set(by_cat) == set(CATEGORIES)
    text_free = [s for s in samples if not s.lines]
    assert 0.15 <= len(text_free) / len(samples) <= 0.40
    assert all(s.category == "picture" for s in text_free)
    assert any(s.lines for s in by_cat["picture"])  # text unrelated to the caption
    assert {s.scene.split(":")[0] for s in samples} == {"photo", "procedural"}
    assert len({s.image.shape[:2] for s in samples}) > len(samples) // 2  # sizes vary
    for s in samples:
        caption = s.caption.lower()
        words = set(re.findall(r"\w+", caption))
        texts = [ln.text.lower() for ln in s.lines]
        assert len(texts) <= 3 and len(set(texts)) == len(texts)
        if s.category in ("text", "both"):
            assert s.lines and all(t in caption for t in texts)
        else:
            assert not words & {w for t in texts for w in re.findall(r"\w+", t)}, s


def test_ink_is_exactly_the_changed_pixels_and_lies_in_the_polygon(pool) -> None:
    n_lines = 0
    for s, background in pool:
        h, w = s.image.shape[:2]
        changed = np.any(s.image != background, axis=-1)
        union = np.zeros((h, w), bool)
        for ln in s.lines:
            n_lines += 1
            assert ln.ink.shape == (h, w) and ln.ink.dtype == bool and ln.ink.any()
            assert not (union & ln.ink).any()  # lines never overlap
            union |= ln.ink
            x0, y0, x1, y1 = ln.bbox
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert ln.polygon.shape == (4, 2) and ln.polygon.dtype == np.float32
            assert (
                (ln.polygon >= 0).all()
                and (ln.polygon[:, 0] <= w).all()
                and (ln.polygon[:, 1] <= h).all()
            )
            inside_bbox = np.zeros((h, w), bool)
            inside_bbox[y0:y1, x0:x1] = True
            assert not (ln.ink & ~inside_bbox).any()
            ys, xs = np.nonzero(ln.ink)
            dist = _signed_distance(np.stack([xs + 0.5, ys + 0.5], axis=1), ln.polygon)
            assert (dist >= 0).mean() >= 0.95 and dist.min() >= -1.5
            sides = np.linalg.norm(np.roll(ln.polygon, -1, axis=0) - ln.polygon, axis=1)
            assert sides.min() >= 13  # big enough for a detector to see
        assert np.array_equal(union, changed)
    assert n_lines > 50


def test_webdataset_layout(wds_pool) -> None:
    assert [p.rsplit("/", 1)[-1] for p in wds_pool] == ["00000000.tar", "00000001.tar"]
    all_keys = []
    for path in wds_pool:
        infos, files = _read_tar(path)
        for info in infos:
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
        keys = sorted({n.split(".")[0] for n in files})
        assert len(files) == 3 * len(keys) == 3 * 20
        for key in keys:
            meta = json.loads(files[f"{key}.json"])
            assert set(meta) >= {"uid", "key", "caption", "category", "text_lines"}
            assert HEX32.match(meta["uid"]) and meta["key"] == key
            assert files[f"{key}.txt"].decode("utf-8") == meta["caption"]
            assert meta["category"] in CATEGORIES
            img = Image.open(io.BytesIO(files[f"{key}.jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB"
            truth = generate_sample(0, int(key))
            assert img.size == (truth.image.shape[1], truth.image.shape[0])
            assert meta["uid"] == truth.uid and meta["caption"] == truth.caption
            assert [t["text"] for t in meta["text_lines"]] == [ln.text for ln in truth.lines]
            for t, ln in zip(meta["text_lines"], truth.lines, strict=True):
                assert np.allclose(t["polygon"], ln.polygon, atol=1e-2)
                assert tuple(t["bbox"]) == ln.bbox
                assert "ink" not in t
        all_keys += keys
    assert all_keys == [f"{i:09d}" for i in range(40)]  # contiguous across shards


def test_img2dataset_stats_beside_each_shard(wds_pool) -> None:
    """DataComp's resharder sizes shards from img2dataset's `{:08d}_stats.json`."""
    for path in wds_pool:
        stats = json.loads(open(path.replace(".tar", "_stats.json")).read())
        _, files = _read_tar(path)
        samples = len({n.split(".")[0] for n in files})
        assert stats["successes"] == stats["count"] == samples == 20


def test_same_seed_gives_identical_bytes(wds_pool, tmp_path) -> None:
    # written by two processes: the bytes do not depend on it
    again = write_pool(str(tmp_path / "again"), samples=40, shards=2, seed=0, workers=2)
    other = write_pool(str(tmp_path / "other"), samples=40, shards=2, seed=1)
    for a, b, c in zip(wds_pool, again, other, strict=True):
        with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
            da, db, dc = fa.read(), fb.read(), fc.read()
        assert da == db
        assert da != dc
    assert not list((tmp_path / "again").glob("*.tmp*"))


def test_parquet_round_trip(tmp_path) -> None:
    paths = write_pool(str(tmp_path / "pq"), samples=9, shards=2, seed=3, fmt="parquet")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000000.parquet", "00000001.parquet"]
    tables = [pq.read_table(p) for p in paths]
    assert [t.num_rows for t in tables] == [5, 4]
    rows = [r for t in tables for r in t.to_pylist()]
    assert tables[0].column_names == ["key", "uid", "image", "caption", "json"]
    assert str(tables[0].schema.field("image").type) == "binary"
    for i, row in enumerate(rows):
        truth = generate_sample(3, i)
        assert row["key"] == truth.key and row["uid"] == truth.uid
        assert row["caption"] == truth.caption
        assert json.loads(row["json"])["uid"] == truth.uid
        assert Image.open(io.BytesIO(row["image"])).size == (
            truth.image.shape[1],
            truth.image.shape[0],
        )
    again = write_pool(str(tmp_path / "pq2"), samples=9, shards=2, seed=3, fmt="parquet")
    for a, b in zip(paths, again, strict=True):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()


def test_fsspec_url_and_edge_cases() -> None:
    import fsspec

    paths = write_pool("memory://synth-test/pool", samples=3, shards=1, seed=0)
    assert paths == ["memory://synth-test/pool/00000000.tar"]
    fs = fsspec.filesystem("memory")
    data = fs.cat_file("/synth-test/pool/00000000.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert len(tar.getnames()) == 9
    fs.rm("/synth-test", recursive=True)

    assert [list(r) for r in shard_ranges(5, 3)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        write_pool("memory://synth-test/x", samples=2, fmt="csv")
    with pytest.raises(ValueError):
        write_pool("memory://synth-test/x", samples=2, shards=0)


def test_sides_bound_every_image() -> None:
    for i in range(12):
        small = generate_sample(5, i, sides=(160, 200))
        h, w = small.image.shape[:2]
        assert 160 <= h <= 200 and 160 <= w <= 200
        assert small.category == generate_sample(5, i).category  # drawn before the sides
