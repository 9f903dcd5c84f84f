"""The one place that owns timeouts, retries with jittered backoff, the circuit breaker and call metrics.

Backends make one attempt per call; ``Guard`` wraps every call the core makes to them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker.backends.base import (
    AccessDenied,
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BrokerError,
    Kind,
    Lease,
    Overloaded,
    RateLimited,
    SecretNotFound,
    SecretValue,
    is_transient,
)
from broker.backoff import Backoff
from broker.metrics import Metrics
from broker.ratelimit import PRIORITY, Priority, TokenBucket

log = logging.getLogger("broker.backend")
T = TypeVar("T")

BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0


def outcome_of(exc: BaseException | None) -> str:
    """A bounded metric label for the result of one call."""
    if exc is None:
        return "ok"
    for cls, label in (
        (SecretNotFound, "not_found"),
        (AccessDenied, "denied"),
        (RateLimited, "throttled"),
        (BackendTimeout, "timeout"),
        (CircuitOpen, "circuit_open"),
        (BackendUnavailable, "unavailable"),
    ):
        if isinstance(exc, cls):
            return label
    return "error"


class CircuitOpen(BackendUnavailable):
    """Calls to a backend that keeps failing are refused locally until its cool-down ends."""


class CircuitBreaker:
    """Opens after ``threshold`` consecutive transient failures; after ``cooldown`` lets one probe through.

    A probe that fails doubles the cool-down (up to ``max_cooldown``: the backoff schedule's ceiling, not
    jittered, so the probe time is known); one that succeeds closes the circuit.
    """

    def __init__(self, threshold: int = 5, cooldown: float = 5.0, max_cooldown: float = 60.0) -> None:
        self.threshold = threshold
        self.schedule = Backoff(cooldown, max(cooldown, max_cooldown))
        self.failures = 0
        self.reopened = 0  # failed probes since the circuit last closed
        self.cooldown = cooldown
        self.open_until: float | None = None
        self.probing = False

    def allow(self, now: float) -> bool:
        if self.open_until is None:
            return True
        if now >= self.open_until and not self.probing:
            self.probing = True
            return True
        return False

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def success(self) -> None:
        self.failures = 0
        self.open_until = None
        self.probing = False
        self.reopened = 0
        self.cooldown = self.schedule.ceiling(0)

    def failure(self, now: float) -> bool:
        """Record a transient failure; True when this failure opened (or re-opened) the circuit."""
        self.failures += 1
        if self.probing:
            self.probing = False
            self.reopened += 1
            self.cooldown = self.schedule.ceiling(self.reopened)
            self.open_until = now + self.cooldown
            return True
        if self.open_until is None and self.failures >= self.threshold:
            self.open_until = now + self.cooldown
            return True
        return False


class Guard:
    """Wraps a Backend: every call timed out, retried within a budget, counted, and circuit-broken."""

    def __init__(self, backend: Backend, metrics: Metrics, *, rng: random.Random | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.name = backend.name
        circuit = getattr(backend.config, "circuit_breaker", None)
        self.breaker = (
            CircuitBreaker(circuit.threshold, circuit.cooldown, max(circuit.cooldown, circuit.max_cooldown))
            if circuit is not None
            else CircuitBreaker()
        )
        self.backoff = Backoff(BACKOFF_BASE, BACKOFF_CAP, rng=rng)  # between attempts of one call
        self.started = False
        self._active = 0  # calls under way (a reload must not close the backend under them)
        self._idle = asyncio.Event()
        self._idle.set()
        self.bucket: TokenBucket | None = None
        self._waits: dict[Priority, float] = {}
        limit = backend.config.rate_limit
        if limit is not None:
            # Refreshes of entries in use may wait as long as one call to the store may take.
            refresh_wait = max(limit.max_wait, backend.config.timeout)
            self._waits = {Priority.REFRESH: refresh_wait, Priority.MISS: limit.max_wait}
            shared = backend.ctx.rate_limits
            self.bucket = (
                shared.bucket(self.name, limit, refresh_wait)
                if shared is not None
                else TokenBucket(limit.per_second, limit.burst, miss_wait=limit.max_wait, refresh_wait=refresh_wait)
            )

    @property
    def config(self) -> object:
        return self.backend.config

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        """Read ``path`` with retries. Raises the backend's errors, or CircuitOpen."""
        return await self._call("fetch", lambda: self.backend.fetch(kind, path), path)

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        return await self._call("renew", lambda: self.backend.renew(lease, increment), "lease")

    async def revoke(self, lease: Lease) -> None:
        await self._call("revoke", lambda: self.backend.revoke(lease), "lease", retries=1)

    async def start(self) -> None:
        await self._call("login", self.backend.start, "start", use_breaker=False)
        self.started = True

    async def check(self) -> str:
        return await self._call("check", self.backend.check, "check", retries=0, use_breaker=False)

    async def idle(self) -> None:
        """Return once no call is under way (each is bounded by the backend's timeout and retries)."""
        while self._active:  # a call may begin before this waiter wakes: the event is set no longer
            await self._idle.wait()

    async def aclose(self) -> None:
        """Close the backend's sessions and tasks, and withdraw its gauges (node mode: another partition's
        backend of the same name keeps its own). Raises what the backend's close raises."""
        try:
            await self.backend.aclose()
        finally:
            self.metrics.backend_up.withdraw(self, self.name)
            self.metrics.circuit_open.withdraw(self, self.name)

    def not_ready_reason(self) -> str | None:
        # An open circuit does not make the pod unready: cached values are still served, and failing
        # readiness would take Airflow's own containers out of service during a store outage.
        if not self.started:
            return "not started"
        return self.backend.not_ready_reason()

    async def _call(
        self,
        operation: str,
        attempt_fn: Callable[[], Awaitable[T]],
        what: str,
        *,
        retries: int | None = None,
        use_breaker: bool = True,
    ) -> T:
        self._active += 1
        self._idle.clear()
        try:
            return await self._attempts(operation, attempt_fn, what, retries=retries, use_breaker=use_breaker)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _attempts(
        self,
        operation: str,
        attempt_fn: Callable[[], Awaitable[T]],
        what: str,
        *,
        retries: int | None,
        use_breaker: bool,
    ) -> T:
        cfg = self.backend.config
        attempts = (cfg.retries if retries is None else retries) + 1
        clock = self.backend.ctx.clock
        deadline = clock.now() + cfg.timeout * attempts
        last: BrokerError | None = None
        for attempt in range(attempts):
            if use_breaker and not self.breaker.allow(clock.now()):
                self.metrics.backend_calls.labels(self.name, operation, "circuit_open").inc()
                raise CircuitOpen(f"backend {self.name!r} is failing; calls paused for a cool-down") from last
            await self._admit(operation)
            try:
                result = await self._one(operation, attempt_fn, what)
            except BrokerError as exc:
                last = exc
                if not exc.transient:
                    if use_breaker:
                        self.breaker.success()  # the store answered; it is up
                    raise
                if use_breaker and self.breaker.failure(clock.now()):
                    self.metrics.circuit_open.set(self, self.name, 1)
                    log.warning("circuit opened", extra={"backend": self.name, "cooldown": self.breaker.cooldown})
                delay = self.backoff.delay(attempt, exc.retry_after)
                if attempt + 1 >= attempts or clock.now() + delay >= deadline:
                    raise
                await self.backoff.sleep(delay)
                continue
            if use_breaker:
                if self.breaker.is_open:
                    log.info("circuit closed", extra={"backend": self.name})
                self.breaker.success()
                self.metrics.circuit_open.set(self, self.name, 0)
            return result
        assert last is not None
        raise last

    async def _admit(self, operation: str) -> None:
        """Wait for the store's rate limit (every attempt is one call to the store). Raises Overloaded."""
        bucket = self.bucket
        if bucket is None:
            return
        # Only a read can be a cold miss; renewals, revocations, logins and checks keep what is in use going.
        prio = PRIORITY.get() if operation == "fetch" else Priority.REFRESH
        label = prio.name.lower()
        try:
            waited = await bucket.acquire(prio, self, self._waits[prio])
        except Overloaded:
            self.metrics.rate_limited.labels(self.name, label, "refused").inc()
            self.metrics.backend_calls.labels(self.name, operation, "overloaded").inc()
            raise
        if waited > 0:
            self.metrics.rate_limited.labels(self.name, label, "waited").inc()
            self.metrics.rate_limit_wait.labels(self.name).observe(waited)

    async def _one(self, operation: str, attempt_fn: Callable[[], Awaitable[T]], what: str) -> T:
        timeout = self.backend.config.timeout
        started = time.perf_counter()
        exc_seen: BaseException | None = None
        try:
            async with asyncio.timeout(timeout):
                return await attempt_fn()
        except TimeoutError:
            exc_seen = BackendTimeout(f"backend {self.name!r} did not answer {operation} within {timeout:g}s")
            raise exc_seen from None
        except BrokerError as exc:
            exc_seen = exc
            raise
        except Exception as exc:
            # A plug-in bug or an unmapped library error: never "not found", never the raw message
            # (which could quote a payload).
            log.exception("unexpected error from backend", extra={"backend": self.name, "operation": operation})
            exc_seen = BackendError(f"backend {self.name!r} failed {operation} ({type(exc).__name__})")
            raise exc_seen from None
        finally:
            outcome = outcome_of(exc_seen)
            self.metrics.backend_calls.labels(self.name, operation, outcome).inc()
            self.metrics.backend_latency.labels(self.name, operation).observe(time.perf_counter() - started)
            if operation in ("fetch", "login", "check"):
                up = exc_seen is None or not is_transient(exc_seen)
                self.metrics.backend_up.set(self, self.name, 1 if up else 0)
