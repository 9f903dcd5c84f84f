"""The one backoff rule for every loop that waits after a failure: exponential, capped, full jitter.

Attempt ``n`` (0 for the first retry) waits a uniform draw from ``[0, min(cap, base * 2**n)]`` (full
jitter, so a fleet of brokers that failed together does not retry together), never less than ``floor``
(so a loop cannot spin) and never less than a store's ``Retry-After``. The random source and the sleep are
injected, so tests drive a loop without waiting and with known draws.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

Sleep = Callable[[float], Awaitable[None]]


class Backoff:
    """Delays for successive failures of one kind of call."""

    __slots__ = ("base", "cap", "floor", "rng", "sleep")

    def __init__(
        self,
        base: float,
        cap: float,
        *,
        floor: float = 0.0,
        rng: random.Random | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        if not 0 <= floor <= cap or base <= 0:
            raise ValueError("backoff needs 0 < base and 0 <= floor <= cap")
        self.base = base
        self.cap = cap
        self.floor = floor
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.sleep: Sleep = sleep or asyncio.sleep

    def ceiling(self, attempt: int) -> float:
        """The longest wait for ``attempt``: ``base * 2**attempt``, capped (the un-jittered schedule)."""
        # 2**attempt overflows a float past ~1024 failures; the cap is reached long before that.
        return self.cap if attempt >= 64 else min(self.cap, self.base * 2.0**attempt)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt`` (0-based); a store's ``retry_after`` is a floor."""
        drawn = self.rng.uniform(0.0, self.ceiling(max(0, attempt)))
        return max(self.floor, drawn, retry_after or 0.0)

    async def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Sleep for ``delay(attempt, retry_after)`` and return how long that was."""
        seconds = self.delay(attempt, retry_after)
        await self.sleep(seconds)
        return seconds
