"""Errors a user can act on, and the run's driver log (issue 24 item 2): a failing `tmars run`
names the stage, the input it happened on (a folder, a shard and its keys, the models) and what
to try, and names its driver log - <run>/logs/driver-*.log, local or on S3, or a temp file when
the run folder cannot be written - which holds the full traceback. Planted secrets reach
neither. Real runs: the CLI in a subprocess (failures before Ray starts, S3) or in this process
on the session's Ray instance."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_CONFIG, tiny_cli_flags

SECRET = "tmars-PLANTED-secret-4b7e19"
PASSWORD = "tmars-PLANTED-pw-90c2"
LOG_LINE = re.compile(r"^driver log \(full traceback\): (\S+)(.*)$", re.MULTILINE)
OUR_INFO = re.compile(r"^\S+ \S+ INFO (?!tmars_ray\.driverlog)", re.MULTILINE)  # a run's record


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tmars_ray", "run", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", **env},
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _cli_here(args: list[str]) -> tuple[int, str]:
    """`tmars run` in this process (it joins the session's Ray): (exit code, stderr)."""
    from click.testing import CliRunner

    from tmars_ray.cli import main

    result = CliRunner().invoke(main, ["run", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stderr


def _error(stderr: str) -> tuple[str, str, str]:
    """(the error line, the hint line, the driver log's path) of a failed run's message."""
    error = next(ln for ln in stderr.splitlines() if ln.startswith("error: "))
    hints = [ln for ln in stderr.splitlines() if ln.startswith("hint: ")]
    found = LOG_LINE.search(stderr)
    assert found, stderr[-3000:]
    return error, hints[0] if hints else "", found[1]


def _no_secrets(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and PASSWORD not in text


def test_a_missing_input_names_listing_its_input_a_hint_and_the_log(tmp_path, tiny_checkpoint):
    """Fails before Ray starts; the input URL carries a password (userinfo) and a path part
    equal to a secret variable's value: both are masked in the message and in the log."""
    out = tmp_path / "run"
    url = f"http://tmars:{PASSWORD}@127.0.0.1:9/pool-{SECRET}/"
    proc = _cli(
        ["--input", url, "--output", str(out), *tiny_cli_flags(tiny_checkpoint)],
        {"AWS_SECRET_ACCESS_KEY": SECRET},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    error, hint, log = _error(proc.stderr)
    assert error.startswith("error: listing inputs failed on http://tmars:***@127.0.0.1:9/pool-")
    assert "does not exist" in error
    assert hint.startswith("hint: check that --input names") and "AWS_ENDPOINT_URL" in hint
    assert Path(log).parent == out / "logs" and Path(log).name.startswith("driver-")
    text = Path(log).read_text()
    assert "Traceback (most recent call last)" in text and "list_shards" in text
    assert "StageError: listing inputs failed" in text and "tmars:***@" in text
    assert OUR_INFO.search(text), text[:2000]
    _no_secrets(proc.stdout, proc.stderr, text)


def test_an_unreadable_checkpoint_names_the_model_load(ray_session, small_pool, tmp_path):
    """A --clip-pretrained file that is no checkpoint passes the driver's weights check (it
    exists) and fails in the model actors' constructors."""
    garbage = tmp_path / "vitb32.pt"
    # fixed bytes: random ones sometimes parse as pickle opcodes (IndexError, not UnpicklingError)
    garbage.write_bytes(bytes(range(256)) * 16)
    out = tmp_path / "run"
    flags = tiny_cli_flags(str(garbage))
    code, stderr = _cli_here(["--input", small_pool, "--output", str(out), *flags])
    assert code == 1, stderr[-3000:]
    error, hint, log = _error(stderr)
    assert error.startswith(f"error: model load failed on --clip-model {TINY_CONFIG} ")
    assert f"--clip-pretrained {garbage}" in error and "UnpicklingError" in error, error
    assert hint.startswith("hint: check --clip-model and --clip-pretrained")
    assert Path(log).parent == out / "logs"
    text = Path(log).read_text()
    assert "Traceback (most recent call last)" in text and "torch.load" in text
    assert "StageError: model load failed" in text


def test_a_model_stage_failing_names_the_stage_the_shard_and_keys(
    ray_session, small_pool, tmp_path, monkeypatch
):
    """Every caption fails in the CLIP step (a vocabulary too small for the tokenizer): the
    score stage stops the run naming the shard and keys of the batch, in the message and the
    log (with the worker's traceback)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    broken = json.loads(Path(TINY_CONFIG).read_text())
    broken["text_cfg"]["vocab_size"] = 1000
    model = tmp_path / f"tiny-{SECRET}.json"
    model.write_text(json.dumps(broken))
    out = tmp_path / "run"
    flags = tiny_cli_flags("none", model=str(model)) + ["--allow-random-weights"]
    code, stderr = _cli_here(["--input", small_pool, "--output", str(out), *flags])
    assert code == 2, stderr[-3000:]
    error = next(ln for ln in stderr.splitlines() if ln.startswith("error: "))
    assert "score stage" in error and "samples all failed with IndexError" in error, error
    shard = re.search(r"\(on (\S+) keys (\S+)\.\.(\S+) \((\d+) samples\)", error)
    assert shard and shard[1].startswith(small_pool) and shard[1].endswith(".tar"), error
    assert "Check the model, its weights and the device" in stderr
    log = LOG_LINE.search(stderr)[1]
    text = Path(log).read_text()
    assert "Traceback (most recent call last)" in text and "IndexError" in text
    assert shard[1] in text
    _no_secrets(stderr[stderr.index("\nerror: ") :], text)  # (Ray's worker lines: not ours)


def test_a_failed_part_write_in_a_worker_names_the_stage_and_shard(ray_session, tmp_path):
    """A Ray task's own StageError (writing parts) reaches the driver inside Ray's wrapper;
    `describe` finds its stage and shard there."""
    import pyarrow as pa
    import ray

    from tmars_ray.engine.writer import write_parts
    from tmars_ray.run.driverlog import describe

    run = tmp_path / "run"
    run.mkdir()
    (run / "scores").write_text("a file where the scores folder should be")
    rows = {"kind": ["sample"], "shard": ["/pool/00000.tar"], "shard_id": ["s0"], "idx": [0],
            "key": ["k0"], "uid": ["0" * 32], "derived_uid": [False], "status": ["ok"],
            "shard_status": [""], "n_samples": [-1], "error": [""], "width": [4], "height": [4]}  # fmt: skip
    task = ray.remote(num_cpus=0.1)(write_parts).remote(pa.table(rows), str(run), [])
    with pytest.raises(Exception) as caught:
        ray.get(task)
    err = describe(caught.value, "scoring", "/pool")
    assert err.stage == "writing parts", err
    assert err.input.startswith("/pool/00000.tar (part scores/s0/part-"), err
    assert "check that the workers can write under --output" in err.hint


def _fail_reading() -> None:
    from tmars_ray.data.sources import StorageError

    raise StorageError("reading s3://pool/00001.tar failed: connection reset by peer")


def test_a_storage_error_in_a_read_task_names_the_shard(ray_session):
    import ray

    from tmars_ray.run.driverlog import describe

    with pytest.raises(Exception) as caught:
        ray.get(ray.remote(num_cpus=0.1)(_fail_reading).remote())
    err = describe(caught.value, "scoring", "s3://pool/")
    assert (err.stage, err.input) == ("reading shard", "s3://pool/00001.tar"), err
    assert (
        err.detail == "StorageError: reading s3://pool/00001.tar failed: connection reset by peer"
    )
    assert "check that every node can read the shard" in err.hint


@pytest.mark.parametrize("case", ["input fault", "output unreachable", "log on s3"])
def test_s3_faults_and_a_driver_log_on_s3(case, s3_server, tmp_path, small_pool, tiny_checkpoint):
    """Wrong credentials (the planted secret) at an S3 input: listing inputs, with the storage
    hint; with an S3 output as well, the run folder is unreachable, and the log stays in the
    temp dir, named; with good credentials and an S3 output the log is put under run/logs/."""
    if not s3_server.running:
        s3_server.start()
    bucket = s3_server.create_bucket(f"dlog-{case.split()[0]}").removeprefix("s3://")
    s3_server.upload_dir(small_pool, f"s3://{bucket}/pool")
    env = s3_server.env()
    if case != "log on s3":
        env["AWS_SECRET_ACCESS_KEY"] = SECRET
    out = f"s3://{bucket}/run" if case != "input fault" else str(tmp_path / "run")
    pool = f"s3://{bucket}/pool" if case != "log on s3" else f"s3://{bucket}/no-such-pool"
    proc = _cli(["--input", pool, "--output", out, *tiny_cli_flags(tiny_checkpoint)], env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error, hint, log = _error(proc.stderr)
    where = LOG_LINE.search(proc.stderr)[2]
    if case == "output unreachable":
        assert error.startswith(f"error: run folder failed on {out}: "), error
        assert "check that --output can be written" in hint and "AWS_ACCESS_KEY_ID" in hint
        assert (
            log.startswith("/") and f"(not in the run folder: could not write {out}/logs/" in where
        )
        text = Path(log).read_text()
    elif case == "input fault":
        assert error.startswith(f"error: listing inputs failed on {pool}: "), error
        assert "AWS_SECRET_ACCESS_KEY" in hint and "AWS_ENDPOINT_URL" in hint
        assert Path(log).parent == Path(out) / "logs"
        text = Path(log).read_text()
    else:
        assert error.startswith(f"error: listing inputs failed on {pool}: "), error
        assert log.startswith(f"{out}/logs/driver-") and where == "", proc.stderr
        text = s3_server.filesystem().cat_file(log.removeprefix("s3://")).decode()
    assert "Traceback (most recent call last)" in text and "StageError" in text
    assert OUR_INFO.search(text), text[:2000]
    _no_secrets(proc.stdout, proc.stderr, text)
