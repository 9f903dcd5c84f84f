"""Per-store request-rate limits: one token bucket per backend, shared by every kind of call to it (in node
mode by every identity partition's backend of that name too: ``SharedBuckets``).

Two priorities take turns at the bucket: ``REFRESH`` (keeping entries that are in use fresh, lease renewals
and revocations, logins) is always served before ``MISS`` (a cold lookup nobody is served from yet). A
call that finds no token waits in its priority's queue; a cold miss that would wait longer than its bound
is refused at once with ``Overloaded`` (429), and one whose turn has not come by its deadline is refused
then. Refusal is never "not found".

Within a priority the waiters of each source (in node mode, each partition's guard) queue first come first
served, and the sources take turns, one token each: a source with many calls waiting does not push another
source's call back by more than one turn per source waiting, so one busy identity cannot starve the others.
With one source (sidecar mode) the queue is simply first come first served.

Which priority a call has is carried in a context variable set by the cache where it starts a load
(``priority``), so the backends, the resolver and the guard need no extra argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from broker.backends.base import Overloaded, RateLimitConfig


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
        # Per priority: each source's waiters in arrival order, the sources in the order of their next turn.
        self._queues: dict[Priority, dict[Hashable, deque[_Waiter]]] = {p: {} for p in Priority}
        self._wakeup: asyncio.TimerHandle | None = None

    def _clock(self) -> float:
        return self._now() if self._now is not None else asyncio.get_running_loop().time()

    def _refill(self, now: float) -> None:
        if self._updated is not None and now > self._updated:
            self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        if self._updated is None or now > self._updated:
            self._updated = now

    @staticmethod
    def _live(queue: deque[_Waiter] | None) -> int:
        return 0 if queue is None else sum(1 for w in queue if not w.future.done())

    def waiting(self, prio: Priority | None = None) -> int:
        if prio is not None:
            return sum(self._live(queue) for queue in self._queues[prio].values())
        return sum(self.waiting(p) for p in Priority)

    def _ahead_of(self, prio: Priority, source: Hashable) -> int:
        """Waiters that will be served before a new one of ``prio`` from ``source``: every refresh ahead of a
        miss; of its own priority, the source's own waiters and, from each other source, as many as take a
        turn before it (at most one more than the source's own)."""
        ahead = self.waiting(Priority.REFRESH) if prio is Priority.MISS else 0
        queues = self._queues[prio]
        own = self._live(queues.get(source))
        ahead += own + sum(min(self._live(q), own + 1) for s, q in queues.items() if s != source)
        return ahead

    async def acquire(self, prio: Priority, source: Hashable = None, bound: float | None = None) -> float:
        """Take a token for ``source``, waiting for one within ``bound`` (this priority's bound unless given).
        Returns the seconds waited.

        Raises Overloaded when the wait would exceed the bound, or the bound passed before the turn came.
        """
        now = self._clock()
        self._refill(now)
        ahead = self._ahead_of(prio, source)
        if ahead == 0 and self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        expected = (ahead + 1 - self.tokens) / self.rate
        if bound is None:
            bound = self.waits[prio]
        if expected > bound:
            raise Overloaded(f"the store's request-rate limit is reached ({self.rate:g}/s); retry shortly")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), now + bound)
        waiter.timer = loop.call_later(bound, self._expire, waiter)
        self._queues[prio].setdefault(source, deque()).append(waiter)
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
        """Hand out the tokens that have come in: every REFRESH waiter before any MISS waiter; within a
        priority one token per source in turn."""
        self._wakeup = None
        self._refill(self._clock())
        for prio in Priority:
            queues = self._queues[prio]
            while queues and self.tokens >= 1:
                source = next(iter(queues))
                queue = _trimmed(queues.pop(source))
                if not queue:
                    continue  # only expired or cancelled waiters were left
                self.tokens -= 1
                queue.popleft().future.set_result(None)
                if _trimmed(queue):
                    queues[source] = queue  # to the back: the next source's turn
            for source in [s for s, q in queues.items() if not _trimmed(q)]:
                del queues[source]
        if any(self._queues[p] for p in Priority):
            self._arm()


def _trimmed(queue: deque[_Waiter]) -> deque[_Waiter]:
    """``queue`` without the expired or cancelled waiters at its head."""
    while queue and queue[0].future.done():
        queue.popleft()
    return queue


class SharedBuckets:
    """Node mode: the node's token buckets, one per backend name and limit, shared by every identity
    partition's guard of that backend, so the store sees at most the configured rate from the whole node.

    Identities whose overrides set a different ``rate_limit`` for a backend share the bucket of that limit
    (for a store reached under another quota, such as an AWS role in another account). Each guard passes
    its own wait bounds to ``acquire``, since an override may change the backend's ``timeout``.
    """

    def __init__(self, now: Callable[[], float] | None = None) -> None:
        self._now = now
        self._buckets: dict[tuple[str, float, int], TokenBucket] = {}

    def bucket(self, name: str, limit: RateLimitConfig, refresh_wait: float) -> TokenBucket:
        key = (name, limit.per_second, limit.burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(
                limit.per_second, limit.burst, miss_wait=limit.max_wait, refresh_wait=refresh_wait, now=self._now
            )
        return bucket
