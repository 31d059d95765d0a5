"""Scoring faults with real processes: a sample that kills its model worker is isolated with
status worker_crash (the job goes on); a part-writer task killed mid-write loses and
duplicates nothing; and one command reads the run's manifest once."""

from __future__ import annotations

import collections

import pytest

from tests.conftest import read_scores, tiny_cfg
from tmars_ray.engine.isolation import CRASH_KEY_ENV
from tmars_ray.engine.writer import CRASH_ONCE_ENV
from tmars_ray.job import run
from tmars_ray.run import storage
from tmars_ray.run.manifest import RunState


def _keys(pool: str) -> list[str]:
    import tarfile

    with tarfile.open(f"{pool}/00000001.tar") as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def test_poison_sample_gets_worker_crash_and_the_job_goes_on(
    ray_session, small_pool, tiny_checkpoint, tmp_path, monkeypatch
):
    poison = _keys(small_pool)[2]
    monkeypatch.setenv(CRASH_KEY_ENV, poison)  # the stage aborts its process on this sample
    cfg = tiny_cfg(input=small_pool, output=str(tmp_path / "run"), clip_pretrained=tiny_checkpoint)
    result = run(cfg, select_too=False)
    table = read_scores(cfg.output)
    status = dict(zip(table["key"].to_pylist(), table["status"].to_pylist()))
    assert table.num_rows == 24
    assert status[poison] == "worker_crash"
    assert collections.Counter(status.values()) == {"ok": 23, "worker_crash": 1}
    assert result.summary["scoring"]["samples"]["by_status"]["worker_crash"] == 1


def test_writer_killed_mid_write_loses_and_duplicates_nothing(
    ray_session, small_pool, tiny_checkpoint, tmp_path, monkeypatch
):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # one writer task aborts after a write
    cfg = tiny_cfg(input=small_pool, output=str(tmp_path / "run"), clip_pretrained=tiny_checkpoint)
    result = run(cfg)
    assert result.exit_code == 0, result.message
    assert marker.exists()  # the crash did happen
    state = RunState.load(cfg.output)
    on_disk = {
        p.split("/scores/", 1)[1]
        for p in storage.filesystem(state.layout.scores_dir)[0].find(state.layout.scores_dir)
    }
    listed = {p.split("scores/", 1)[1] for p in state.listed_parts()}
    assert listed < on_disk  # the killed attempt's part is on disk, but never listed
    table = read_scores(cfg.output)
    keys = list(zip(table["shard"].to_pylist(), table["key"].to_pylist()))
    assert len(keys) == len(set(keys)) == 24
    assert result.summary["counts"]["input"] == 24


class _CountingFS:
    """Wraps a filesystem, counting listings of a run's manifest folder."""

    def __init__(self, fs, counts):
        self._fs, self._counts = fs, counts

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in ("ls", "find", "glob", "walk", "listdir"):
            return attr

        def listing(path, *a, **kw):
            if "/manifest" in str(path):
                self._counts.append(str(path))
            return attr(path, *a, **kw)

        return listing


@pytest.mark.parametrize("rerun", [False, True])
def test_one_manifest_listing_per_command(
    ray_session, small_pool, tiny_checkpoint, tmp_path_factory, monkeypatch, rerun
):
    out = str(tmp_path_factory.mktemp("once") / "run")
    cfg = tiny_cfg(input=small_pool, output=out, clip_pretrained=tiny_checkpoint, report=True)
    if rerun:
        assert run(cfg).exit_code == 0
    listings: list[str] = []
    real = storage.filesystem

    def counting(url):
        fs, path = real(url)
        return _CountingFS(fs, listings), path

    monkeypatch.setattr(storage, "filesystem", counting)
    result = run(cfg)  # score (or skip all), select, report
    assert result.exit_code == 0, result.message
    assert result.summary.get("report"), "the report was written"
    assert len(listings) == 1, listings
