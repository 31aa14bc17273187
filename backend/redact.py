"""Keep secrets out of every log line, whoever logs it (our code, httpx, uvicorn, a traceback).

Installed once per process with the secrets from the settings: the log record factory replaces
each secret in the message, its arguments and any exception text with ``***`` as the record is made,
before any handler or formatter sees it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable

_installed: set[str] = set()
_base_factory = logging.getLogRecordFactory()
MASK = "***"


def redact(text: str) -> str:
    for secret in _installed:
        text = text.replace(secret, MASK)
    return text


def _factory(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    if not _installed:
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must still be logged
        message = str(record.msg)
    record.msg, record.args = redact(message), ()
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    return record


def install_secret_redaction(secrets: Iterable[str | None]) -> None:
    """Mask these values (ignoring empty and very short ones) in all future log records."""
    _installed.update(s for s in secrets if s and len(s) >= 4)
    if logging.getLogRecordFactory() is not _factory:
        logging.setLogRecordFactory(_factory)
