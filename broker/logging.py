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
_OFFSET_BITS = 9  # an anchor's offset in its value is below _ANCHOR_SCAN
# 40 bits of the value's hash: with the offset and a length below 2,048 a signature fits in 60 bits, a Python
# int of two digits (32 bytes allocated, 48 for three); a text that is not the value is scrubbed in its place
# once in 2**40 texts that hold its anchor at the right place and have its length.
_HASH_BITS = 40
_HASH_MASK = (1 << _HASH_BITS) - 1
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
# Every piece of a text is cut by C-level map() over prepared slices (several times faster than a loop),
# prepared for the longest text seen so far (in powers of two, up to _MAX_SLICES): most log lines are short,
# and 2 x 2048 slices held from start-up cost about half a MiB.
_MAX_SLICES = 2048

Filed = int | list[int]  # what an anchor holds: one value's signature, or several (oldest first)


def _signature(value: str, offset: int) -> int:
    """One number for a value filed under the piece at ``offset`` of it: the value's hash, that offset and
    the value's length (32 bytes for a value shorter than 2,048 characters, where a copy of the value would
    take 49 and its length)."""
    return hash(value) & _HASH_MASK | (offset | len(value) << _OFFSET_BITS) << _HASH_BITS


class SecretRegistry:
    """Values that must never appear in a log line. The resolver registers every value it serves.

    A record is checked at a cost that does not depend on how many values are registered: each value is
    filed under one anchor, one of its own 8-character pieces (4 for values shorter than 8), chosen as the
    piece the fewest other values are filed under (so values sharing a shape, like connection JSON, still spread
    out). A text can contain a value only if it contains that value's anchor, so scrubbing a text looks up
    each of the text's pieces once and checks only the few values filed under the pieces it finds.

    The values themselves are not kept (the cache holds each value already, in its encoded answer): a value
    is filed under its anchor as its signature (its hash, the anchor's offset in it and its length). Where a
    text holds an anchor at ``p``, the text's piece ``[p - offset, p - offset + length)`` is scrubbed when
    its hash is the value's: a text holding the value is always scrubbed, and another text of the same length
    and hash would be too (more redaction, never less; 40 bits of a hash with a per-process key). Two values
    with one signature under one anchor are filed once, and scrubbed, kept and forgotten as one.

    Bounded: past ``limit`` values the least recently registered are forgotten (they are usually long rotated
    away). Registering a value again makes it the newest, and the others filed under its anchor with it (the
    order is kept per anchor: most anchors hold one value). The anchors are kept in two dicts: ``_recent`` in
    registration order, and ``_older``, registered before any of ``_recent``, newest first, so the oldest is
    its last item, which ``popitem`` takes in constant time; when ``_older`` runs out, ``_recent`` becomes it.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._recent: dict[str, Filed] = {}
        self._older: dict[str, Filed] = {}
        self._count = 0
        self._sizes = {MIN_SECRET_LEN: 0, _LONG: 0}  # anchors of each length (a length with none is not cut)
        self._limit = limit
        self._slices: dict[int, tuple[slice, ...]] = {MIN_SECRET_LEN: (), _LONG: ()}

    def __len__(self) -> int:
        return self._count

    def _filed(self, anchor: str) -> Filed | None:
        filed = self._recent.get(anchor)
        if filed is None and self._older:
            return self._older.get(anchor)
        return filed

    def _take(self, anchor: str) -> Filed | None:
        filed = self._recent.pop(anchor, None)
        if filed is None and self._older:
            return self._older.pop(anchor, None)
        return filed

    def __contains__(self, value: str) -> bool:
        """Whether ``value`` is registered (or a value of the same length and hash under the same anchor)."""
        return len(value) >= MIN_SECRET_LEN and self._look_up(value)[0] is not None

    def _look_up(self, value: str) -> tuple[tuple[str, int] | None, str, int]:
        """Where ``value`` is filed (its anchor and signature), None when it is not registered; and the piece
        it would be filed under, with its offset: the first no value is filed under, else the least loaded."""
        size = _LONG if len(value) >= _LONG else MIN_SECRET_LEN
        n = min(len(value) - size + 1, _ANCHOR_SCAN)
        pieces = list(map(value.__getitem__, self._cuts(size, n)[:n]))
        filed = list(map(self._recent.get, pieces))
        if self._older:
            older = self._older.get
            filed = [f if f is not None else older(piece) for f, piece in zip(filed, pieces, strict=True)]
        taken = [i for i, f in enumerate(filed) if f is not None]
        at_start = _signature(value, 0)  # the signature at offset i: at_start | i << _HASH_BITS
        for i in taken:
            signature = at_start | i << _HASH_BITS
            f = filed[i]
            if f == signature or (isinstance(f, list) and signature in f):
                return (pieces[i], signature), pieces[i], i
        if len(taken) < n:
            free = filed.index(None)
            return None, pieces[free], free

        def load(i: int) -> int:
            f = filed[i]
            return len(f) if isinstance(f, list) else 1

        best = min(taken, key=load)
        return None, pieces[best], best

    def add(self, value: str) -> None:
        if len(value) < MIN_SECRET_LEN:
            return
        found, anchor, offset = self._look_up(value)
        if found is not None:
            anchor, signature = found
            filed = self._take(anchor)
            if isinstance(filed, list):
                filed.remove(signature)
                filed.append(signature)
            self._recent[anchor] = signature if filed is None else filed  # (re)inserted last: the newest
        else:
            signature = _signature(value, offset)
            filed = self._take(anchor)
            if filed is None:
                self._recent[anchor] = signature
                self._sizes[len(anchor)] += 1
            elif isinstance(filed, int):
                self._recent[anchor] = [filed, signature]
            else:
                filed.append(signature)
                self._recent[anchor] = filed
            self._count += 1
        while self._count > self._limit:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        if not self._older:
            self._older = dict(reversed(self._recent.items()))
            self._recent = {}
        anchor, filed = self._older.popitem()
        self._count -= 1
        if isinstance(filed, int):
            self._sizes[len(anchor)] -= 1
        else:
            del filed[0]
            self._older[anchor] = filed[0] if len(filed) == 1 else filed  # still the last: the oldest

    def discard(self, value: str) -> None:
        if len(value) < MIN_SECRET_LEN:
            return
        found = self._look_up(value)[0]
        if found is None:
            return
        anchor, signature = found
        where = self._recent if anchor in self._recent else self._older
        filed = where[anchor]
        self._count -= 1
        if isinstance(filed, int):
            del where[anchor]
            self._sizes[len(anchor)] -= 1
            return
        filed.remove(signature)
        if len(filed) == 1:
            where[anchor] = filed[0]

    def _cuts(self, size: int, n: int) -> tuple[slice, ...]:
        cuts = self._slices[size]
        if len(cuts) < n and len(cuts) < _MAX_SLICES:
            length = min(_MAX_SLICES, 1 << max(6, (n - 1).bit_length()))
            cuts = self._slices[size] = tuple(slice(i, i + size) for i in range(length))
        return cuts

    def _anchors_in(self, text: str) -> list[tuple[str, Filed]]:
        """The anchors among the pieces of ``text``, with what is filed under each."""
        pieces: set[str] = set()
        for size, count in self._sizes.items():
            n = len(text) - size + 1
            if count and n > 0:
                cuts = self._cuts(size, n)
                pieces.update(
                    map(text.__getitem__, cuts[:n] if n <= len(cuts) else (slice(i, i + size) for i in range(n)))
                )
        found = [(piece, filed) for piece in pieces if (filed := self._recent.get(piece)) is not None]
        if self._older:
            found += [(piece, filed) for piece in pieces if (filed := self._older.get(piece)) is not None]
        return found

    def candidates(self, text: str) -> list[int]:
        """The signatures of the values filed under a piece of ``text``: the only values that can occur in it."""
        out: list[int] = []
        for _, filed in self._anchors_in(text):
            if isinstance(filed, int):
                out.append(filed)
            else:
                out.extend(filed)
        return out

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where registered values occur in ``text``: (start, end) pairs, sorted, overlapping ones merged."""
        found: list[tuple[int, int]] = []
        for anchor, filed in self._anchors_in(text):
            signatures = (filed,) if isinstance(filed, int) else filed
            at = text.find(anchor)
            while at >= 0:
                for signature in signatures:
                    start = at - (signature >> _HASH_BITS & _OFFSET_MASK)
                    end = start + (signature >> (_HASH_BITS + _OFFSET_BITS))
                    if start >= 0 and end <= len(text) and hash(text[start:end]) & _HASH_MASK == signature & _HASH_MASK:
                        found.append((start, end))
                at = text.find(anchor, at + 1)
        found.sort()
        merged: list[tuple[int, int]] = []
        for start, end in found:
            if merged and start < merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged

    def scrub(self, text: str) -> str:
        """``text`` with every registered value in it replaced by ``***`` (values that overlap or contain
        one another as one)."""
        spans = self.spans(text)
        if not spans:
            return text
        parts: list[str] = []
        last = 0
        for start, end in spans:
            parts += (text[last:start], "***")
            last = end
        parts.append(text[last:])
        return "".join(parts)


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
