"""Credentials never reach a log, an exception message, a summary or a report.

Storage and Ray errors sometimes print environments or URLs (a failed runtime-env merge once
printed AWS_SECRET_ACCESS_KEY into the job log). `redact` replaces the values of secret-looking
environment variables and URL passwords; `install_log_filter` applies it to every log record
of this process, and the job entry points pass error messages through it before printing.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]+):[^@/\s]+@")


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if _SECRET_NAME.search(k.upper()) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def redact(text: str, env: dict[str, str] | None = None) -> str:
    for value in secret_values(env):
        text = text.replace(value, MASK)
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def redact_obj(obj: Any) -> Any:
    """Redact every string inside a JSON-like object (summary, config dump)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = redact(message), ()
        return True


def install_log_filter() -> None:
    """Redact every record that reaches the root logger's handlers (and later handlers that
    use the root's filters through propagation)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
