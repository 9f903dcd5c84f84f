"""The per-store token bucket: bound, burst, priority of refreshes over cold misses, bounded waits; and the
guard that applies it to every kind of call."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker.backends.base import BackendContext, Kind, Lease, Overloaded, RateLimitConfig, SecretValue
from broker.clock import FakeClock
from broker.metrics import Metrics
from broker.ratelimit import PRIORITY, Priority, SharedBuckets, TokenBucket, priority
from tests.unit.test_guard_resolver import Scripted, guard


class Tick:
    """A bucket clock moved by hand (the bucket's timers still run on the loop)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_burst_is_served_at_once_then_the_rate() -> None:
    tick = Tick()
    bucket = TokenBucket(10, 3, miss_wait=0, refresh_wait=0, now=tick)
    for _ in range(3):
        assert await bucket.acquire(Priority.MISS) == 0.0
    with pytest.raises(Overloaded) as refused:
        await bucket.acquire(Priority.MISS)
    assert refused.value.status == 429 and refused.value.code == "overloaded"
    tick.t = 0.1  # one token back
    assert await bucket.acquire(Priority.MISS) == 0.0
    with pytest.raises(Overloaded):
        await bucket.acquire(Priority.REFRESH)
    tick.t = 10.0  # a long quiet spell saves up to the burst, not more
    for _ in range(3):
        await bucket.acquire(Priority.MISS)
    with pytest.raises(Overloaded):
        await bucket.acquire(Priority.MISS)


async def test_refreshes_are_served_before_cold_misses_that_queued_first() -> None:
    bucket = TokenBucket(200, 1, miss_wait=5, refresh_wait=5)
    await bucket.acquire(Priority.MISS)  # the bucket is empty now
    order: list[str] = []

    async def take(prio: Priority, label: str) -> None:
        await bucket.acquire(prio)
        order.append(label)

    misses = [asyncio.create_task(take(Priority.MISS, f"miss{i}")) for i in range(3)]
    await asyncio.sleep(0)
    refreshes = [asyncio.create_task(take(Priority.REFRESH, f"refresh{i}")) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*misses, *refreshes), 5)
    assert order == ["refresh0", "refresh1", "miss0", "miss1", "miss2"]


async def test_a_miss_that_would_wait_past_its_bound_is_refused_at_once() -> None:
    tick = Tick()
    bucket = TokenBucket(10, 1, miss_wait=0.25, refresh_wait=5, now=tick)
    await bucket.acquire(Priority.MISS)
    # 0.1 s per token: two misses fit in 0.25 s, the third would wait 0.3 s
    waiting = [asyncio.create_task(bucket.acquire(Priority.MISS)) for _ in range(2)]
    await asyncio.sleep(0)
    assert bucket.waiting(Priority.MISS) == 2
    with pytest.raises(Overloaded):
        await bucket.acquire(Priority.MISS)
    # a refresh may still queue (its bound is longer), and goes first
    refresh = asyncio.create_task(bucket.acquire(Priority.REFRESH))
    await asyncio.sleep(0)
    assert bucket.waiting(Priority.REFRESH) == 1
    for task in (*waiting, refresh):
        task.cancel()
    await asyncio.gather(*waiting, refresh, return_exceptions=True)
    assert bucket.waiting() == 0


async def test_a_queued_miss_pushed_past_its_deadline_by_refreshes_is_refused() -> None:
    tick = Tick()  # never moves: no token comes back while the test runs
    bucket = TokenBucket(10, 1, miss_wait=0.05, refresh_wait=5, now=tick)
    await bucket.acquire(Priority.MISS)
    tick.t = 0.05  # half a token
    miss = asyncio.create_task(bucket.acquire(Priority.MISS))
    await asyncio.sleep(0)
    assert bucket.waiting(Priority.MISS) == 1
    with pytest.raises(Overloaded):
        await asyncio.wait_for(miss, 5)


async def test_a_cancelled_waiter_gives_its_place_up() -> None:
    tick = Tick()
    bucket = TokenBucket(10, 1, miss_wait=5, refresh_wait=5, now=tick)
    await bucket.acquire(Priority.MISS)
    first = asyncio.create_task(bucket.acquire(Priority.MISS))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    tick.t = 0.1
    assert await asyncio.wait_for(bucket.acquire(Priority.MISS), 5) == 0.0


async def test_sources_take_turns_so_a_busy_one_cannot_starve_another() -> None:
    bucket = TokenBucket(200, 1, miss_wait=5, refresh_wait=5)
    busy, quiet = object(), object()
    await bucket.acquire(Priority.MISS, busy)  # the bucket is empty now
    order: list[str] = []

    async def take(source: object, label: str) -> None:
        await bucket.acquire(Priority.MISS, source)
        order.append(label)

    tasks = [asyncio.create_task(take(busy, f"busy{i}")) for i in range(4)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(take(quiet, f"quiet{i}")) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    # each source's calls in their own order, the sources in turn, one token each
    assert order == ["busy0", "quiet0", "busy1", "quiet1", "busy2", "busy3"]


async def test_a_busy_source_is_refused_before_a_quiet_one_is() -> None:
    tick = Tick()  # never moves
    bucket = TokenBucket(10, 1, miss_wait=0.25, refresh_wait=5, now=tick)
    busy, quiet = object(), object()
    await bucket.acquire(Priority.MISS, busy)
    # 0.1 s per token: two of busy's misses fit in 0.25 s, its third would wait 0.3 s
    waiting = [asyncio.create_task(bucket.acquire(Priority.MISS, busy)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await bucket.acquire(Priority.MISS, busy)
    # quiet's first miss takes the turn after busy's first: 0.2 s, within the bound (first come first
    # served would put it behind both of busy's, at 0.3 s, and refuse it)
    waiting.append(asyncio.create_task(bucket.acquire(Priority.MISS, quiet)))
    await asyncio.sleep(0)
    assert bucket.waiting(Priority.MISS) == 3
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert bucket.waiting() == 0


def test_shared_buckets_one_per_backend_name_and_limit() -> None:
    shared = SharedBuckets()
    limit = RateLimitConfig(per_second=20, burst=40)
    ssm = shared.bucket("ssm", limit, 5)
    assert shared.bucket("ssm", RateLimitConfig(per_second=20, burst=40, max_wait=2), 30) is ssm
    assert shared.bucket("other", limit, 5) is not ssm  # another store
    assert shared.bucket("ssm", RateLimitConfig(per_second=5, burst=40), 5) is not ssm  # another quota


async def test_priority_is_carried_into_tasks_started_inside_the_block() -> None:
    seen: list[Priority] = []

    async def probe() -> None:
        seen.append(PRIORITY.get())

    with priority(Priority.MISS):
        task = asyncio.get_running_loop().create_task(probe())
    await task
    await probe()
    assert seen == [Priority.MISS, Priority.REFRESH]


class Leased(Scripted):
    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        self.calls += 1
        return lease

    async def revoke(self, lease: Lease) -> None:
        self.calls += 1


@pytest.fixture
def ctx() -> Any:
    pool = ThreadPoolExecutor(1)
    yield BackendContext(executor=pool, clock=FakeClock(), metrics=Metrics())
    pool.shutdown()


async def test_every_kind_of_call_to_a_store_shares_one_bucket(ctx: BackendContext) -> None:
    backend = Leased("limited", ["v"], ctx, rate_limit={"per_second": 0.001, "burst": 3, "max_wait": 0})
    g = guard(backend, ctx)
    lease = Lease("database/creds/x/1", 60, True, 0.0)
    with priority(Priority.MISS):
        assert (await g.fetch(Kind.VARIABLE, "p")).value == "v"
        await g.renew(lease)  # a renewal started from a miss's task still goes at refresh priority
    await g.revoke(lease)
    with priority(Priority.MISS), pytest.raises(Overloaded):
        await g.fetch(Kind.VARIABLE, "p")
    with priority(Priority.MISS), pytest.raises(Overloaded):
        await g.renew(lease)
    assert (
        ctx.metrics.registry.get_sample_value(
            "broker_rate_limited_total", {"backend": "limited", "priority": "refresh", "outcome": "refused"}
        )
        == 1
    )
    assert backend.calls == 3  # the refused call never reached the store
    metrics = ctx.metrics.registry
    assert (
        metrics.get_sample_value(
            "broker_rate_limited_total", {"backend": "limited", "priority": "miss", "outcome": "refused"}
        )
        == 1
    )
    assert (
        metrics.get_sample_value(
            "broker_backend_calls_total", {"backend": "limited", "operation": "fetch", "outcome": "overloaded"}
        )
        == 1
    )
    # refused is not a store failure: the circuit stays closed
    assert not g.breaker.is_open and g.breaker.failures == 0


async def test_refused_calls_do_not_count_as_retries_of_the_store(ctx: BackendContext) -> None:
    from broker.backends.base import BackendUnavailable

    backend = Scripted("b", [BackendUnavailable("down"), "ok"], ctx, rate_limit={"per_second": 0.001, "burst": 1})
    with priority(Priority.MISS), pytest.raises(Overloaded):
        await guard(backend, ctx).fetch(Kind.VARIABLE, "p")
    assert backend.calls == 1  # the retry needed a second token; there was none


async def test_a_waited_call_is_counted(ctx: BackendContext) -> None:
    backend = Scripted("w", ["v"], ctx, rate_limit={"per_second": 50, "burst": 1, "max_wait": 2})
    g = guard(backend, ctx)
    await g.fetch(Kind.VARIABLE, "p")
    assert isinstance(await g.fetch(Kind.VARIABLE, "p"), SecretValue)
    assert (
        ctx.metrics.registry.get_sample_value(
            "broker_rate_limited_total", {"backend": "w", "priority": "refresh", "outcome": "waited"}
        )
        == 1
    )


def test_store_types_with_quotas_have_defaults_and_null_turns_them_off() -> None:
    from broker.backends import load_type

    defaults = {}
    for type_name in ("aws_ssm", "aws_secrets_manager", "gcp_secret_manager", "azure_key_vault", "vault", "file"):
        field = load_type(type_name).config_model.model_fields["rate_limit"]
        defaults[type_name] = field.default
    assert defaults["aws_ssm"] == RateLimitConfig(per_second=20, burst=40)
    assert defaults["vault"] is None and defaults["file"] is None
    assert all(defaults[t] is not None for t in ("aws_secrets_manager", "gcp_secret_manager", "azure_key_vault"))
    ssm = load_type("aws_ssm").config_model.model_validate({"name": "s", "type": "aws_ssm", "rate_limit": None})
    assert ssm.rate_limit is None
