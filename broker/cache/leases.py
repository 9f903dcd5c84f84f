"""The lease keeper: every lease the broker handed out, the backend that granted it, renew and revoke calls,
and the lease gauges.

A lease is held against the object that granted it (its guarded backend), never against a backend name: a
reload may rename, remove or replace that backend while callers still use the credential, and the lease must
still be renewed or revoked through the store that issued it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from broker.backends.base import BrokerError, Lease
from broker.clock import Clock
from broker.metrics import Metrics

log = logging.getLogger("broker.cache")


class LeaseHolder(Protocol):
    """What granted a lease and can renew or revoke it (a guarded backend)."""

    @property
    def name(self) -> str: ...

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease: ...

    async def revoke(self, lease: Lease) -> None: ...


class LeaseKeeper:
    """Live leases by id, each with its holder. Background revocations are owned here and drained on close.

    ``on_free`` is told of each holder whose last lease went (revoked, or expired) and that has no revocation
    under way any more: a backend a reload took out of the chain can then be closed.
    """

    def __init__(self, clock: Clock, metrics: Metrics) -> None:
        self._clock = clock
        self._metrics = metrics
        self._gauged: set[str] = set()
        self._live: dict[str, tuple[LeaseHolder, Lease]] = {}
        self._revoking: Counter[LeaseHolder] = Counter()  # revocations under way, per holder
        self._tasks: set[asyncio.Task[Any]] = set()
        self.on_free: Callable[[LeaseHolder], None] | None = None

    def __len__(self) -> int:
        return len(self._live)

    def track(self, holder: LeaseHolder, lease: Lease) -> None:
        """Remember a lease just handed out (or renewed: the new grant replaces the old one)."""
        self._live[lease.lease_id] = (holder, lease)
        self.update_gauges()

    def holders(self) -> set[LeaseHolder]:
        """Every holder that still has a live lease or a revocation under way (a retired backend with one must
        stay open)."""
        return {holder for holder, _ in self._live.values()} | set(self._revoking)

    def _freed(self, candidates: Iterable[LeaseHolder]) -> None:
        """Tell ``on_free`` of each of ``candidates`` that holds nothing any more."""
        if self.on_free is None:
            return
        busy = self.holders()
        for holder in set(candidates) - busy:
            self.on_free(holder)

    def live(self) -> list[tuple[str, Lease]]:
        return [(holder.name, lease) for holder, lease in self._live.values()]

    async def renew(self, holder: LeaseHolder, lease: Lease, increment: float | None) -> Lease:
        """Renew through the lease's own holder and record the new grant. Raises what the holder raises."""
        renewed = await holder.renew(lease, increment)
        if renewed.lease_id != lease.lease_id:
            self._live.pop(lease.lease_id, None)
        self.track(holder, renewed)
        return renewed

    def revoke_soon(self, holder: LeaseHolder, lease: Lease) -> None:
        """Give a lease back in the background (its value is no longer served and nobody asks for it)."""
        self._live.pop(lease.lease_id, None)
        self.update_gauges()
        self._spawn_revoke(holder, lease)

    def _spawn_revoke(self, holder: LeaseHolder, lease: Lease) -> None:
        self._revoking[holder] += 1  # counted from now: the holder must stay open until the call is done
        task = asyncio.get_running_loop().create_task(self._revoke(holder, lease), name="lease-revoke")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _revoke(self, holder: LeaseHolder, lease: Lease) -> None:
        try:
            await holder.revoke(lease)
            self._metrics.lease_renewals.labels(holder.name, "revoked").inc()
        except BrokerError as exc:
            log.warning("lease revocation failed", extra={"backend": holder.name, "error": exc.code})
        except Exception:
            # Shutdown must go on whatever one revocation does; the lease then simply expires.
            log.exception("lease revocation crashed", extra={"backend": holder.name})
        finally:
            self._revoking[holder] -= 1
            if self._revoking[holder] <= 0:
                del self._revoking[holder]
            self._freed([holder])

    def prune(self, now: float) -> None:
        """Forget leases that expired on their own."""
        expired = [lid for lid, (_, lease) in self._live.items() if lease.expires_at <= now]
        holders = [self._live.pop(lid)[0] for lid in expired]
        if expired:
            self.update_gauges()
            self._freed(holders)

    def update_gauges(self) -> None:
        """Report the count and soonest expiry per backend to the process's shared lease gauges (node mode:
        every partition's keeper reports there; the count is their sum, the expiry the soonest of any, read at
        scrape time). A backend whose last lease went reads 0."""
        tally: dict[str, tuple[int, float]] = {}
        for holder, lease in self._live.values():
            count, soonest = tally.get(holder.name, (0, lease.expires_at))
            tally[holder.name] = (count + 1, min(soonest, lease.expires_at))
        for backend in self._gauged - tally.keys():
            self._metrics.leases_active.withdraw(self, backend)
            self._metrics.lease_expiry.withdraw(self, backend)
        for backend, (count, soonest) in tally.items():
            self._metrics.leases_active.set(self, backend, count)
            self._metrics.lease_expiry.set(self, backend, self._seconds_until(soonest))
        self._gauged = set(tally)

    def _seconds_until(self, deadline: float) -> Callable[[], float]:
        return lambda: max(0.0, deadline - self._clock.now())

    async def aclose(self, *, revoke: bool, timeout: float) -> None:  # noqa: ASYNC109
        """Finish background revocations; then revoke every live lease when asked, each through its holder."""
        self.on_free = None  # shutdown closes every backend itself, once these calls are done
        leases = list(self._live.values()) if revoke else []
        if revoke:
            self._live.clear()
        for holder, lease in leases:
            self._spawn_revoke(holder, lease)
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        self.update_gauges()
