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


def _contains_secret(text: str) -> bool:
    return any(secret in text for secret in _installed)


def _redact_arg(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (int, float, bool, type(None))):
        return value
    text = str(value)
    return redact(text) if _contains_secret(text) else value


def _factory(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    if not _installed:
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must still be logged
        message = str(record.msg)
    if _contains_secret(message):
        # Redact argument by argument so formatters that read record.args keep their shape
        # (uvicorn's access log unpacks five of them); collapse only if that was not enough.
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        try:
            still = _contains_secret(record.getMessage())
        except Exception:  # noqa: BLE001
            still = True
        if still:
            record.msg, record.args = redact(message), ()
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    return record


def install_secret_redaction(secrets: Iterable[str | None]) -> None:
    """Mask these values (ignoring empty and very short ones) in all future log records."""
    _installed.update(s for s in secrets if s and len(s) >= 4)
    if logging.getLogRecordFactory() is not _factory:
        logging.setLogRecordFactory(_factory)
