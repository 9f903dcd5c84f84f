"""JSON-lines logs on stderr, with the request id of the request being served and a redaction filter.

The code never logs a secret value; the filter is the second line of defence. It scrubs credentials in
URIs, ``password=``/``token=`` style pairs, bearer tokens, Vault tokens, and every value the cache holds,
at a cost per record that does not grow with the number of cached values (``SecretRegistry``).
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
_LONG = 8  # values this long are filed under a piece this long (far more distinct pieces than of 4)
_ANCHOR_SCAN = 512  # positions of a value looked at for its anchor (a long value needs only one)
# Every piece of a text is cut by C-level map() over prepared slices (several times faster than a loop),
# prepared for the longest text seen so far (in powers of two, up to _MAX_SLICES): most log lines are short,
# and 2 x 2048 slices held from start-up cost about half a MiB.
_MAX_SLICES = 2048


class SecretRegistry:
    """Values that must never appear in a log line. The resolver registers every value it serves.

    A record is checked at a cost that does not depend on how many values are registered: each value is
    filed under one anchor, one of its own 8-character pieces (4 for values shorter than 8), chosen as the
    piece the fewest other values are filed under (so values sharing a shape, like connection JSON, still spread
    out). A text can contain a value only if it contains that value's anchor, so scrubbing a text looks up
    each of the text's pieces once and compares only the few values filed under the pieces it finds.

    Bounded: past ``limit`` values the oldest are forgotten (they are usually long rotated away).
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._values: dict[str, str] = {}  # value -> its anchor, oldest first
        # anchor -> the value filed under it, or the values when more than one (most anchors hold one:
        # no list for them, which halves what the registry keeps per value)
        self._anchors: dict[str, str | list[str]] = {}
        self._sizes = {MIN_SECRET_LEN: 0, _LONG: 0}  # anchors of each length (a length with none is not cut)
        self._limit = limit
        self._slices: dict[int, tuple[slice, ...]] = {MIN_SECRET_LEN: (), _LONG: ()}

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: str) -> None:
        if len(value) < MIN_SECRET_LEN:
            return
        anchor = self._values.pop(value, None)
        if anchor is None:
            anchor = self._anchor_for(value)
            filed = self._anchors.get(anchor)
            if filed is None:
                self._anchors[anchor] = value
                self._sizes[len(anchor)] += 1
            elif isinstance(filed, str):
                self._anchors[anchor] = [filed, value]
            else:
                filed.append(value)
        self._values[value] = anchor  # (re)inserted last: the newest
        while len(self._values) > self._limit:
            self.discard(next(iter(self._values)))

    def _anchor_for(self, value: str) -> str:
        size = _LONG if len(value) >= _LONG else MIN_SECRET_LEN
        best, load = value[:size], None
        for i in range(min(len(value) - size + 1, _ANCHOR_SCAN)):
            piece = value[i : i + size]
            filed = self._anchors.get(piece)
            if filed is None:
                return piece
            count = 1 if isinstance(filed, str) else len(filed)
            if load is None or count < load:
                best, load = piece, count
        return best

    def discard(self, value: str) -> None:
        anchor = self._values.pop(value, None)
        if anchor is None:
            return
        filed = self._anchors[anchor]
        if isinstance(filed, str):
            del self._anchors[anchor]
            self._sizes[len(anchor)] -= 1
            return
        filed.remove(value)
        if len(filed) == 1:
            self._anchors[anchor] = filed[0]

    def _cuts(self, size: int, n: int) -> tuple[slice, ...]:
        cuts = self._slices[size]
        if len(cuts) < n and len(cuts) < _MAX_SLICES:
            length = min(_MAX_SLICES, 1 << max(6, (n - 1).bit_length()))
            cuts = self._slices[size] = tuple(slice(i, i + size) for i in range(length))
        return cuts

    def candidates(self, text: str) -> list[str]:
        """The registered values filed under a piece of ``text``: the only ones that can occur in it."""
        anchors = self._anchors
        pieces: set[str] = set()
        for size, count in self._sizes.items():
            n = len(text) - size + 1
            if count and n > 0:
                cuts = self._cuts(size, n)
                pieces.update(
                    map(text.__getitem__, cuts[:n] if n <= len(cuts) else (slice(i, i + size) for i in range(n)))
                )
        found: list[str] = []
        for piece in filter(anchors.__contains__, pieces):
            filed = anchors[piece]
            if isinstance(filed, str):
                found.append(filed)
            else:
                found.extend(filed)
        return found

    def scrub(self, text: str) -> str:
        found = [value for value in self.candidates(text) if value in text]
        # Longest first: a value that contains another is scrubbed whole.
        for value in sorted(found, key=len, reverse=True):
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
