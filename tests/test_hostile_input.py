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


def _inspect_peak_rss_mb(image: str, checkpoint: str) -> tuple[dict, float]:
    """`tmars inspect` in a fresh process; (its JSON line, its peak RSS in MB)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, TINY_CONFIG

    code = (
        "import atexit, resource, sys\n"
        "atexit.register(lambda: print('PEAK', resource.getrusage(resource.RUSAGE_SELF)"
        ".ru_maxrss, file=sys.stderr))\n"
        "from tmars_ray.cli import main\n"
        "main()\n"
    )
    args = ["inspect", image, "--caption", "a cat", "--clip-model", TINY_CONFIG]
    args += ["--clip-pretrained", checkpoint, "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = next(ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK"))
    return json.loads(proc.stdout.splitlines()[0]), int(peak.split()[1]) / 1024


def test_extreme_aspect_ratio_costs_what_a_normal_image_costs(tmp_path, tiny_checkpoint):
    """Before the band, a 1 x 20000 px PNG cost the tiny model's process ~1.3 GB (the short
    side resized to the model's input, the long side blown up with it)."""
    paths = {}
    for name, (h, w) in {"normal": (300, 400), "wide": (1, 20000), "tall": (20000, 1)}.items():
        paths[name] = tmp_path / f"{name}.png"
        paths[name].write_bytes(_png(h, w))
    peaks = {}
    for name, path in paths.items():
        record, peaks[name] = _inspect_peak_rss_mb(str(path), tiny_checkpoint)
        assert record["status"] == "ok" and np.isfinite(record["tmars_score"])
    for name in ("wide", "tall"):
        assert peaks[name] < peaks["normal"] + 150, peaks


SHAPES = [(1, 20000), (20000, 1), (2, 9000), (64, 64)]  # (height, width)


def test_a_run_over_extreme_images_scores_them_all(ray_session, tiny_checkpoint, tmp_path):
    from tests.conftest import read_scores, tiny_cfg
    from tmars_ray.job import run

    pool = tmp_path / "pool"
    pool.mkdir()
    with tarfile.open(pool / "00000.tar", "w") as tar:
        for i, (h, w) in enumerate(SHAPES):
            _add(tar, f"s{i}.png", _png(h, w))
            _add(tar, f"s{i}.txt", b"a grey picture")
            _add(tar, f"s{i}.json", json.dumps({"uid": f"{i + 1:032x}"}).encode())
    cfg = tiny_cfg(input=str(pool), output=str(tmp_path / "run"), clip_pretrained=tiny_checkpoint)
    result = run(cfg)
    assert result.exit_code == 0, result.message
    table = read_scores(str(tmp_path / "run"))
    assert sorted(table.column("status").to_pylist()) == ["ok"] * 4
    sizes = zip(table.column("height").to_pylist(), table.column("width").to_pylist())
    assert sorted(sizes) == sorted(SHAPES)
