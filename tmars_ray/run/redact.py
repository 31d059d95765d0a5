"""Credentials never reach a log, an exception message, a summary or a report.

Storage and Ray errors sometimes print environments or URLs (a failed runtime-env merge once
printed AWS_SECRET_ACCESS_KEY into the job log; a presigned URL carries its signature in the
query string). `redact` replaces
- the values of secret-looking environment variables (AWS_*, GCS/Azure credentials, tokens),
- URL userinfo passwords, whatever characters they hold (`s3://user:pa/ss@host`),
- credential query parameters (`X-Amz-Security-Token`, `X-Amz-Signature`, `Signature`, `sig`,
  `token`, ...).
`install_log_filter` applies it to every log record this process creates (our loggers, Ray's
and Ray Data's, which keep their own handlers), and the job entry points pass error messages,
summary.json and the report through it.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|SAS|CONNECTION_STRING"
    r"|^AWS_|^AZURE_STORAGE_(KEY|ACCOUNT_KEY)|^GOOGLE_APPLICATION_CREDENTIALS_JSON"
)
# AWS_* names that are configuration, not secrets (their values appear in messages on purpose)
_NOT_SECRET = {"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE",
               "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3",
               "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_DEFAULT_OUTPUT"}  # fmt: skip
# scheme://user:password@host - the password may hold '/', ':' or '@'; the host part starts
# after the LAST '@' before the next whitespace or quote
_URL_USERINFO = re.compile(
    r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s'\"]*):(?P<pw>[^\s'\"]*)@"
)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:X-Amz-Security-Token|X-Amz-Signature|X-Amz-Credential|X-Goog-Signature"
    r"|X-Goog-Credential|Signature|sig|token|access_token|AWSAccessKeyId|Policy|Key-Pair-Id)"
    r"=)(?P<value>[^&\s'\"#]+)",
    re.IGNORECASE,
)


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    values = {
        v
        for k, v in env.items()
        if k.upper() not in _NOT_SECRET and _SECRET_NAME.search(k.upper()) and len(v) >= 6
    }
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def _mask_userinfo(match: re.Match) -> str:
    return f"{match['scheme']}{match['user']}:{MASK}@"


def redact(text: str, env: dict[str, str] | None = None) -> str:
    """`text` with every credential we can recognise replaced by `***`."""
    if not isinstance(text, str):
        text = str(text)
    for value in secret_values(env):
        text = text.replace(value, MASK)
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_obj(obj: Any) -> Any:
    """Redact every string inside a JSON-like object (summary, config dump)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "_tmars_redacted", False):
        return record
    message = record.getMessage()
    if record.exc_info:
        message += "\n" + logging.Formatter().formatException(record.exc_info)
        record.exc_info, record.exc_text = None, None
    record.msg, record.args = redact(message), ()
    record._tmars_redacted = True
    return record


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


_factory_installed = False


def install_log_filter() -> None:
    """Redact every log record this process creates, whichever logger and handler it goes to
    (Ray's and Ray Data's loggers do not propagate to the root): a record factory sees each
    record once, at creation. Safe to call many times (driver, every worker)."""
    global _factory_installed
    if not _factory_installed:
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return _redact_record(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _factory_installed = True
    root = logging.getLogger()
    for handler in root.handlers:  # records made before the factory was installed
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
