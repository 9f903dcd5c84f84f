"""Workload identity: cloud access tokens obtained with the pod's identity, refreshed ahead of expiry, shared.

A ``TokenSource`` holds one bearer token for one backend. Every concurrent caller shares one acquisition
(a second look after the lock); a background task refreshes the token at about 2/3 of its lifetime
(jittered) so requests do not wait for a login; a failed refresh keeps serving the old token while it is
still valid and retries with capped backoff. Plug-ins implement ``_acquire`` (one attempt, mapped onto the
backend error tree) and ``describe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from broker.backends.base import BackendContext, BrokerError
from broker.backoff import Backoff

log = logging.getLogger("broker.identity")

RETRY_BASE, RETRY_CAP, RETRY_FLOOR = 1.0, 30.0, 0.5  # seconds between failed refreshes


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token; ``expires_at`` is on the broker's monotonic clock."""

    value: str = field(repr=False)
    expires_at: float
    lifetime: float


class TokenSource(ABC):
    """One shared, refreshed access token for one backend."""

    kind: str = "identity"

    def __init__(
        self, backend_name: str, ctx: BackendContext, *, renew_at: float = 2 / 3, min_ttl: float = 5.0
    ) -> None:
        self.backend_name = backend_name
        self.ctx = ctx
        self.renew_at = renew_at
        self.min_ttl = min_ttl
        self.acquisitions = 0
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None
        self._last_error: str | None = None
        self.backoff = Backoff(RETRY_BASE, RETRY_CAP, floor=RETRY_FLOOR)

    @abstractmethod
    async def _acquire(self) -> tuple[str, float]:
        """One attempt at a new token: (value, seconds until it expires). Raises a BrokerError."""

    @abstractmethod
    def describe(self) -> str:
        """Who the pod is to the cloud (service account email, client id), for ``broker check``."""

    # ------------------------------------------------------------------------------------------ state

    def _usable(self, token: Token | None) -> bool:
        return token is not None and token.expires_at - self.ctx.clock.now() > min(self.min_ttl, token.lifetime / 4)

    def not_ready_reason(self) -> str | None:
        if self._usable(self._token):
            return None
        return f"no valid {self.kind} token" + (f" ({self._last_error})" if self._last_error else "")

    # ------------------------------------------------------------------------------------------ tokens

    async def token(self, refused: str | None = None) -> str:
        """A valid token. ``refused`` is a token the store just rejected: get a new one instead of it."""
        current = self._token
        if self._usable(current) and (refused is None or current.value != refused):  # type: ignore[union-attr]
            assert current is not None
            return current.value
        async with self._lock:
            current = self._token
            if self._usable(current) and (refused is None or current.value != refused):  # type: ignore[union-attr]
                assert current is not None
                return current.value
            if refused is not None:
                await self._discard()
            return (await self._refresh()).value

    async def _discard(self) -> None:  # noqa: B027 - optional hook
        """Forget any copy of a token the store refused that the plug-in's SDK keeps (called under the lock)."""

    async def _refresh(self) -> Token:
        """Acquire a new token (caller holds the lock), with metrics and one log line; never logs the value."""
        try:
            value, ttl = await self._acquire()
        except BrokerError as exc:
            self._last_error = exc.code
            self.ctx.metrics.logins.labels(backend=self.backend_name, outcome="failed").inc()
            log.warning(
                "credential refresh failed",
                extra={"backend": self.backend_name, "identity": self.kind, "error": exc.code, "detail": exc.message},
            )
            raise
        now = self.ctx.clock.now()
        token = Token(value, now + ttl, ttl)
        self._token = token
        self._last_error = None
        self.acquisitions += 1
        self.ctx.metrics.logins.labels(backend=self.backend_name, outcome="ok").inc()
        self.ctx.metrics.identity_expiry.labels(backend=self.backend_name).set(ttl)
        log.info(
            "credential refreshed",
            extra={"backend": self.backend_name, "identity": self.kind, "ttl": round(ttl, 1)},
        )
        return token

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.token()
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"identity-{self.backend_name}"
            )

    def _next_wait(self, failures: int) -> float:
        token = self._token
        now = self.ctx.clock.now()
        if failures:
            wait = self.backoff.delay(failures - 1)
            if token is not None:  # never sleep past the point where the old token stops being usable
                wait = min(wait, max(0.5, (token.expires_at - now) / 2))
            return wait
        if token is None:
            return 1.0
        target = token.lifetime * self.renew_at * (0.9 + self.backoff.rng.random() * 0.1)
        return max(0.5, token.expires_at - token.lifetime + target - now)

    async def _refresh_loop(self) -> None:
        failures = 0
        while True:
            await self.backoff.sleep(self._next_wait(failures))
            try:
                async with self._lock:
                    await self._refresh()
                failures = 0
            except BrokerError:
                failures += 1  # the old token keeps serving while it is valid; _refresh logged why
            except Exception:
                failures += 1
                log.exception("credential refresh crashed", extra={"backend": self.backend_name})
            if self._token is not None:
                self.ctx.metrics.identity_expiry.labels(backend=self.backend_name).set(
                    max(0.0, self._token.expires_at - self.ctx.clock.now())
                )

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
