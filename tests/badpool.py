"""A pool that holds every bad input of DESIGN 8, each sample with the status it must get.

`write_bad_pool(dir)` writes webdataset tars and parquet shards and returns a `BadPool` with
the expected (shard file name, key) -> status map, the expected shard-level statuses and the
sizes convertible images must decode to. Everything is generated (no assets), small and
deterministic, so the whole job over it stays cheap.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tmars_ray.data import schema

# The run over this pool must use this pixel limit: the 1600x1600 "bomb" is over it but far
# under the default, which proves the limit is configurable.
MAX_IMAGE_PIXELS = 2_000_000
# Member names that would escape the extraction folder if anything ever extracted them.
ESCAPE_DIR = "tmars-escape-3f9c"
ABSOLUTE_DIR = "/tmp/tmars-absolute-3f9c"


@dataclass
class BadPool:
    root: str
    samples: dict[tuple[str, str], str] = field(default_factory=dict)  # (shard, key) -> status
    shards: dict[str, str] = field(default_factory=dict)  # shard file name -> shard status
    sizes: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (w, h) if ok
    uids: dict[tuple[str, str], str] = field(default_factory=dict)  # DataComp uids given

    @property
    def failed(self) -> dict[str, str]:
        """Shards that cannot be read (schema.SHARD_FAILED): never done, not in the scores."""
        return {k: v for k, v in self.shards.items() if v in schema.SHARD_FAILED}

    @property
    def scored_samples(self) -> dict[tuple[str, str], str]:
        """The samples a run scores: those of the shards that do not fail."""
        return {k: v for k, v in self.samples.items() if k[0] not in self.failed}

    @property
    def n_samples(self) -> int:
        return len(self.scored_samples)

    def by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for status in self.scored_samples.values():
            counts[status] = counts.get(status, 0) + 1
        return dict(sorted(counts.items()))


def _uid(i: int) -> str:
    return f"{0xBAD0000 + i:032x}"


def _rgb(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth gradient with a block: decodes fast, no text for the detector to chase."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack(
        [
            x * 255 // max(w - 1, 1),
            y * 255 // max(h - 1, 1),
            np.full_like(x, int(rng.integers(0, 256))),
        ],
        axis=-1,
    ).astype(np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_rgb(w, h, seed)), "JPEG", quality=90)


def _png_with_size(png: bytes, w: int, h: int) -> bytes:
    """Rewrite a PNG's IHDR to declare w x h (CRC fixed): a header that lies about its size."""
    assert png[12:16] == b"IHDR"
    ihdr = b"IHDR" + w.to_bytes(4, "big") + h.to_bytes(4, "big") + png[24:29]
    return png[:8] + png[8:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]


def _jpeg_with_size(jpg: bytes, w: int, h: int) -> bytes:
    """Rewrite a baseline JPEG's SOF0 to declare w x h."""
    i = jpg.index(b"\xff\xc0")
    return jpg[: i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpg[i + 9 :]


def image_cases() -> list[tuple[str, str, bytes, str, tuple[int, int] | None]]:
    """(key, extension, bytes, expected status, decoded (w, h) when ok)."""
    jpg = _jpeg(64, 48, 1)
    mid = len(jpg) // 2
    sos = jpg.index(b"\xff\xda")
    rng = np.random.default_rng(11)
    cmyk = Image.fromarray(_rgb(40, 30, 2)).convert("CMYK")
    i16 = Image.fromarray(np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80)
    palette = Image.fromarray(_rgb(36, 20, 3)).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = Image.fromarray(np.dstack([_rgb(30, 30, 4), np.full((30, 30), 128, np.uint8)]), "RGBA")
    gray = Image.fromarray(_rgb(50, 40, 5)[:, :, 0], "L")
    one = Image.fromarray(np.array([[[200, 30, 30]]], np.uint8))
    small_png = _encode(Image.fromarray(_rgb(16, 16, 6)), "PNG")
    return [
        ("good-00", "jpg", _jpeg(64, 48, 10), schema.OK, (64, 48)),
        ("good-01", "png", _encode(Image.fromarray(_rgb(48, 64, 11)), "PNG"), schema.OK, (48, 64)),
        (
            "good-02",
            "webp",
            _encode(Image.fromarray(_rgb(40, 40, 12)), "WEBP"),
            schema.OK,
            (40, 40),
        ),
        ("truncated-jpeg", "jpg", jpg[:mid], schema.DECODE_ERROR, None),
        # garbage over the tables before the scan: the decoder must refuse it
        (
            "corrupt-jpeg-header",
            "jpg",
            jpg[:20] + rng.integers(0, 256, sos - 40, dtype=np.uint8).tobytes() + jpg[sos - 20 :],
            schema.DECODE_ERROR,
            None,
        ),
        # garbage in the middle that forms markers libjpeg rejects
        (
            "corrupt-jpeg-middle",
            "jpg",
            jpg[:mid] + rng.integers(0, 256, 64, dtype=np.uint8).tobytes() + jpg[mid + 64 :],
            schema.DECODE_ERROR,
            None,
        ),
        # a few bytes of garbage inside the entropy-coded data: libjpeg (PIL and
        # OpenCV alike) decodes it with artifacts and reports nothing; the size is intact,
        # so it is scored
        (
            "corrupt-jpeg-entropy",
            "jpg",
            jpg[:mid] + rng.integers(0, 255, 8, dtype=np.uint8).tobytes() + jpg[mid + 8 :],
            schema.OK,
            (64, 48),
        ),
        (
            "not-an-image",
            "jpg",
            b"<html><body>404 Not Found</body></html>" * 3,
            schema.DECODE_ERROR,
            None,
        ),
        ("zero-bytes", "jpg", b"", schema.EMPTY_IMAGE, None),
        ("cmyk", "jpg", _encode(cmyk, "JPEG"), schema.OK, (40, 30)),
        ("png-16bit", "png", _encode(i16, "PNG"), schema.OK, (32, 24)),
        ("png-palette-alpha", "png", _encode(palette, "PNG"), schema.OK, (36, 20)),
        ("png-rgba", "png", _encode(rgba, "PNG"), schema.OK, (30, 30)),
        ("gray-jpeg", "jpg", _encode(gray, "JPEG"), schema.OK, (50, 40)),
        ("one-pixel", "png", _encode(one, "PNG"), schema.OK, (1, 1)),
        # a real bomb: 144M pixels of mode "1" compress to ~17 kB
        ("bomb-png", "png", _encode(Image.new("1", (12000, 12000)), "PNG"), schema.TOO_LARGE, None),
        # headers that declare 900M pixels over a few bytes of data
        ("bomb-png-header", "png", _png_with_size(small_png, 30000, 30000), schema.TOO_LARGE, None),
        ("bomb-jpeg-header", "jpg", _jpeg_with_size(jpg, 30000, 30000), schema.TOO_LARGE, None),
        # 2.56M pixels: under the default limit, over MAX_IMAGE_PIXELS (the limit is a setting)
        (
            "over-configured-limit",
            "png",
            _encode(Image.new("1", (1600, 1600)), "PNG"),
            schema.TOO_LARGE,
            None,
        ),
    ]


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """member name -> (header offset, data offset)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def _sample(
    key: str,
    caption: bytes | None = b"a picture",
    meta: bytes | None = None,
    image: bytes | None = None,
    ext: str = "jpg",
) -> list[tuple[str, bytes]]:
    """Members in webdataset order (txt, json, image: a cut image leaves txt/json behind)."""
    out = []
    if caption is not None:
        out.append((f"{key}.txt", caption))
    if meta is not None:
        out.append((f"{key}.json", meta))
    if image is not None:
        out.append((f"{key}.{ext}", image))
    return out


def _meta(uid: str | None, **extra) -> bytes:
    d = dict(extra)
    if uid is not None:
        d["uid"] = uid
    return json.dumps(d).encode()


def write_bad_pool(root: str | Path) -> BadPool:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pool = BadPool(str(root))
    uid_n = iter(range(1000))

    def add(
        shard: str,
        key: str,
        status: str,
        size: tuple[int, int] | None = None,
        uid: str | None = None,
    ) -> None:
        pool.samples[(shard, key)] = status
        if size is not None:
            pool.sizes[(shard, key)] = size
        if uid is not None:
            pool.uids[(shard, key)] = uid

    # -- a: every kind of image ------------------------------------------------------------
    shard = "a-images.tar"
    members = []
    for key, ext, data, status, size in image_cases():
        uid = _uid(next(uid_n))
        members += _sample(key, f"caption of {key}".encode(), _meta(uid), data, ext)
        add(shard, key, status, size, uid)
    (root / shard).write_bytes(_tar_bytes(members))
    pool.shards[shard] = schema.SHARD_OK

    # -- b: captions, json and uids --------------------------------------------------------
    shard = "b-meta.tar"
    img = _jpeg(32, 32, 20)
    cross_uid = _uid(900)
    in_shard_uid = _uid(901)
    cases = [
        ("no-caption", None, _meta(_uid(next(uid_n))), img, schema.NO_CAPTION),
        ("empty-caption", b"  \n\t ", _meta(_uid(next(uid_n))), img, schema.NO_CAPTION),
        (
            "non-utf8-caption",
            b"caf\xe9 \xff\xfe",
            _meta(_uid(next(uid_n))),
            img,
            schema.BAD_CAPTION,
        ),
        ("json-without-uid", b"a cat", _meta(None, url="http://x/1.jpg"), img, schema.OK),
        ("json-malformed-uid", b"a dog", _meta("not-a-uid-1234"), img, schema.OK),
        ("json-short-uid", b"a dog", _meta("abc123"), img, schema.OK),
        ("json-not-json", b"a bird", b"{uid: 'oops'", img, schema.OK),
        ("json-not-object", b"a fish", b"[1, 2, 3]", img, schema.OK),
        ("no-json", b"a horse", None, img, schema.OK),
        (
            "no-image",
            b"a caption without a picture",
            _meta(_uid(next(uid_n))),
            None,
            schema.NO_IMAGE,
        ),
        ("dup-first", b"first of a pair", _meta(in_shard_uid), img, schema.OK),
        ("dup-second", b"second of a pair", _meta(in_shard_uid), img, schema.DUPLICATE_UID),
        # upper case: the same uid as c-dups' dup-across once normalised
        ("dup-across", b"also in another shard", _meta(cross_uid.upper()), img, schema.OK),
        # names that would escape an extraction folder: only ever split into key/extension
        (f"../{ESCAPE_DIR}/evil", b"escape attempt", _meta(_uid(next(uid_n))), img, schema.OK),
        (f"{ABSOLUTE_DIR}/evil", b"absolute path", _meta(_uid(next(uid_n))), img, schema.OK),
    ]
    members = []
    for key, caption, meta, image, status in cases:
        members += _sample(key, caption, meta, image)
        uid = json.loads(meta).get("uid") if meta and meta.startswith(b'{"') else None
        add(
            shard,
            key,
            status,
            (32, 32) if status == schema.OK else None,
            uid.lower() if uid and len(uid) == 32 else None,
        )
    # a stray member without an extension is not a sample (webdataset ignores it)
    members.append(("README", b"not a sample"))
    (root / shard).write_bytes(_tar_bytes(members))
    pool.shards[shard] = schema.SHARD_OK

    # -- c: good samples, one uid also in b ------------------------------------------------
    shard = "c-dups.tar"
    members = []
    for i in range(3):
        uid = _uid(next(uid_n))
        members += _sample(f"good-{i:02d}", b"a red square", _meta(uid), _jpeg(40, 32, 30 + i))
        add(shard, f"good-{i:02d}", schema.OK, (40, 32), uid)
    members += _sample("dup-across", b"the other copy", _meta(cross_uid), _jpeg(40, 32, 39))
    add(shard, "dup-across", schema.OK, (40, 32), cross_uid)
    (root / shard).write_bytes(_tar_bytes(members))
    pool.shards[shard] = schema.SHARD_OK

    # -- d: truncated in the middle of a member's data -------------------------------------
    shard = "d-truncated.tar"
    members = []
    for i in range(4):
        members += _sample(f"s{i}", b"a blue sky", _meta(_uid(next(uid_n))), _jpeg(40, 32, 40 + i))
    data = _tar_bytes(members)
    _, data_at = _member_offsets(data)["s2.jpg"]
    (root / shard).write_bytes(data[: data_at + 100])
    add(shard, "s0", schema.OK, (40, 32))
    add(shard, "s1", schema.OK, (40, 32))
    add(shard, "s2", schema.TRUNCATED)  # caption and json read, image cut
    pool.shards[shard] = schema.SHARD_TRUNCATED  # s3 is lost: nothing of it was in the file

    # -- e: truncated exactly between two members (no end-of-archive marker) ----------------
    shard = "e-cut-at-boundary.tar"
    members = []
    for i in range(3):
        members += _sample(
            f"s{i}", b"a green field", _meta(_uid(next(uid_n))), _jpeg(40, 32, 50 + i)
        )
    data = _tar_bytes(members)
    header_at, _ = _member_offsets(data)["s2.txt"]
    (root / shard).write_bytes(data[:header_at])
    add(shard, "s0", schema.OK, (40, 32))
    add(shard, "s1", schema.TRUNCATED)  # the last group read: its completeness is unknowable
    pool.shards[shard] = schema.SHARD_TRUNCATED

    # -- f: a garbled header in the middle --------------------------------------------------
    shard = "f-corrupt-header.tar"
    members = []
    for i in range(3):
        members += _sample(
            f"s{i}", b"a yellow car", _meta(_uid(next(uid_n))), _jpeg(40, 32, 60 + i)
        )
    data = bytearray(_tar_bytes(members))
    header_at, _ = _member_offsets(bytes(data))["s1.json"]
    data[header_at : header_at + 512] = (
        np.random.default_rng(7).integers(1, 256, 512, dtype=np.uint8).tobytes()
    )
    (root / shard).write_bytes(bytes(data))
    add(shard, "s0", schema.OK, (40, 32))
    add(shard, "s1", schema.TRUNCATED)  # its caption was read, the rest is behind the damage
    pool.shards[shard] = schema.SHARD_CORRUPT

    # -- g/h/i: empty and unreadable tars ---------------------------------------------------
    (root / "g-empty.tar").write_bytes(b"")
    pool.shards["g-empty.tar"] = schema.SHARD_EMPTY
    (root / "h-no-members.tar").write_bytes(_tar_bytes([]))
    pool.shards["h-no-members.tar"] = schema.SHARD_EMPTY
    (root / "i-not-a-tar.tar").write_bytes(
        np.random.default_rng(8).integers(1, 256, 3000, dtype=np.uint8).tobytes()
    )
    pool.shards["i-not-a-tar.tar"] = schema.SHARD_UNREADABLE

    # -- j: parquet with bad cells ----------------------------------------------------------
    shard = "j-cells.parquet"
    pq_uid = _uid(950)
    rows = [
        ("p0", _uid(next(uid_n)), _jpeg(40, 32, 70), "a purple flower", schema.OK),
        ("p1", _uid(next(uid_n)), None, "a null image cell", schema.EMPTY_IMAGE),
        ("p2", _uid(next(uid_n)), _jpeg(40, 32, 71), None, schema.NO_CAPTION),
        ("p3", pq_uid, _jpeg(40, 32, 72), "first", schema.OK),
        ("p4", pq_uid, _jpeg(40, 32, 73), "second", schema.DUPLICATE_UID),
        ("p5", None, b"\x89PNG\r\n\x1a\n garbage", "broken png", schema.DECODE_ERROR),
    ]
    table = pa.table(
        {
            "key": [r[0] for r in rows],
            "uid": [r[1] for r in rows],
            "image": pa.array([r[2] for r in rows], pa.binary()),
            "caption": [r[3] for r in rows],
        }
    )
    pq.write_table(table, root / shard)
    for key, uid, _, _, status in rows:
        add(shard, key, status, (40, 32) if status == schema.OK else None, uid)
    pool.shards[shard] = schema.SHARD_OK

    # -- k: parquet without the image column: a failed shard (no rows) ----------------------
    shard = "k-no-image-column.parquet"
    pq.write_table(pa.table({"key": ["q0", "q1", "q2"], "caption": ["x", "y", "z"]}), root / shard)
    for key in ("q0", "q1", "q2"):
        add(shard, key, schema.NO_IMAGE)
    pool.shards[shard] = schema.SHARD_MISSING_COLUMN

    # -- l/m: empty and unreadable parquet --------------------------------------------------
    pq.write_table(
        pa.table({"image": pa.array([], pa.binary()), "caption": pa.array([], pa.string())}),
        root / "l-empty.parquet",
    )
    pool.shards["l-empty.parquet"] = schema.SHARD_EMPTY
    (root / "m-not-parquet.parquet").write_bytes(b"PAR1" + b"\x00" * 100 + b"garbage")
    pool.shards["m-not-parquet.parquet"] = schema.SHARD_UNREADABLE
    return pool
