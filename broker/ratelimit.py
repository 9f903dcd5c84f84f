"""Per-store request-rate limits: one token bucket per backend, shared by every kind of call to it.

Two priorities take turns at the bucket: ``REFRESH`` (keeping entries that are in use fresh, lease renewals
and revocations, logins) is always served before ``MISS`` (a cold lookup nobody is served from yet). A
call that finds no token waits in its priority's queue, first come first served; a cold miss that would
wait longer than its bound is refused at once with ``Overloaded`` (429), and one whose turn has not come by
its deadline is refused then. Refusal is never "not found".

Which priority a call has is carried in a context variable set by the cache where it starts a load
(``priority``), so the backends, the resolver and the guard need no extra argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from broker.backends.base import Overloaded


class Priority(enum.IntEnum):
    REFRESH = 0
    MISS = 1


PRIORITY: ContextVar[Priority] = ContextVar("broker_call_priority", default=Priority.REFRESH)


@contextlib.contextmanager
def priority(value: Priority) -> Iterator[None]:
    """Calls started (and tasks created) inside this block carry ``value``."""
    token = PRIORITY.set(value)
    try:
        yield
    finally:
        PRIORITY.reset(token)


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    deadline: float
    timer: asyncio.TimerHandle | None = field(default=None)


class TokenBucket:
    """``per_second`` tokens a second, at most ``burst`` saved up. ``acquire`` takes one token.

    ``now`` is the event loop's clock unless given (tests pass their own to drive refills).
    """

    def __init__(
        self,
        per_second: float,
        burst: int,
        *,
        miss_wait: float,
        refresh_wait: float,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.rate = per_second
        self.burst = float(burst)
        self.waits = {Priority.REFRESH: refresh_wait, Priority.MISS: miss_wait}
        self._now = now
        self.tokens = float(burst)
        self._updated: float | None = None
        self._queues: dict[Priority, deque[_Waiter]] = {Priority.REFRESH: deque(), Priority.MISS: deque()}
        self._wakeup: asyncio.TimerHandle | None = None

    def _clock(self) -> float:
        return self._now() if self._now is not None else asyncio.get_running_loop().time()

    def _refill(self, now: float) -> None:
        if self._updated is not None and now > self._updated:
            self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        if self._updated is None or now > self._updated:
            self._updated = now

    def waiting(self, prio: Priority | None = None) -> int:
        if prio is not None:
            return sum(1 for w in self._queues[prio] if not w.future.done())
        return sum(self.waiting(p) for p in Priority)

    def _ahead_of(self, prio: Priority) -> int:
        """Waiters that will be served before a new one of ``prio``."""
        ahead = self.waiting(Priority.REFRESH)
        if prio is Priority.MISS:
            ahead += self.waiting(Priority.MISS)
        return ahead

    async def acquire(self, prio: Priority) -> float:
        """Take a token, waiting for one within this priority's bound. Returns the seconds waited.

        Raises Overloaded when the wait would exceed the bound, or the bound passed before the turn came.
        """
        now = self._clock()
        self._refill(now)
        ahead = self._ahead_of(prio)
        if ahead == 0 and self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        expected = (ahead + 1 - self.tokens) / self.rate
        bound = self.waits[prio]
        if expected > bound:
            raise Overloaded(f"the store's request-rate limit is reached ({self.rate:g}/s); retry shortly")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), now + bound)
        waiter.timer = loop.call_later(bound, self._expire, waiter)
        self._queues[prio].append(waiter)
        self._arm()
        try:
            await waiter.future
        finally:
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.cancel()  # our caller was cancelled: give the place up
        return max(0.0, self._clock() - now)

    def _expire(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if not waiter.future.done():
            waiter.future.set_exception(
                Overloaded(f"the store's request-rate limit is reached ({self.rate:g}/s); retry shortly")
            )

    def _arm(self) -> None:
        if self._wakeup is not None:
            return
        needed = max(0.0, 1 - self.tokens) / self.rate
        self._wakeup = asyncio.get_running_loop().call_later(needed, self._dispatch)

    def _dispatch(self) -> None:
        """Hand out the tokens that have come in: every REFRESH waiter before any MISS waiter."""
        self._wakeup = None
        self._refill(self._clock())
        for prio in Priority:
            queue = self._queues[prio]
            while queue and self.tokens >= 1:
                waiter = queue.popleft()
                if waiter.future.done():
                    continue  # expired or cancelled
                self.tokens -= 1
                waiter.future.set_result(None)
            while queue and queue[0].future.done():
                queue.popleft()
        if any(self._queues[p] for p in Priority):
            self._arm()
