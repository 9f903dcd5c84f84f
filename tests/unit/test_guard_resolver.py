"""Retries, circuit breaking, chain order, and that failures are never turned into "not found"."""

from __future__ import annotations

import asyncio
import random
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pytest

from broker.backends.base import (
    AccessDenied,
    Backend,
    BackendConfig,
    BackendContext,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BrokerError,
    Kind,
    Lease,
    RateLimited,
    SecretNotFound,
    SecretValue,
)
from broker.backends.guard import CircuitBreaker, CircuitOpen, Guard
from broker.clock import FakeClock
from broker.metrics import Metrics
from broker.resolver import NotFoundAnywhere, Resolver, decode_name, name_problem, team_problem


class FakeConfig(BackendConfig):
    type: Literal["fake"] = "fake"


class Scripted(Backend):
    config_model = FakeConfig

    def __init__(self, name: str, answers: list[Any], ctx: BackendContext, **cfg: Any) -> None:
        super().__init__(FakeConfig(name=name, **cfg), ctx)
        self.answers = answers
        self.calls = 0
        self.hang = False

    def locate(self, kind: Kind, name: str) -> str | None:
        return None if name.startswith("skip") else f"{self.name}/{name}"

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        self.calls += 1
        if self.hang:
            import asyncio

            await asyncio.sleep(3600)
        answer = self.answers[min(self.calls - 1, len(self.answers) - 1)]
        if isinstance(answer, BaseException):
            raise answer
        return SecretValue(answer)


@pytest.fixture
def ctx() -> BackendContext:
    return BackendContext(executor=ThreadPoolExecutor(1), clock=FakeClock(), metrics=Metrics())


def guard(backend: Backend, ctx: BackendContext) -> Guard:
    g = Guard(backend, ctx.metrics, rng=random.Random(1))

    async def no_sleep(_: float) -> None:
        return None

    g.backoff.sleep = no_sleep
    return g


async def test_transient_errors_are_retried_then_succeed(ctx: BackendContext) -> None:
    b = Scripted("b", [BackendUnavailable("x"), RateLimited("slow"), "ok"], ctx)
    assert (await guard(b, ctx).fetch(Kind.VARIABLE, "p")).value == "ok"
    assert b.calls == 3


async def test_retries_are_bounded(ctx: BackendContext) -> None:
    b = Scripted("b", [BackendUnavailable("x")], ctx, retries=2)
    with pytest.raises(BackendUnavailable):
        await guard(b, ctx).fetch(Kind.VARIABLE, "p")
    assert b.calls == 3


@pytest.mark.parametrize("exc", [SecretNotFound("n"), AccessDenied("d"), BackendError("e")])
async def test_non_transient_errors_are_not_retried(ctx: BackendContext, exc: Exception) -> None:
    b = Scripted("b", [exc], ctx)
    with pytest.raises(type(exc)):
        await guard(b, ctx).fetch(Kind.VARIABLE, "p")
    assert b.calls == 1


async def test_timeout_becomes_backend_timeout(ctx: BackendContext) -> None:
    b = Scripted("b", ["never"], ctx, timeout=0.05, retries=0)
    b.hang = True
    with pytest.raises(BackendTimeout):
        await guard(b, ctx).fetch(Kind.VARIABLE, "p")


async def test_plugin_bug_is_a_backend_error_without_its_message(ctx: BackendContext) -> None:
    b = Scripted("b", [ValueError("secret-in-message")], ctx)
    with pytest.raises(BackendError) as info:
        await guard(b, ctx).fetch(Kind.VARIABLE, "p")
    assert "secret-in-message" not in str(info.value)


async def test_circuit_opens_then_probes_after_cooldown(ctx: BackendContext) -> None:
    clock = ctx.clock
    assert isinstance(clock, FakeClock)
    b = Scripted("b", [BackendUnavailable("down")], ctx, retries=0)
    g = guard(b, ctx)
    for _ in range(5):
        with pytest.raises(BackendUnavailable):
            await g.fetch(Kind.VARIABLE, "p")
    assert b.calls == 5
    for _ in range(20):
        with pytest.raises(CircuitOpen):
            await g.fetch(Kind.VARIABLE, "p")
    assert b.calls == 5  # no calls while open
    clock.advance(5.1)
    b.answers = ["back"]
    assert (await g.fetch(Kind.VARIABLE, "p")).value == "back"  # the probe
    assert b.calls == 6 and not g.breaker.is_open


def test_failed_probe_doubles_cooldown() -> None:
    br = CircuitBreaker(threshold=1, cooldown=5, max_cooldown=12)
    br.failure(0)
    assert br.open_until == 5
    assert br.allow(5) and not br.allow(5)  # one probe only
    br.failure(5)
    assert br.open_until == 15
    assert br.allow(15)
    br.failure(15)
    assert br.open_until == 27  # capped at 12


async def test_chain_order_and_fall_through_on_not_found(ctx: BackendContext) -> None:
    first = Scripted("first", [SecretNotFound("n")], ctx)
    second = Scripted("second", ["from-second"], ctx)
    r = Resolver([guard(first, ctx), guard(second, ctx)], 300, 3600)
    resolved = await r.resolve(Kind.VARIABLE, "k")
    assert resolved.value == "from-second" and resolved.backend == "second"


async def test_errors_are_never_skipped_in_favour_of_a_lower_backend(ctx: BackendContext) -> None:
    first = Scripted("first", [BackendUnavailable("down")], ctx, retries=0)
    second = Scripted("second", ["must-not-be-used"], ctx)
    r = Resolver([guard(first, ctx), guard(second, ctx)], 300, 3600)
    with pytest.raises(BackendUnavailable):
        await r.resolve(Kind.VARIABLE, "k")
    assert second.calls == 0


async def test_backend_not_serving_a_key_is_skipped_without_a_call(ctx: BackendContext) -> None:
    first = Scripted("first", ["x"], ctx)
    r = Resolver([guard(first, ctx)], 300, 3600)
    with pytest.raises(SecretNotFound):
        await r.resolve(Kind.VARIABLE, "skip-me")
    assert first.calls == 0


async def test_per_backend_ttl(ctx: BackendContext) -> None:
    b = Scripted("b", ["v"], ctx, ttl=7)
    r = Resolver([guard(b, ctx)], 300, 3600)
    assert (await r.resolve(Kind.VARIABLE, "k")).ttl == 7


async def test_per_backend_negative_ttl_the_shortest_of_those_asked(ctx: BackendContext) -> None:
    quick = Scripted("quick", [SecretNotFound("n")], ctx, negative_ttl=3)
    default = Scripted("default", [SecretNotFound("n")], ctx)
    never_asked = Scripted("never", ["x"], ctx, negative_ttl=1)  # serves no "skip" key: its setting is moot
    chain = [guard(default, ctx), guard(quick, ctx)]
    with pytest.raises(NotFoundAnywhere) as found:
        await Resolver(chain, 300, 3600, 30).resolve(Kind.VARIABLE, "k")
    assert found.value.negative_ttl == 3
    with pytest.raises(NotFoundAnywhere) as found:
        await Resolver([guard(default, ctx)], 300, 3600, 30).resolve(Kind.VARIABLE, "k")
    assert found.value.negative_ttl == 30
    with pytest.raises(NotFoundAnywhere) as found:
        await Resolver([guard(never_asked, ctx)], 300, 3600, 30).resolve(Kind.VARIABLE, "skip-k")
    assert found.value.negative_ttl == 30


HOSTILE = [
    "",
    ".",
    "..",
    "../x",
    "a/..",
    "a/./b",
    "./a",
    "/a",
    "a/",
    "a//b",
    "/",
    "a\\b",
    "a\x00b",
    "a\nb",
    "a/\x1fb",
    "a b",
    "%2e%2e",
    "x" * 251,
    "a?b",
    "a#b",
    "\u202e",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(name: str) -> None:
    assert name_problem(name) is not None


def test_a_character_of_category_c_is_named_before_an_empty_segment() -> None:
    other = [chr(i) for i in range(0x110000) if unicodedata.category(chr(i))[0] == "C"]
    for c in [chr(i) for i in range(128)] + ["\u00a0", "\u2028", "\u3000", "\u00e9"] + other[::97]:
        problem = name_problem(f"a//b{c}")
        if unicodedata.category(c)[0] == "C":
            assert problem is not None and problem.startswith("name may contain only"), repr(c)
        else:
            assert problem == "name may not start or end with '/' or contain '//'", repr(c)


@pytest.mark.parametrize(
    "name", ["postgres_default", "my-conn.v2", "a:b@c", "Ünïcode_ok", "x" * 250, "team/db", "a/b.c/d", "..a/b.."]
)
def test_airflow_ids_are_accepted(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("team/db", "team/db"),
        ("my%20id", None),  # a space
        ("a%2Fb", None),
        ("a%2fb", None),
        ("a%5Cb", None),
        ("a%5cb", None),
        ("%2e%2e/x", None),
        ("x/%2E", None),
        ("a%252Fb", None),  # decoded once: '%2F' stays text, and '%' is refused
        ("%c0%ae", None),  # not UTF-8
        ("caf%C3%A9", "café"),
        ("a%3Ab", "a:b"),
    ],
)
def test_request_paths_decode_per_segment(raw: str, name: str | None) -> None:
    decoded, problem = decode_name(raw)
    assert decoded == name
    assert (problem is None) == (name is not None)


@pytest.mark.parametrize(
    ("team", "ok"),
    [
        ("team_1", True),
        ("a-b", True),
        ("ab", False),
        ("a/b", False),
        ("a" * 51, False),
        ("t--x", True),
        ("", False),
        ("tëam", False),
    ],
)
def test_team_names_follow_airflow(team: str, ok: bool) -> None:
    assert (team_problem(team) is None) is ok


class Listed(Scripted):
    """A backend with several candidate paths per id, answering from ``store`` (path -> value)."""

    def __init__(self, name: str, store: dict[str, Any], ctx: BackendContext) -> None:
        super().__init__(name, [], ctx)
        self.store = store
        self.asked: list[str] = []

    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        return [f"{team}/{name}", name] if team else [name]

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        self.asked.append(path)
        answer = self.store.get(path)
        if answer is None:
            raise SecretNotFound(path)
        if isinstance(answer, BaseException):
            raise answer
        return SecretValue(answer)


async def test_candidates_are_tried_in_order_and_the_first_found_wins(ctx: BackendContext) -> None:
    one = Listed("one", {"k": "global", "t1/k": "team"}, ctx)
    two = Listed("two", {"k": "lower"}, ctx)
    resolver = Resolver([guard(one, ctx), guard(two, ctx)], 300, 3600, 30)
    assert (await resolver.resolve(Kind.VARIABLE, "k", "t1")).value == "team"
    assert (await resolver.resolve(Kind.VARIABLE, "k", "t2")).value == "global"
    assert one.asked == ["t1/k", "t2/k", "k"] and two.asked == []


async def test_an_error_on_a_candidate_stops_the_walk(ctx: BackendContext) -> None:
    one = Listed("one", {"t1/k": BackendUnavailable("down"), "k": "global"}, ctx)
    with pytest.raises(BackendUnavailable):
        await Resolver([guard(one, ctx)], 300, 3600, 30).resolve(Kind.VARIABLE, "k", "t1")
    assert "k" not in one.asked  # never the global value in place of a team's failing store


class Held(Listed):
    """``Listed`` whose reads each wait until the test lets them answer."""

    def __init__(self, name: str, store: dict[str, Any], ctx: BackendContext) -> None:
        super().__init__(name, store, ctx)
        self.answer = asyncio.Event()

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        await self.answer.wait()
        self.answer.clear()
        return await super().fetch(kind, path)


async def test_idle_waits_for_a_call_begun_as_the_previous_one_ended(ctx: BackendContext) -> None:
    """A walk over candidates starts its next read on the same step the last one ended: a backend waiting to be
    closed must not take that moment as idle."""
    one = Held("one", {"k": "global"}, ctx)
    guarded = guard(one, ctx)
    read = asyncio.create_task(Resolver([guarded], 300, 3600, 30).resolve(Kind.VARIABLE, "k", "t1"))
    await asyncio.sleep(0)
    idle = asyncio.create_task(guarded.idle())
    one.answer.set()  # t1/k: not found, then k is asked at once
    for _ in range(10):
        await asyncio.sleep(0)
    assert one.asked == ["t1/k"] and not idle.done()
    one.answer.set()
    assert (await read).value == "global"
    await idle


class Leased(Scripted):
    """Answers with a lease on every read, as a dynamic secret does."""

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        self.calls += 1
        answer = self.answers[min(self.calls - 1, len(self.answers) - 1)]
        lease = Lease(f"database/creds/r/{self.calls}", 60, True, 0.0)
        if isinstance(answer, BrokerError):
            answer.lease = lease
            raise answer
        return SecretValue(answer, lease=lease)


@pytest.mark.parametrize(
    "answer",
    [BackendError("the secret has no key 'username' for the connection template"), "not a connection uri"],
    ids=["template", "not-a-connection"],
)
async def test_a_leased_answer_that_cannot_be_served_names_its_lease_and_holder(
    ctx: BackendContext, answer: Any
) -> None:
    """The cache can give back what the store granted only if the error says which lease, held by whom."""
    b = Leased("vault", [answer], ctx)
    g = guard(b, ctx)
    with pytest.raises(BackendError) as raised:
        await Resolver([g], 300, 3600).resolve(Kind.CONNECTION, "pg")
    assert raised.value.lease is not None and raised.value.lease.lease_id == "database/creds/r/1"
    assert raised.value.lease_holder is g


async def test_an_error_without_a_lease_names_no_holder(ctx: BackendContext) -> None:
    b = Scripted("b", [BackendError("bad payload")], ctx)
    with pytest.raises(BackendError) as raised:
        await Resolver([guard(b, ctx)], 300, 3600).resolve(Kind.VARIABLE, "k")
    assert raised.value.lease is None and raised.value.lease_holder is None
