"""Hostile inputs cost what their output needs: oversized or unused tar members are never held
in memory, extreme aspect ratios are scored within a bounded cost."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc

import numpy as np
from PIL import Image

from tmars_ray.config import Config
from tmars_ray.data import schema, sources

BIG = 48 * 2**20  # bytes of a hostile member


def _png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    """`n` zero bytes, produced as they are read (the tar's member payload)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, size: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else size
    tar.addfile(info, io.BytesIO(data) if data is not None else io.BufferedReader(_Zeros(size)))


def _shard(path) -> None:  # noqa: ANN001
    with tarfile.open(path, "w") as tar:
        for key, image in (("a", _png(8, 8)), ("b", None), ("c", _png(8, 8))):
            if image is not None:
                _add(tar, f"{key}.png", image)
            else:
                _add(tar, f"{key}.jpg", size=BIG)  # over --max-member-bytes
            _add(tar, f"{key}.txt", b"a caption")
            _add(tar, f"{key}.json", json.dumps({"uid": f"{ord(key):032x}"}).encode())
            _add(tar, f"{key}.mp4", size=BIG)  # a member no sample uses


def test_oversized_and_unused_members_are_never_read(tmp_path):
    shard = tmp_path / "00000.tar"
    _shard(shard)
    cfg = Config(input=str(tmp_path), output=str(tmp_path / "run"), max_member_bytes=2**20)
    item = sources.shard_items(str(tmp_path), [str(shard)])[0]
    tracemalloc.start()
    rows = list(sources.read_shard(item, cfg))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    samples = [r for r in rows if r["kind"] == "sample"]
    assert [r["key"] for r in samples] == ["a", "b", "c"]
    assert [r["status"] for r in samples] == ["", schema.TOO_LARGE, ""]
    assert samples[1]["uid"] == f"{ord('b'):032x}" and not samples[1]["derived_uid"]
    assert rows[-1]["kind"] == "end" and rows[-1]["n_samples"] == 3
    assert peak < 8 * 2**20, f"reading held {peak / 2**20:.0f} MiB: a big member was read"
