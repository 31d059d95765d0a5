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


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIK7MDENG",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEBYaDH",
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AZURE_STORAGE_SAS_TOKEN": "sv=2022-11-02&sig=abcdefgh",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON": '{"private_key": "-----BEGIN"}',
    "AWS_REGION": "us-east-1",
}


def test_every_credential_form_is_masked():
    env = SECRETS
    for value in list(SECRETS.values())[:-1]:
        assert value not in redact(f"failed with {value} in it", env)
    # configuration values are not secrets: messages keep them
    assert "us-east-1" in redact("region us-east-1", env)
    # a password holding '/', ':' or '@'
    out = redact("open s3://admin:pa/ss:w@rd@host:9000/bucket/x.tar failed", {})
    assert "pa/ss" not in out and "w@rd" not in out and "host:9000/bucket/x.tar failed" in out
    url = (
        "http://127.0.0.1:9/pool/00000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba"
        "&X-Amz-Expires=3600"
    )
    out = redact(f"error: cannot read {url}", {})
    assert "IQoJb3JpZ2luX2VjEJr" not in out and "5d672d79c15b" not in out
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out and "X-Amz-Expires=3600" in out
    for query in ("?Signature=abc123xyz", "?sig=abc123xyz&se=2026", "&token=abc123xyz"):
        assert "abc123xyz" not in redact(f"https://h/p{query}", {})


def test_records_of_loggers_that_do_not_propagate_are_masked(monkeypatch):
    """Ray's loggers keep their own handlers (propagate=False): the record factory still sees
    their records."""
    import io

    from tmars_ray.run.redact import install_log_filter

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIK7MDENG")
    stream = io.StringIO()
    logger = logging.getLogger("ray.data.fake_for_test")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    try:
        install_log_filter()
        install_log_filter()  # idempotent
        logger.warning("env %s; url %s", "wJalrXUtnFEMIK7MDENG", "s3://u:p/w@h/b")
        try:
            raise OSError("denied wJalrXUtnFEMIK7MDENG")
        except OSError:
            logger.exception("read failed")
    finally:
        logger.handlers.clear()
    text = stream.getvalue()
    assert "wJalrXUtnFEMIK7MDENG" not in text and "p/w" not in text
    assert "read failed" in text and "OSError: denied ***" in text
