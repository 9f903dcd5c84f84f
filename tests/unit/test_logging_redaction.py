"""The redaction filter scrubs credentials and every value the cache registered."""

from __future__ import annotations

import io
import json
import logging
import random

import pytest

import broker.logging
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


def occurrences(text: str, values: set[str]) -> list[tuple[int, int]]:
    """Where the values occur in ``text``, found the plain way: merged (start, end) pairs."""
    found = sorted(
        (start, start + len(value))
        for value in values
        for start in range(len(text) - len(value) + 1)
        if text.startswith(value, start)
    )
    merged: list[tuple[int, int]] = []
    for start, end in found:
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


@pytest.mark.parametrize("seed", range(4))
def test_every_occurrence_of_a_registered_value_is_scrubbed_and_nothing_else(seed: int) -> None:
    """Values of a small alphabet (so they share pieces and anchors, overlap and contain one another), texts
    made of them and of noise, values registered, registered again and discarded: the registry scrubs
    exactly where a registered value occurs, as a plain search for every value would."""
    rng = random.Random(seed)
    registry = SecretRegistry()
    registered: set[str] = set()
    pool = ["".join(rng.choice("ab-") for _ in range(rng.randrange(4, 14))) for _ in range(300)]
    for step in range(600):
        value = rng.choice(pool)
        if rng.random() < 0.8:
            registry.add(value)
            registered.add(value)
        else:
            registry.discard(value)
            registered.discard(value)
        assert len(registry) == len(registered)
        if step % 5 == 0:
            text = "".join(rng.choice([*pool[:40], "x", "ab", " "]) for _ in range(rng.randrange(1, 12)))
            assert registry.spans(text) == occurrences(text, registered)


def test_a_value_is_found_at_either_end_of_a_text_overlapping_or_next_to_another() -> None:
    registry = SecretRegistry()
    for value in ("begin-secret-1", "end-secret-22", "short"):
        registry.add(value)
    assert registry.scrub("begin-secret-1") == "***"
    assert registry.scrub("begin-secret-1 and end-secret-22") == "*** and ***"
    assert registry.scrub("begin-secret-1end-secret-22") == "******"
    registry.add("secret-1end")  # overlaps both: the three are scrubbed as one
    assert registry.scrub("[begin-secret-1end-secret-22]") == "[***]"
    assert registry.scrub("begin-secret") == "begin-secret"  # a part of a value is not a value
    assert registry.scrub("shor") == "shor" and registry.scrub("x short") == "x ***"


def test_values_filed_under_one_anchor_are_each_found_and_forgotten_alone() -> None:
    registry = SecretRegistry()
    registry.add("12345678")
    registry.add("2345678X")
    registry.add("12345678X")  # every piece is another value's anchor: filed with one of them
    assert len(registry.candidates("12345678")) == 2
    assert registry.scrub("a 12345678X b 2345678X c 12345678 d") == "a *** b *** c *** d"
    registry.discard("12345678")
    assert registry.scrub("a 12345678X b 2345678X c 12345678 d") == "a *** b *** c 12345678 d"
    registry.discard("12345678X")
    assert registry.scrub("12345678X") == "1***"
    registry.add("12345678X")  # registered again after it was forgotten
    registry.add("12345678X")  # and again: still one value
    assert len(registry) == 2 and registry.scrub("12345678X") == "***"


def test_a_text_with_a_value_s_hash_is_scrubbed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hash collision can only scrub more: the registry does not keep the values to compare."""
    registry = SecretRegistry()
    monkeypatch.setattr(broker.logging, "hash", lambda text: len(text), raising=False)
    registry.add("secret-value-1")
    assert registry.scrub("x secret-value-1 y") == "x *** y"
    assert registry.scrub("x secret-value-2 y") == "x *** y"  # same anchor, length and (fake) hash
    assert registry.scrub("x secret-valu y") == "x secret-valu y"


def test_past_its_limit_the_registry_forgets_the_oldest_anchor_first() -> None:
    registry = SecretRegistry(limit=100)
    values = [f"value-{i:04d}-tail" for i in range(1000)]
    for i, value in enumerate(values):
        registry.add(value)
        registry.add(values[0])  # in use all along: never forgotten
        assert len(registry) == min(i + 1, 100)
    assert registry.scrub(values[0]) == "***"
    assert [registry.scrub(value) == "***" for value in values[-99:]] == [True] * 99
    assert registry.scrub(values[-100]) == values[-100]


@pytest.mark.parametrize("seed", range(4))
def test_a_bounded_registry_scrubs_exactly_the_values_it_still_holds(seed: int) -> None:
    """Past its limit values are forgotten, the last registered never; what is still held (``in``) is
    ``len`` values, and a text is scrubbed exactly where one of them occurs."""
    rng = random.Random(seed)
    registry = SecretRegistry(limit=20)
    pool = ["".join(rng.choice("ab-") for _ in range(rng.randrange(4, 14))) for _ in range(200)]
    ever: set[str] = set()
    for step in range(900):
        value = rng.choice(pool)
        if rng.random() < 0.85:
            registry.add(value)
            ever.add(value)
            assert value in registry
        else:
            registry.discard(value)
            assert value not in registry
        if step % 3 == 0:
            held = {v for v in ever if v in registry}
            assert len(held) == len(registry) <= 20
            text = "".join(rng.choice([*pool[:40], "x", "ab", " "]) for _ in range(rng.randrange(1, 12)))
            assert registry.spans(text) == occurrences(text, held)


def test_a_long_value_filed_far_into_itself_is_found() -> None:
    """A value longer than a short signature holds (2,048 characters), filed under a piece hundreds of
    characters in (every earlier piece is another value's anchor)."""
    rng = random.Random(7)
    long_value = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000))
    registry = SecretRegistry()
    for i in range(400):
        registry.add(long_value[i : i + 8])
    registry.add(long_value)
    assert len(registry.candidates(long_value[400:408])) == 1
    assert registry.scrub(f"{long_value}!{long_value[:-1]}") == "***!" + registry.scrub(long_value[:-1])
    assert long_value not in registry.scrub(f"x{long_value}")
    registry.discard(long_value)
    assert long_value not in registry and len(registry) == 400
