"""Retries, circuit breaking, chain order, and that failures are never turned into "not found"."""

from __future__ import annotations

import random
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
    Kind,
    RateLimited,
    SecretNotFound,
    SecretValue,
)
from broker.backends.guard import CircuitBreaker, CircuitOpen, Guard
from broker.clock import FakeClock
from broker.metrics import Metrics
from broker.resolver import NotFoundAnywhere, Resolver, name_problem


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


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "../x", "a\\b", "a\x00b", "a\nb", "a b", "%2e%2e", "x" * 251, "a?b", "a#b", "\u202e"]
)
def test_hostile_names_are_refused(name: str) -> None:
    assert name_problem(name) is not None


@pytest.mark.parametrize("name", ["postgres_default", "my-conn.v2", "a:b@c", "Ünïcode_ok", "x" * 250])
def test_airflow_ids_are_accepted(name: str) -> None:
    assert name_problem(name) is None
