"""Workload identity: cloud access tokens obtained with the pod's identity, refreshed ahead of expiry, shared.

A ``TokenSource`` holds one bearer token for one backend. Every concurrent caller shares one acquisition
(a second look after the lock); a background task refreshes the token at about 2/3 of its lifetime
(jittered) so requests do not wait for a login; a failed refresh keeps serving the old token while it is
still valid and retries with capped backoff. Plug-ins implement ``_acquire`` (one attempt, mapped onto the
backend error tree) and ``describe``; a store whose tokens can be extended (Vault) also writes ``_renew``,
which the background refresh tries before a new acquisition. A token that never expires (lifetime ``inf``)
is looked at again every ``NEVER_EXPIRES_RECHECK`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from broker.backends.base import BackendContext, BrokerError
from broker.backoff import Backoff

log = logging.getLogger("broker.identity")

RETRY_BASE, RETRY_CAP, RETRY_FLOOR = 1.0, 30.0, 0.5  # seconds between failed refreshes
NEVER_EXPIRES_RECHECK = 3600.0  # a token file may have been rotated meanwhile


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token; ``expires_at`` is on the broker's monotonic clock (``inf`` with ``lifetime`` when it
    never expires)."""

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
        """One attempt at a new token: (value, seconds until it expires, ``inf`` for never). Raises a BrokerError."""

    async def _renew(self, current: Token) -> float | None:
        """Extend ``current`` at the store: its new lifetime in seconds, or None when it cannot be extended
        (the refresh then acquires a new token). Called under the lock by the background refresh only.
        Raises a BrokerError (the refresh retries with backoff; the old token serves while it is usable)."""
        return None

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

    async def _refresh(self, *, renew: bool = False) -> Token:
        """A new token, or with ``renew`` the current one extended when the plug-in can (caller holds the lock);
        with metrics and one log line, never the value."""
        current = self._token
        try:
            if renew and current is not None and self._usable(current):
                extended = await self._renew(current)
                if extended is not None:
                    return self._install(current.value, extended, "renewed")
            value, lifetime = await self._acquire()
        except BrokerError as exc:
            self._last_error = exc.code
            self.ctx.metrics.logins.labels(backend=self.backend_name, outcome="failed").inc()
            log.warning(
                "credential refresh failed",
                extra={"backend": self.backend_name, "identity": self.kind, "error": exc.code, "detail": exc.message},
            )
            raise
        self.acquisitions += 1
        return self._install(value, lifetime, "ok")

    def _install(self, value: str, lifetime: float, outcome: str) -> Token:
        token = Token(value, self.ctx.clock.now() + lifetime, lifetime)
        self._token = token
        self._last_error = None
        self.ctx.metrics.logins.labels(backend=self.backend_name, outcome=outcome).inc()
        self._show_expiry()
        log.info(
            "credential refreshed" if outcome == "ok" else "credential renewed",
            extra={"backend": self.backend_name, "identity": self.kind, "ttl": round(lifetime, 1)},
        )
        return token

    def _show_expiry(self) -> None:
        token = self._token
        if token is not None:
            left = -1.0 if math.isinf(token.expires_at) else max(0.0, token.expires_at - self.ctx.clock.now())
            self.ctx.metrics.identity_expiry.set(self, self.backend_name, left)

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
        if math.isinf(token.lifetime):
            return NEVER_EXPIRES_RECHECK
        target = token.lifetime * self.renew_at * (0.9 + self.backoff.rng.random() * 0.1)
        return max(0.5, token.expires_at - token.lifetime + target - now)

    async def _refresh_loop(self) -> None:
        failures = 0
        while True:
            await self.backoff.sleep(self._next_wait(failures))
            try:
                async with self._lock:
                    await self._refresh(renew=True)
                failures = 0
            except BrokerError:
                failures += 1  # the old token keeps serving while it is valid; _refresh logged why
            except Exception:
                failures += 1
                log.exception("credential refresh crashed", extra={"backend": self.backend_name})
            self._show_expiry()

    async def aclose(self) -> None:
        self.ctx.metrics.identity_expiry.withdraw(self, self.backend_name)
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
