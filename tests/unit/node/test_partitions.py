"""Identity partitions on their own (fake clock, verification and logins stubbed): one partition per
service account shared by its pods, the freshest token kept, the bound on identities, idle release, and
1,000 identities churning through a bound of 50 without growth."""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.backends.base import BackendUnavailable, Kind, Lease, Overloaded, SecretNotFound, SecretValue
from broker.clock import FakeClock
from broker.config import validate_config
from broker.node.partitions import NodeService, Partition
from broker.node.verify import PodIdentity
from broker.ratelimit import Priority, SharedBuckets, priority
from broker.state import BrokerState


def fake_token(sa: str, exp: float, pod: str = "p") -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return "Bearer " + f"{part({'alg': 'RS256'})}.{part({'exp': exp, 'sa': sa, 'pod': pod})}.sig"


def config(accounts: list[str], vault: dict[str, Any] | None = None, **node: Any) -> Any:
    return validate_config(
        {
            "listen": {"socket": "./unused.sock"},
            "node": {
                "same_node": False,
                "identities": [
                    {"namespace": "airflow", "service_account": sa, "backends": ["vault"]} for sa in accounts
                ],
                **node,
            },
            "backends": [
                {
                    "name": "vault",
                    "type": "vault",
                    "url": "http://127.0.0.1:1",
                    "auth": {"method": "kubernetes", "role": "r"},
                    **(vault or {}),
                }
            ],
        }
    )


@pytest.fixture
async def make(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    states: list[BrokerState] = []

    async def no_login(self: Partition) -> None:
        return None

    monkeypatch.setattr(Partition, "ready", no_login)

    def build(accounts: list[str], vault: dict[str, Any] | None = None, **node: Any) -> tuple[NodeService, FakeClock]:
        clock = FakeClock()
        state = BrokerState(config(accounts, vault, **node), clock=clock)
        states.append(state)
        service = state.node
        assert service is not None

        async def verify(header: str | None) -> PodIdentity:
            claims = json.loads(base64.urlsafe_b64decode(str(header).split(".")[1] + "=="))
            return PodIdentity("airflow", claims["sa"], claims["pod"], f"uid-{claims['pod']}")

        monkeypatch.setattr(service.verifier, "verify", verify)
        return service, clock

    yield build
    for state in states:
        assert state.node is not None
        await state.node.aclose(revoke_leases=False)
        state.executor.shutdown()


async def test_one_partition_per_identity_shared_by_its_pods(make: Any) -> None:
    service, clock = make(["a", "b"])
    now = clock.wall()
    _, pa1 = await service.caller(fake_token("a", now + 600, "a1"))
    _, pa2 = await service.caller(fake_token("a", now + 300, "a2"))
    _, pb = await service.caller(fake_token("b", now + 600, "b1"))
    assert pa1 is pa2 and pa1 is not pb
    assert pa1.cache is not pb.cache
    assert pa1.current_token() == fake_token("a", now + 600, "a1").removeprefix(
        "Bearer "
    )  # the longest-lived token is kept
    clock.advance(601)
    assert pa1.current_token() is None  # never a token past its expiry
    assert len(service) == 2
    assert service.state.metrics.node_identities._value.get() == 2


async def test_bound_and_idle_release(make: Any) -> None:
    service, clock = make([f"sa-{i}" for i in range(5)], max_identities=3, idle_timeout=60)
    exp = clock.wall() + 3600
    for i in range(3):
        await service.caller(fake_token(f"sa-{i}", exp))
    assert list(service.partitions) == [("airflow", f"sa-{i}") for i in range(3)]
    await service.caller(fake_token("sa-3", exp))  # the least recently used idle identity makes room
    assert list(service.partitions) == [("airflow", "sa-1"), ("airflow", "sa-2"), ("airflow", "sa-3")]
    assert service.state.metrics.node_released._value.get() == 1
    for partition in service.partitions.values():
        partition.active = 1  # every partition serving a request: none may be closed
    with pytest.raises(Overloaded):
        await service.caller(fake_token("sa-4", exp))
    assert len(service) == 3
    for partition in service.partitions.values():
        partition.active = 0
    clock.advance(59)
    assert service.sweep() == 0
    clock.advance(1)
    assert service.sweep() == 3
    await service.drained()
    assert len(service) == 0
    assert service.state.metrics.node_identities._value.get() == 0


async def test_thousand_identities_churn_within_the_bound(make: Any) -> None:
    accounts = [f"sa-{i}" for i in range(1000)]
    service, clock = make(accounts, max_identities=50, idle_timeout=60)
    exp = clock.wall() + 3600
    for sa in accounts[:50]:
        await service.caller(fake_token(sa, exp))
    await service.drained()
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        highest = 0
        for sa in accounts[50:]:
            await service.caller(fake_token(sa, exp))
            highest = max(highest, len(service))
        await service.drained()
        clock.advance(60)
        service.sweep()
        await service.drained()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert highest == 50
    assert len(service) == 0
    assert service.state.metrics.node_released._value.get() == 1000
    # 950 identities opened and released: what stays is the verdict-free bookkeeping, not 950 partitions
    assert after - base < 512 * 1024, f"{(after - base) / 1024:.0f} KiB kept after release"


class LeaseGiver:
    """Stands for a partition's guarded ``vault`` backend: grants are tracked by hand, revocations succeed."""

    name = "vault"

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        return lease

    async def revoke(self, lease: Lease) -> None:
        return None


async def test_the_lease_gauges_add_up_every_partitions_leases(make: Any) -> None:
    service, clock = make(["a", "b"])
    exp = clock.wall() + 3600
    _, pa = await service.caller(fake_token("a", exp))
    _, pb = await service.caller(fake_token("b", exp))
    giver = LeaseGiver()
    now = clock.now()
    for i in range(3):
        pa.cache.leases.track(giver, Lease(f"database/creds/a/{i}", 600, True, now))
    pb.cache.leases.track(giver, Lease("database/creds/b/0", 120, True, now))

    def gauges() -> tuple[float | None, float | None]:
        registry = service.state.metrics.registry
        return (
            registry.get_sample_value("broker_leases_active", {"backend": "vault"}),
            registry.get_sample_value("broker_lease_min_expiry_seconds", {"backend": "vault"}),
        )

    assert gauges() == (4, 120)  # one series for the backend: the sum, and the soonest of any partition
    clock.advance(20)
    assert gauges() == (4, 100)
    pa.cache.leases.revoke_soon(giver, Lease("database/creds/a/0", 600, True, now))
    assert gauges() == (3, 100)
    service._close(pb)  # b's leases revoked with its partition: a's are still held
    await service.drained()
    assert gauges() == (2, 580)
    service._close(pa)
    await service.drained()
    assert gauges() == (0, 0)


class Store:
    """Stands for the vault server one partition's backend reaches: up or down, and the token's lifetime."""

    def __init__(self, partition: Partition, monkeypatch: pytest.MonkeyPatch) -> None:
        self.guard = partition.guards[0]
        self.up = True
        self.calls = 0
        backend: Any = self.guard.backend
        monkeypatch.setattr(backend, "fetch", self._fetch)
        self._identity = backend.identity
        self._lifetime = 0.0
        monkeypatch.setattr(self._identity, "_acquire", self._login)

    async def _fetch(self, kind: Kind, path: str) -> SecretValue:
        self.calls += 1
        if not self.up:
            raise BackendUnavailable("vault: connection refused")
        if "unknown" in path:
            raise SecretNotFound("vault: no such secret")
        return SecretValue("v")

    async def _login(self) -> tuple[str, float]:
        return "tok", self._lifetime

    async def read(self) -> None:
        with contextlib.suppress(BackendUnavailable):
            await self.guard.fetch(Kind.VARIABLE, "x")

    async def log_in(self, lifetime: float) -> None:
        self._lifetime = lifetime
        await self._identity.token()


async def test_the_backend_gauges_cover_every_partitions_backend(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    service, clock = make(["a", "b"], vault={"retries": 0, "circuit_breaker": {"threshold": 1, "cooldown": 5}})
    exp = clock.wall() + 3600
    _, pa = await service.caller(fake_token("a", exp))
    _, pb = await service.caller(fake_token("b", exp))
    a, b = Store(pa, monkeypatch), Store(pb, monkeypatch)

    def gauges() -> tuple[float | None, float | None, float | None]:
        registry = service.state.metrics.registry
        return (
            registry.get_sample_value("broker_backend_up", {"backend": "vault"}),
            registry.get_sample_value("broker_backend_circuit_open", {"backend": "vault"}),
            registry.get_sample_value("broker_identity_expiry_seconds", {"backend": "vault"}),
        )

    await b.log_in(300)
    await a.log_in(600)
    await a.read()
    await b.read()
    assert gauges() == (1, 0, 300)  # one series for the backend; the expiry is the soonest of any partition
    names = {"broker_backend_up", "broker_backend_circuit_open", "broker_identity_expiry_seconds"}
    labels = [s.labels for m in service.state.metrics.registry.collect() if m.name in names for s in m.samples]
    assert labels == [{"backend": "vault"}] * 3  # no label names the identity
    b.up = False
    await b.read()
    await a.read()  # a's backend is fine: it does not hide b's
    assert gauges() == (0, 1, 300)
    clock.advance(5)
    b.up = True
    await b.read()  # the probe after the cool-down succeeds
    assert gauges() == (1, 0, 300)
    b.up = False
    await b.read()
    assert gauges() == (0, 1, 300)
    service._close(pb)  # what b's backend said goes with its partition
    await service.drained()
    assert gauges() == (1, 0, 600)
    service._close(pa)  # no partition has a vault backend: nothing to say about one
    await service.drained()
    assert gauges() == (None, None, None)


async def test_the_cache_gauges_add_up_every_partitions_entries(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    service, clock = make(["a", "b"])
    exp = clock.wall() + 3600
    _, pa = await service.caller(fake_token("a", exp))
    _, pb = await service.caller(fake_token("b", exp))
    Store(pa, monkeypatch), Store(pb, monkeypatch)

    async def look_up(partition: Partition, *names: str) -> None:
        for name in names:
            with contextlib.suppress(SecretNotFound):
                await partition.cache.get(Kind.VARIABLE, name)

    def gauges() -> tuple[float | None, float | None]:
        registry = service.state.metrics.registry
        return (
            registry.get_sample_value("broker_cache_entries"),
            registry.get_sample_value("broker_cache_negative_entries"),
        )

    await look_up(pa, "x", "y", "unknown1")
    await look_up(pb, "x", "unknown1", "unknown2")
    assert gauges() == (6, 3)  # every partition's cache, not the last one to change
    await look_up(pa, "z")
    assert gauges() == (7, 3)
    service._close(pb)
    await service.drained()
    assert gauges() == (4, 1)
    service._close(pa)
    await service.drained()
    assert gauges() == (0, 0)


async def test_the_rate_limit_is_the_nodes_not_each_partitions(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    service, clock = make(["a", "b"], vault={"rate_limit": {"per_second": 10, "burst": 5, "max_wait": 0}})
    service.rate_limits = SharedBuckets(now=clock.now)  # the buckets on the test's clock
    exp = clock.wall() + 3600
    _, pa = await service.caller(fake_token("a", exp))
    _, pb = await service.caller(fake_token("b", exp))
    stores = [Store(pa, monkeypatch), Store(pb, monkeypatch)]
    assert pa.guards[0].bucket is pb.guards[0].bucket
    elapsed = 0.0
    for step in range(100):
        for store in stores if step % 2 else stores[::-1]:
            for _ in range(3):  # more than the rate, from each identity
                with priority(Priority.MISS), contextlib.suppress(Overloaded):
                    await store.guard.fetch(Kind.VARIABLE, "x")
        assert sum(s.calls for s in stores) <= 5 + 10 * elapsed  # the burst, then the rate, for the node
        clock.advance(0.05)
        elapsed += 0.05
    assert sum(s.calls for s in stores) == 54  # the burst and 4.95 s at 10/s: the node gets the whole rate
    assert min(s.calls for s in stores) > 0
