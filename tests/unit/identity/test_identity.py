"""The shared token source: one acquisition for concurrent callers, one replacement for a refused token,
refresh failures keep the old token while it is usable, and no token value in repr or logs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from broker.backends.base import BackendContext, BackendUnavailable
from broker.clock import FakeClock
from broker.identity import TokenSource
from broker.metrics import Metrics


class ScriptedSource(TokenSource):
    """Hands out ``tok-1``, ``tok-2``, ... (or raises what ``failures`` holds); counts discards."""

    kind = "scripted"

    def __init__(self, ctx: BackendContext, lifetime: float = 600.0) -> None:
        super().__init__("store", ctx)
        self.lifetime = lifetime
        self.failures: list[Exception] = []
        self.discards = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def _acquire(self) -> tuple[str, float]:
        self.entered.set()
        await self.release.wait()
        if self.failures:
            raise self.failures.pop(0)
        return f"tok-{self.acquisitions + 1}", self.lifetime

    async def _discard(self) -> None:
        self.discards += 1

    def describe(self) -> str:
        return "scripted"


@pytest.fixture
def ctx() -> Iterator[BackendContext]:
    pool = ThreadPoolExecutor(1)
    yield BackendContext(executor=pool, clock=FakeClock(), metrics=Metrics())
    pool.shutdown()


async def test_concurrent_callers_share_one_acquisition(ctx: BackendContext) -> None:
    source = ScriptedSource(ctx)
    source.release.clear()
    callers = [asyncio.create_task(source.token()) for _ in range(50)]
    await source.entered.wait()
    source.release.set()
    assert set(await asyncio.gather(*callers)) == {"tok-1"}
    assert source.acquisitions == 1 and source.discards == 0


async def test_a_refused_token_is_replaced_once_for_all_who_saw_it_refused(ctx: BackendContext) -> None:
    source = ScriptedSource(ctx)
    first = await source.token()
    source.entered.clear()
    source.release.clear()
    refusals = [asyncio.create_task(source.token(refused=first)) for _ in range(20)]
    await source.entered.wait()
    source.release.set()
    assert set(await asyncio.gather(*refusals)) == {"tok-2"}
    assert (source.acquisitions, source.discards) == (2, 1)
    # a caller that reports the old token after the replacement gets the new one, with no new acquisition
    assert await source.token(refused=first) == "tok-2"
    assert (source.acquisitions, source.discards) == (2, 1)


async def test_a_failed_refresh_keeps_the_old_token_while_it_is_usable(ctx: BackendContext) -> None:
    clock = ctx.clock
    assert isinstance(clock, FakeClock)
    source = ScriptedSource(ctx, lifetime=60.0)
    assert await source.token() == "tok-1"
    source.failures.append(BackendUnavailable("token endpoint down"))
    with pytest.raises(BackendUnavailable):
        async with source._lock:
            await source._refresh()
    assert await source.token() == "tok-1" and source.not_ready_reason() is None
    clock.advance(59.0)  # inside the last quarter of its life: no longer handed out
    source.failures.append(BackendUnavailable("token endpoint down"))
    with pytest.raises(BackendUnavailable):
        await source.token()
    assert source.not_ready_reason() == "no valid scripted token (backend_unavailable)"
    assert await source.token() == "tok-2"


async def test_token_values_never_reach_repr_or_logs(ctx: BackendContext, caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource(ctx)
    with caplog.at_level(logging.DEBUG):
        value = await source.token()
    assert value not in repr(source._token)
    assert all(value not in record.getMessage() and value not in str(record.__dict__) for record in caplog.records)
