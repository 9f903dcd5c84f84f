"""The redaction filter scrubs credentials and every value the cache registered."""

from __future__ import annotations

import io
import json
import logging

import pytest

from broker.logging import SECRETS, JsonFormatter, RedactingFilter, redact


@pytest.fixture
def capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("dial postgres://user:hunter2-pw@db:5432/x", "hunter2-pw"),
        ("password=hunter2-pw and more", "hunter2-pw"),
        ('{"token": "abc.def.ghi"}', "abc.def.ghi"),
        ("Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.payload.sig", "eyJhbGciOiJSUzI1NiJ9"),
        ("got hvs.CAESIJ1234567890abcdefghijklmnop", "CAESIJ1234567890abcdefghijklmnop"),
    ],
)
def test_patterns(text: str, leak: str) -> None:
    assert leak not in redact(text)


def test_registered_values_are_scrubbed_everywhere(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    SECRETS.add("registered-value-xyz")
    try:
        logger.warning("value %s in args", "registered-value-xyz", extra={"detail": "also registered-value-xyz"})
        try:
            raise RuntimeError("boom registered-value-xyz")
        except RuntimeError:
            logger.exception("failed")
    finally:
        SECRETS.discard("registered-value-xyz")
    out = stream.getvalue()
    assert "registered-value-xyz" not in out
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["detail"] == "also ***" and "exc" in lines[1]
