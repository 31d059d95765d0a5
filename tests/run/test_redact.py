"""Credentials are scrubbed from messages, log records and JSON-like objects."""

from __future__ import annotations

import logging

from tmars_ray.run.redact import RedactingFilter, redact, redact_obj

ENV = {"AWS_SECRET_ACCESS_KEY": "s3cr3tValue123", "HF_TOKEN": "hf_abcdefgh", "HOME": "/root"}


def test_secret_values_and_url_passwords_are_masked():
    text = "merge failed: {'AWS_SECRET_ACCESS_KEY': 's3cr3tValue123', 'HOME': '/root'} hf_abcdefgh"
    out = redact(text, ENV)
    assert "s3cr3tValue123" not in out and "hf_abcdefgh" not in out and "/root" in out
    assert redact("s3://user:pa55word@host/bucket", {}) == "s3://user:***@host/bucket"


def test_objects_and_log_records(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3tValue123")
    assert redact_obj({"a": ["x s3cr3tValue123"], "n": 1}) == {"a": ["x ***"], "n": 1}
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "env %s", ("s3cr3tValue123",), None)
    try:
        raise RuntimeError("boom s3cr3tValue123")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    assert "s3cr3tValue123" not in record.getMessage() and "boom ***" in record.getMessage()
