"""The report checks keep/'s seal (issue 25 item 6): keep files that summary.json does not name
by size and hash (another selection's, or a half-replaced set) make the report refuse instead
of showing one selection's counts over another's keep-list."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import tiny_cfg
from tmars_ray.job import run
from tmars_ray.report.report import write_report
from tmars_ray.run.summary import KeepListMismatch
from tmars_ray.selection import select as sel


def test_report_refuses_a_keep_folder_its_seal_does_not_match(
    ray_session, tiny_checkpoint, tmp_path
):
    from tmars_ray.devtools.synth import write_pool

    pool, out = str(tmp_path / "pool"), str(tmp_path / "run")
    write_pool(pool, samples=8, shards=2, seed=43)
    assert run(tiny_cfg(input=pool, output=out, clip_pretrained=tiny_checkpoint)).exit_code == 0
    assert write_report(out, str(tmp_path / "ok.html"))  # sealed: reported

    other = str(tmp_path / "other")
    sel.select([out], other, fraction=0.25)  # another selection of the same scores
    shutil.copy(f"{other}/keep/keep.parquet", f"{out}/keep/keep.parquet")
    with pytest.raises(KeepListMismatch, match="report refused: .*keep.parquet"):
        write_report(out, str(tmp_path / "mixed.html"))

    # the summary gone (a selection being written, or died writing): refused too
    shutil.copy(f"{other}/keep/keep.parquet", f"{out}/keep/keep.parquet")
    (tmp_path / "run/keep/summary.json").unlink()
    with pytest.raises(KeepListMismatch, match="report refused: .*without summary.json"):
        write_report(out, str(tmp_path / "unsealed.html"))
    assert not (tmp_path / "unsealed.html").exists()
