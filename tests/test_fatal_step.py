"""A model step that fails on every sample (here a custom CLIP JSON whose vocabulary is too
small for its tokenizer: every caption raises the same IndexError) stops the run early with
the stage and the error named, instead of scoring the pool into a column of score_error; a
healthy run's driver log shows per-status row counts while it runs. Real Ray, real models."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import TINY_CONFIG, tiny_cfg
from tmars_ray.devtools.synth import write_pool
from tmars_ray.job import JobError, run


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fatal") / "pool"
    write_pool(str(path), samples=48, shards=6, seed=31)
    return str(path)


def test_a_step_failing_on_every_sample_stops_the_run(ray_session, pool, tmp_path):
    broken = json.loads(open(TINY_CONFIG).read())
    broken["text_cfg"]["vocab_size"] = 1000  # token ids up to 49407: IndexError on every caption
    model = tmp_path / "tiny-small-vocab.json"
    model.write_text(json.dumps(broken))
    cfg = tiny_cfg(
        input=pool,
        output=str(tmp_path / "run"),
        clip_model=str(model),
        clip_pretrained="none",
        allow_random_weights=True,
    )
    with pytest.raises(JobError) as err:
        run(cfg)
    msg = str(err.value)
    assert "score stage" in msg and "samples all failed with IndexError" in msg, msg
    assert not (tmp_path / "run" / "keep").exists()  # no keep-list from a broken model


def test_progress_lines_count_rows_by_status(ray_session, pool, tiny_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tmars_ray")
    result = run(
        tiny_cfg(input=pool, output=str(tmp_path / "run"), clip_pretrained=tiny_checkpoint)
    )
    assert result.exit_code == 0
    lines = [r.getMessage() for r in caplog.records if "rows so far:" in r.getMessage()]
    assert lines and "ok 48" in lines[-1], lines
