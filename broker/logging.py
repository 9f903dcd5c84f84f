"""JSON-lines logs on stderr, with the request id of the request being served and a redaction filter.

The code never logs a secret value; the filter is the second line of defence. It scrubs credentials in
URIs, ``password=``/``token=`` style pairs, bearer tokens, Vault tokens, and every value the cache holds.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_PATTERNS = [
    (re.compile(r"(://[^:/@\s]*:)[^@\s]+@"), r"\1***@"),
    (
        re.compile(
            r"(?i)\b(password|passwd|secret|token|api[_-]?key|client_secret|secret_id)(\"?\s*[=:]\s*\"?)[^\s\",&}]+"
        ),
        r"\1\2***",
    ),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"\b(hv[sbr]|s|b|r)\.[A-Za-z0-9_-]{20,}"), "***"),
]
MIN_SECRET_LEN = 4


class SecretRegistry:
    """Values that must never appear in a log line. The resolver registers every value it serves.

    Bounded: past ``limit`` values the oldest are forgotten (they are usually long rotated away).
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._values: dict[str, None] = {}
        self._limit = limit

    def add(self, value: str) -> None:
        if len(value) >= MIN_SECRET_LEN:
            self._values.pop(value, None)
            self._values[value] = None
            while len(self._values) > self._limit:
                del self._values[next(iter(self._values))]

    def discard(self, value: str) -> None:
        self._values.pop(value, None)

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, "***")
        return text


SECRETS = SecretRegistry()


def redact(text: str) -> str:
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return SECRETS.scrub(text)


class RedactingFilter(logging.Filter):
    """Applied to every record before it is formatted (message, args and extras)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not lose the log line
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO") -> None:
    """Route every logger to stderr as JSON lines through the redaction filter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "botocore", "urllib3", "azure", "google"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
