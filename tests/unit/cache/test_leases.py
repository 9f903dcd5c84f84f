"""The lease keeper (``broker.cache.leases``): leases held against the object that granted them, and the word
to its owner when a holder holds nothing any more (no live lease, no revocation under way)."""

from __future__ import annotations

import asyncio

from broker.backends.base import BackendUnavailable, Lease
from broker.cache.leases import LeaseKeeper
from broker.clock import FakeClock
from broker.metrics import Metrics


class Holder:
    def __init__(self, name: str, *, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.gate = asyncio.Event()
        self.gate.set()
        self.revoked: list[str] = []

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        return lease

    async def revoke(self, lease: Lease) -> None:
        await self.gate.wait()
        if self.fail:
            raise BackendUnavailable("down")
        self.revoked.append(lease.lease_id)


def keeper() -> tuple[LeaseKeeper, FakeClock, list[str]]:
    clock = FakeClock()
    k = LeaseKeeper(clock, Metrics())
    freed: list[str] = []
    k.on_free = lambda holder: freed.append(holder.name)
    return k, clock, freed


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_holder_is_free_only_once_its_revocation_is_done() -> None:
    k, clock, freed = keeper()
    b = Holder("b")
    b.gate.clear()
    lease = Lease("db/creds/r/1", 60, True, clock.now())
    k.track(b, lease)
    k.revoke_soon(b, lease)
    await settle()
    assert k.holders() == {b} and freed == []  # the revoke call still needs b open
    b.gate.set()
    await settle()
    assert (b.revoked, k.holders(), freed) == (["db/creds/r/1"], set(), ["b"])


async def test_a_failed_revocation_frees_the_holder_too() -> None:
    k, clock, freed = keeper()
    b = Holder("b", fail=True)
    lease = Lease("db/creds/r/1", 60, True, clock.now())
    k.track(b, lease)
    k.revoke_soon(b, lease)
    await settle()
    assert freed == ["b"]  # the lease then simply expires in the store


async def test_expiry_frees_a_holder_when_its_last_lease_goes() -> None:
    k, clock, freed = keeper()
    a, b = Holder("a"), Holder("b")
    k.track(b, Lease("db/creds/r/1", 10, True, clock.now()))
    k.track(b, Lease("db/creds/r/2", 20, True, clock.now()))
    k.track(a, Lease("db/creds/r/3", 10, True, clock.now()))
    clock.advance(10)
    k.prune(clock.now())
    assert freed == ["a"]  # b still holds r/2
    clock.advance(10)
    k.prune(clock.now())
    assert freed == ["a", "b"]
    assert k.holders() == set() and len(k) == 0


async def test_shutdown_revokes_through_each_holder_without_calling_on_free() -> None:
    k, clock, freed = keeper()
    a, b = Holder("a"), Holder("b")
    k.track(a, Lease("db/creds/r/1", 60, True, clock.now()))
    k.track(b, Lease("db/creds/r/2", 60, True, clock.now()))
    await k.aclose(revoke=True, timeout=5)
    assert (a.revoked, b.revoked) == (["db/creds/r/1"], ["db/creds/r/2"])
    assert freed == []  # the owner closes every backend itself at shutdown
    assert k.holders() == set()
