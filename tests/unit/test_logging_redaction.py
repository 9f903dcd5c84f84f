"""The redaction filter scrubs credentials and every value the cache registered."""

from __future__ import annotations

import io
import json
import logging

import pytest

from broker.logging import SECRETS, JsonFormatter, RedactingFilter, SecretRegistry, redact


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


def connection_json(i: int, password: str) -> str:
    return json.dumps({"conn_type": "postgres", "host": f"db{i}", "login": "airflow", "password": password})


def test_scrubbing_compares_a_text_with_a_bounded_number_of_values() -> None:
    """The per-record cost is independent of how many values are cached: a text is compared only with the
    values filed under its own pieces, however many values share a shape (benchmarks/log_redaction.py)."""
    registry = SecretRegistry(limit=30_000)
    for i in range(10_000):
        registry.add(f"tok-{i:05d}-{i * 7919 % 100_003:06d}")
        registry.add(connection_json(i, f"pw{i * 104_729 % 1_000_003:07d}x"))
    assert len(registry) == 20_000
    line = "lookup failed for variable k: backend 'vault' did not answer fetch within 5s (retry_in=0.8)"
    assert len(registry.candidates(line)) <= 20
    quoted = f"store said {connection_json(4242, f'pw{4242 * 104_729 % 1_000_003:07d}x')}"
    assert len(registry.candidates(quoted)) <= 60
    assert registry.scrub(quoted) == "store said ***"
    assert registry.scrub("x tok-04242-" + f"{4242 * 7919 % 100_003:06d} y") == "x *** y"


def test_registry_bounds_forgets_and_scrubs_the_longest_first() -> None:
    registry = SecretRegistry(limit=3)
    for value in ("aaaa-1", "bbbb-2", "cccc-3"):
        registry.add(value)
    registry.add("aaaa-1")  # used again: now the newest
    registry.add("dddd-4")  # evicts the oldest, bbbb-2
    assert registry.scrub("aaaa-1 bbbb-2 cccc-3 dddd-4") == "*** bbbb-2 *** ***"
    registry.discard("cccc-3")
    registry.discard("never-added")
    assert registry.scrub("cccc-3") == "cccc-3" and len(registry) == 2
    registry.add("abc")  # shorter than the minimum: not registered
    assert len(registry) == 2
    nested = SecretRegistry()
    nested.add("inner-secret")
    nested.add("outer inner-secret value")
    assert nested.scrub("[outer inner-secret value]") == "[***]"
    assert nested.scrub("only inner-secret here") == "only *** here"


def test_values_sharing_every_piece_are_all_found() -> None:
    registry = SecretRegistry()
    same = ["aaaa", "aaaaa", "aaaaaa", "baaaa"]
    for value in same:
        registry.add(value)
    assert registry.scrub("xx aaaaaa yy") == "xx *** yy"
    assert registry.scrub("baaaa") == "***"
