"""Every cache rule, with a fake clock and a scripted loader."""

from __future__ import annotations

import asyncio
import gc
import random
from collections import OrderedDict
from typing import Any

import pytest

from broker.backends.base import (
    AccessDenied,
    BackendError,
    BackendUnavailable,
    BrokerError,
    Kind,
    Lease,
    SecretNotFound,
)
from broker.cache import _LRU, JITTER_STEPS, READ, Entry, SecretCache, Status, spelled
from broker.clock import FakeClock
from broker.config import CacheConfig, LeasesConfig
from broker.metrics import Metrics
from broker.resolver import NotFoundAnywhere, Resolved

V = Kind.VARIABLE


class ScriptedLoader:
    """Answers per key from a script of values or exceptions; counts calls; can be held at a gate."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.holder: Leases | None = None  # the backend that grants leases
        self.calls: dict[str, int] = {}
        self.answers: dict[str, Any] = {}
        self.lease_duration: dict[str, float] = {}
        self.gate: asyncio.Event | None = None
        self.version = 0

    async def __call__(self, kind: Kind, name: str, team: str | None = None) -> Resolved:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.get(name, SecretNotFound("nope"))
        if isinstance(answer, BaseException):
            raise answer
        self.version += 1
        lease = None
        if name in self.lease_duration:
            lease = Lease(f"database/creds/x/{self.version}", self.lease_duration[name], True, self.clock.now())
        return Resolved(
            value=answer,
            backend="b1",
            version=str(self.version),
            lease=lease,
            ttl=100.0,
            max_stale=50.0,
            source=self.holder if lease is not None else None,
        )


class Leases:
    """A backend that grants leases, as the cache's lease keeper sees it."""

    name = "b1"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.renewed: list[str] = []
        self.revoked: list[str] = []
        self.cap_at: float | None = None  # absolute clock time the lease cannot pass
        self.fail: BrokerError | None = None

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        if self.fail:
            raise self.fail
        self.renewed.append(lease.lease_id)
        now = self.clock.now()
        duration = increment or lease.duration
        if self.cap_at is not None:
            duration = max(0.0, min(duration, self.cap_at - now))
        return Lease(lease.lease_id, duration, True, now)

    async def revoke(self, lease: Lease) -> None:
        self.revoked.append(lease.lease_id)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def loader(clock: FakeClock) -> ScriptedLoader:
    return ScriptedLoader(clock)


@pytest.fixture
def leases(clock: FakeClock) -> Leases:
    return Leases(clock)


def make_cache(loader: ScriptedLoader, clock: FakeClock, leases: Leases | None = None, **cfg: Any) -> SecretCache:
    settings = {"ttl": 100, "max_stale": 50, "negative_ttl": 10, "refresh_ahead": 0.75, "refresh_jitter": 0.0, **cfg}
    loader.holder = leases
    return SecretCache(
        loader,
        clock=clock,
        config=CacheConfig(**settings),
        leases=LeasesConfig(),
        metrics=Metrics(),
        rng=random.Random(7),
    )


async def settle() -> None:
    """Let background tasks started by the cache run to completion (no wall-clock waits)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def value(cache: SecretCache, name: str) -> tuple[str, Status]:
    entry, status = await cache.get(V, name)
    assert entry.resolved is not None
    return entry.resolved.value, status


async def test_thousand_concurrent_misses_make_one_backend_call(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    loader.gate = asyncio.Event()
    cache = make_cache(loader, clock)
    tasks = [asyncio.create_task(cache.get(V, "k")) for _ in range(1000)]
    await settle()
    loader.gate.set()
    results = await asyncio.gather(*tasks)
    assert loader.calls == {"k": 1}
    assert {e.resolved.value for e, _ in results if e.resolved} == {"v1"}
    assert {s for _, s in results} == {Status.MISS}


async def test_concurrent_not_found_misses_share_one_call(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.gate = asyncio.Event()
    cache = make_cache(loader, clock)
    tasks = [asyncio.create_task(cache.get(V, "missing")) for _ in range(200)]
    await settle()
    loader.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, SecretNotFound) for r in results)
    assert loader.calls == {"missing": 1}


async def test_hit_within_ttl_and_reload_after(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    cache = make_cache(loader, clock, refresh_ahead=0)
    assert await value(cache, "k") == ("v1", Status.MISS)
    clock.advance(99)
    assert await value(cache, "k") == ("v1", Status.HIT)
    assert loader.calls["k"] == 1
    loader.answers["k"] = "v2"
    clock.advance(2)
    assert await value(cache, "k") == ("v2", Status.REFRESHED)
    assert loader.calls["k"] == 2


async def test_ttl_is_min_of_configured_and_hint(loader: ScriptedLoader, clock: FakeClock) -> None:
    async def short(kind: Kind, name: str, team: str | None = None) -> Resolved:
        loader.calls[name] = loader.calls.get(name, 0) + 1
        return Resolved("v", "b1", None, None, ttl=5.0, max_stale=0.0)

    cache = SecretCache(
        short, clock=clock, config=CacheConfig(ttl=100, refresh_ahead=0), leases=LeasesConfig(), metrics=Metrics()
    )
    await cache.get(V, "k")
    clock.advance(6)
    await cache.get(V, "k")
    assert loader.calls["k"] == 2


async def test_backend_error_serves_stale_within_max_stale_then_fails(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    cache = make_cache(loader, clock, refresh_ahead=0)
    await cache.get(V, "k")
    loader.answers["k"] = BackendUnavailable("down")
    clock.advance(101)  # expired, inside max_stale (50)
    assert await value(cache, "k") == ("v1", Status.STALE)
    clock.advance(48)
    assert await value(cache, "k") == ("v1", Status.STALE)
    clock.advance(2)  # past ttl + max_stale
    with pytest.raises(BackendUnavailable):
        await cache.get(V, "k")


async def test_stale_after_recent_failure_does_not_wait_on_backend(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    cache = make_cache(loader, clock, refresh_ahead=0)
    await cache.get(V, "k")
    loader.answers["k"] = BackendUnavailable("down")
    clock.advance(101)
    await cache.get(V, "k")
    calls = loader.calls["k"]
    for _ in range(50):
        assert (await value(cache, "k"))[1] is Status.STALE
    assert loader.calls["k"] == calls  # inside the retry back-off: answered from stale without a call


async def test_recovery_after_outage(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    cache = make_cache(loader, clock, refresh_ahead=0)
    await cache.get(V, "k")
    loader.answers["k"] = BackendUnavailable("down")
    clock.advance(101)
    await cache.get(V, "k")
    loader.answers["k"] = "v2"
    clock.advance(31)  # past the longest retry back-off
    await cache.run_due()
    await settle()
    assert await value(cache, "k") == ("v2", Status.HIT)


async def test_error_without_cached_value_is_raised_not_cached(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = BackendUnavailable("down")
    cache = make_cache(loader, clock)
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            await cache.get(V, "k")
    assert loader.calls["k"] == 3  # never remembered as "not found"
    loader.answers["k"] = "v"
    assert await value(cache, "k") == ("v", Status.MISS)


async def test_negative_entries_are_cached_then_expire(loader: ScriptedLoader, clock: FakeClock) -> None:
    cache = make_cache(loader, clock)
    for _ in range(5):
        with pytest.raises(SecretNotFound):
            await cache.get(V, "absent")
    assert loader.calls["absent"] == 1
    loader.answers["absent"] = "now-here"
    clock.advance(9)
    with pytest.raises(SecretNotFound):
        await cache.get(V, "absent")
    clock.advance(2)
    assert await value(cache, "absent") == ("now-here", Status.MISS)
    assert loader.calls["absent"] == 2


async def test_negative_ttl_zero_disables_negative_cache(loader: ScriptedLoader, clock: FakeClock) -> None:
    cache = make_cache(loader, clock, negative_ttl=0)
    for _ in range(3):
        with pytest.raises(SecretNotFound):
            await cache.get(V, "absent")
    assert loader.calls["absent"] == 3


async def test_deleted_secret_becomes_not_found_not_stale(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    cache = make_cache(loader, clock, refresh_ahead=0)
    await cache.get(V, "k")
    loader.answers["k"] = SecretNotFound("gone")
    clock.advance(101)
    with pytest.raises(SecretNotFound):
        await cache.get(V, "k")


async def test_access_denied_is_never_answered_from_stale(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    cache = make_cache(loader, clock, refresh_ahead=0)
    await cache.get(V, "k")
    loader.answers["k"] = AccessDenied("policy changed")
    clock.advance(101)
    with pytest.raises(AccessDenied):
        await cache.get(V, "k")
    assert cache.peek(V, "k") is None


async def test_malformed_answer_serves_stale(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    cache = make_cache(loader, clock, refresh_ahead=0)
    await cache.get(V, "k")
    loader.answers["k"] = BackendError("bad payload")
    clock.advance(101)
    assert await value(cache, "k") == ("v1", Status.STALE)


async def test_refresh_ahead_refreshes_in_background(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    cache = make_cache(loader, clock)
    await cache.get(V, "k")
    loader.answers["k"] = "v2"
    clock.advance(76)  # past 0.75 * ttl
    assert await value(cache, "k") == ("v1", Status.HIT)  # served at once, refresh started
    await settle()
    assert loader.calls["k"] == 2
    assert await value(cache, "k") == ("v2", Status.HIT)


async def test_scheduler_refreshes_only_keys_read_since_fetch(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers.update(read="r", unread="u")
    cache = make_cache(loader, clock)
    await cache.get(V, "read")
    await cache.get(V, "unread")
    clock.advance(1)
    await cache.get(V, "read")
    clock.advance(75)
    await cache.run_due()
    await settle()
    assert loader.calls == {"read": 2, "unread": 1}


async def test_pinned_keys_stay_warm_unread(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["p"] = "v1"
    cache = make_cache(loader, clock)
    cache.pin([(V, "p", None)])
    await cache.get(V, "p")
    for _ in range(4):
        clock.advance(76)
        await cache.run_due()
        await settle()
    assert loader.calls["p"] == 5
    entry = cache.peek(V, "p")
    assert entry is not None and entry.fetched_at + entry.ttl > clock.now()


async def test_refresh_jitter_spreads_refresh_times(clock: FakeClock) -> None:
    loader = ScriptedLoader(clock)
    for i in range(50):
        loader.answers[f"k{i}"] = "v"
    cache = make_cache(loader, clock, refresh_jitter=0.2)
    for i in range(50):
        await cache.get(V, f"k{i}")
    times = {round(cache.peek(V, f"k{i}").refresh_at, 3) for i in range(50)}
    assert len(times) > 40
    assert all(clock.now() + 100 * 0.75 * 0.8 - 1e-6 <= t <= clock.now() + 75 for t in times)
    # the spans are drawn from JITTER_STEPS floats made once: entries that drew the same one share it
    for i in range(50, 3000):
        loader.answers[f"k{i}"] = "v"
        await cache.get(V, f"k{i}")
    spans = {id(cache.peek(V, f"k{i}").refresh_in) for i in range(3000)}  # type: ignore[union-attr]
    assert len(spans) <= JITTER_STEPS


async def test_evicted_entries_are_freed_although_their_refresh_is_scheduled(
    loader: ScriptedLoader, clock: FakeClock
) -> None:
    cache = make_cache(loader, clock, max_entries=10)
    for i in range(200):
        loader.answers[f"evicted-{i}"] = "v"
        await cache.get(V, f"evicted-{i}")
    gc.collect()
    live = [o for o in gc.get_objects() if type(o) is Entry and o.key[1].startswith("evicted-")]
    assert len(live) == 10  # the refresh schedule holds keys, not the entries pushed out by the bound
    clock.advance(80)  # past every refresh-ahead time: the evicted keys' slots are let go, nothing is loaded
    calls = sum(loader.calls.values())
    await cache.run_due()
    await settle()
    assert sum(loader.calls.values()) == calls


async def test_lru_bound_holds(loader: ScriptedLoader, clock: FakeClock) -> None:
    cache = make_cache(loader, clock, max_entries=10)
    for i in range(100):
        loader.answers[f"k{i}"] = "v"
        await cache.get(V, f"k{i}")
    assert len(cache) == 10
    assert cache.peek(V, "k99") is not None and cache.peek(V, "k0") is None
    # recently used keys survive
    await cache.get(V, "k90")
    for i in range(100, 109):
        loader.answers[f"k{i}"] = "v"
        await cache.get(V, f"k{i}")
    assert cache.peek(V, "k90") is not None


@pytest.mark.parametrize("seed", range(5))
def test_lru_evicts_exactly_the_least_recently_used(seed: int) -> None:
    """Gets, puts, pops and evictions in any mix, checked against an OrderedDict kept in use order (the
    two dicts of the LRU hand over from one to the other as evictions run through the older one)."""
    rng = random.Random(seed)
    evicted: list[str] = []
    lru = _LRU(8, lambda entry: evicted.append(entry.spelled))
    model: OrderedDict[str, Entry] = OrderedDict()
    expected: list[str] = []
    for _ in range(2000):
        key = (V, f"k{rng.randrange(20)}", None)
        text = spelled(key)
        op = rng.random()
        if op < 0.4:
            got = lru.get(key)
            assert got is model.get(text)
            if got is not None:
                model.move_to_end(text)
        elif op < 0.9:
            entry = Entry(spelled=text, head=b"", terms=(1.0, 0.0, None), fetched_at=0, refresh_in=0, last_access=0)
            lru.put(entry)
            model[text] = entry
            model.move_to_end(text)
            while len(model) > 8:
                expected.append(model.popitem(last=False)[0])
        else:
            assert lru.pop(key) is model.pop(text, None)
        assert lru.peek(key) is model.get(text)
        assert evicted == expected and len(lru) == len(model)
        assert [entry for _, entry in lru.items()] == list(model.values())
    assert len(expected) > 100


async def test_client_cancellation_does_not_cancel_the_load(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "v1"
    loader.gate = asyncio.Event()
    cache = make_cache(loader, clock)
    first = asyncio.create_task(cache.get(V, "k"))
    await settle()
    first.cancel()
    second = asyncio.create_task(cache.get(V, "k"))
    await settle()
    loader.gate.set()
    entry, _ = await second
    assert entry.resolved is not None and entry.resolved.value == "v1"
    assert loader.calls["k"] == 1


async def test_invalidate(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers.update(a="1", b="2")
    cache = make_cache(loader, clock)
    await cache.get(V, "a")
    await cache.get(V, "b")
    assert cache.invalidate(V, "a") == 1
    await cache.get(V, "a")
    assert loader.calls == {"a": 2, "b": 1}
    assert cache.invalidate() == 2


async def test_invalidating_a_name_forgets_it_for_every_team(loader: ScriptedLoader, clock: FakeClock) -> None:
    """POST /v1/cache/invalidate names no team: a changed secret must not stay cached for any team (entries and
    negative entries alike), and nothing else goes."""
    loader.answers.update(a="1", b="2")
    cache = make_cache(loader, clock)
    for team in (None, "team1", "team2"):
        await cache.get(V, "a", team)
        await cache.get(V, "b", team)
        with pytest.raises(SecretNotFound):
            await cache.get(V, "gone", team)
    assert cache.invalidate(V, "a") == 3
    assert cache.invalidate(V, "gone") == 3
    for team in (None, "team1", "team2"):
        assert cache.peek(V, "a", team) is None and cache.peek(V, "b", team) is not None
    assert cache.invalidate(V) == 3  # a kind: every team's keys of it
    assert len(cache) == 0


class HeldLoader:
    """Each load waits for its own answer (a value, or an exception to raise), given by the test in any order."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, asyncio.Future[Any]]] = []

    async def __call__(self, kind: Kind, name: str, team: str | None = None) -> Resolved:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.loads.append((name, answer))
        return Resolved(await answer, "b1", None, None, ttl=100.0, max_stale=0.0)

    def answer(self, index: int, outcome: Any) -> None:
        future = self.loads[index][1]
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


@pytest.mark.parametrize("old_first", [True, False], ids=["old-answers-first", "old-answers-last"])
@pytest.mark.parametrize(
    "old", ["old", SecretNotFound("nope"), AccessDenied("no"), BackendUnavailable("down")], ids=type
)
async def test_a_read_under_way_when_invalidated_is_served_not_kept(
    clock: FakeClock, old_first: bool, old: Any
) -> None:
    """A load begun before an invalidation may carry the value being invalidated: it answers the callers who
    asked before, but is not stored (nor its failure), and a read after the invalidation loads anew."""
    loader = HeldLoader()
    cache = SecretCache(loader, clock=clock, config=CacheConfig(ttl=100), leases=LeasesConfig(), metrics=Metrics())
    before = asyncio.create_task(cache.get(V, "a"))
    other = asyncio.create_task(cache.get(V, "b"))
    await settle()
    assert cache.invalidate(V, "a") == 0  # nothing stored yet, one load under way
    after = asyncio.create_task(cache.get(V, "a"))
    await settle()
    assert [name for name, _ in loader.loads] == ["a", "b", "a"]  # the later read did not join the earlier load
    for index, outcome in [(0, old), (2, "new")] if old_first else [(2, "new"), (0, old)]:
        loader.answer(index, outcome)
        await settle()
    if isinstance(old, str):
        assert (await before)[0].value == "old"
    elif isinstance(old, BackendUnavailable) and not old_first:
        assert (await before)[0].value == "new"  # its failure is answered from what is cached by then
    else:
        with pytest.raises(type(old)):
            await before
    assert (await after)[0].value == "new"
    entry = cache.peek(V, "a")
    assert entry is not None and entry.value == "new" and entry.failures == 0
    loader.answer(1, "b1")  # a load of another key is not disowned
    await other
    assert (await cache.get(V, "b"))[1] is Status.HIT
    assert len(loader.loads) == 3


# ---------------------------------------------------------------------------------------------- leases


async def test_leased_value_never_served_past_expiry(loader: ScriptedLoader, clock: FakeClock, leases: Leases) -> None:
    loader.answers["db"] = "creds"
    loader.lease_duration["db"] = 60
    cache = make_cache(loader, clock, leases, max_stale=3600)
    await cache.get(V, "db")
    loader.answers["db"] = BackendUnavailable("down")
    leases.fail = BackendUnavailable("down")
    clock.advance(54)  # hard expiry is 60 - min(5, 6) = 55
    assert (await value(cache, "db"))[1] is Status.HIT
    clock.advance(2)
    with pytest.raises(BackendUnavailable):
        await cache.get(V, "db")  # max_stale does not extend a lease


async def test_lease_renewed_at_two_thirds_while_used(loader: ScriptedLoader, clock: FakeClock, leases: Leases) -> None:
    loader.answers["db"] = "creds"
    loader.lease_duration["db"] = 90
    cache = make_cache(loader, clock, leases)
    await cache.get(V, "db")
    clock.advance(59)
    await cache.run_due()
    await settle()
    assert leases.renewed == []
    clock.advance(1)
    await cache.get(V, "db")
    await cache.run_due()
    await settle()
    assert len(leases.renewed) == 1
    entry = cache.peek(V, "db")
    assert entry is not None and entry.fetched_at + entry.ttl == pytest.approx(clock.now() + 85)
    assert loader.calls["db"] == 1


async def test_capped_lease_rotates_before_expiry(loader: ScriptedLoader, clock: FakeClock, leases: Leases) -> None:
    loader.answers["db"] = "creds"
    loader.lease_duration["db"] = 90
    cache = make_cache(loader, clock, leases, ttl=1000)
    await cache.get(V, "db")
    first = cache.peek(V, "db").lease
    leases.cap_at = clock.now() + 120  # max TTL: the lease cannot live past t0 + 120
    for _ in range(6):
        clock.advance(10)
        await cache.get(V, "db")
        await cache.run_due()
        await settle()
    # at t0+60 renewed to t0+120 (capped); 2/3 into the remaining 60 s (t0+100) a new credential replaces it
    clock.advance(45)
    await cache.run_due()
    await settle()
    entry = cache.peek(V, "db")
    assert loader.calls["db"] == 2
    assert entry.lease != first and entry.lease.expires_at > first.issued_at + 120
    assert entry.fetched_at + entry.ttl > clock.now()


async def test_idle_lease_is_released_and_revoked(loader: ScriptedLoader, clock: FakeClock, leases: Leases) -> None:
    loader.answers["db"] = "creds"
    loader.lease_duration["db"] = 300
    cache = make_cache(loader, clock, leases, ttl=60)
    await cache.get(V, "db")
    clock.advance(201)
    await cache.run_due()
    await settle()
    assert cache.peek(V, "db") is None
    assert len(leases.revoked) == 1 and leases.renewed == []


async def test_shutdown_revokes_every_live_lease(loader: ScriptedLoader, clock: FakeClock, leases: Leases) -> None:
    loader.lease_duration.update(a=300, b=300)
    loader.answers.update(a="x", b="y")
    cache = make_cache(loader, clock, leases)
    await cache.get(V, "a")
    await cache.get(V, "b")
    cache.invalidate(V, "a")
    await cache.get(V, "a")  # a second lease for "a"; the first stays live until revoked
    await cache.aclose(revoke_leases=True)
    assert len(leases.revoked) == 3


def disown(cache: SecretCache, how: str) -> None:
    """Disown the loads under way, as an invalidation or a config reload does."""
    if how == "invalidate":
        cache.invalidate(V, "db")
    else:
        cache.retain(lambda _entry: True)


@pytest.mark.parametrize("how", ["invalidate", "reload"])
@pytest.mark.parametrize("load", ["caller-left", "rotation"])
async def test_a_disowned_leased_load_nobody_waits_for_gives_its_lease_back(
    loader: ScriptedLoader, clock: FakeClock, leases: Leases, how: str, load: str
) -> None:
    """No one will get the credential of a load disowned while under way when no caller waits for it (every
    caller left, or it was the cache's own rotation): its lease is revoked once, not kept unrenewed till it
    expires."""
    loader.answers["db"] = "creds"
    loader.lease_duration["db"] = 90
    cache = make_cache(loader, clock, leases)
    if load == "caller-left":
        loader.gate = asyncio.Event()
        caller = asyncio.create_task(cache.get(V, "db"))
        await settle()
        caller.cancel()
    else:
        await cache.get(V, "db")
        clock.advance(60)
        await cache.get(V, "db")
        leases.fail = BackendError("lease not found")  # the renewal fails: a new credential is loaded
        loader.gate = asyncio.Event()
        await cache.run_due()
        await settle()
    assert loader.calls["db"] == (1 if load == "caller-left" else 2)
    disown(cache, how)
    loader.gate.set()
    await settle()
    granted = f"database/creds/x/{loader.version}"
    assert leases.revoked == [granted]
    assert granted not in [lease.lease_id for _, lease in cache.leases.live()]
    kept = cache.peek(V, "db")  # a reload keeps what still follows from the chain: the credential before
    assert kept is None or (kept.lease is not None and kept.lease.lease_id != granted)
    revoked = {"backend": "b1", "outcome": "revoked"}
    assert cache._metrics.registry.get_sample_value("broker_lease_renewals_total", revoked) == 1


@pytest.mark.parametrize("how", ["invalidate", "reload"])
async def test_a_disowned_leased_load_a_caller_waits_for_keeps_its_lease(
    loader: ScriptedLoader, clock: FakeClock, leases: Leases, how: str
) -> None:
    """A credential handed to a caller is never revoked under it, even when another caller of the same load
    left: the lease lives on (until it expires, or shutdown revokes it)."""
    loader.answers["db"] = "creds"
    loader.lease_duration["db"] = 90
    loader.gate = asyncio.Event()
    cache = make_cache(loader, clock, leases)
    waiting = asyncio.create_task(cache.get(V, "db"))
    gone = asyncio.create_task(cache.get(V, "db"))
    await settle()
    gone.cancel()
    disown(cache, how)
    loader.gate.set()
    entry, status = await waiting
    await settle()
    assert (entry.value, status) == ("creds", Status.MISS) and entry.lease is not None
    assert leases.revoked == []
    assert [lease for _, lease in cache.leases.live()] == [entry.lease]
    assert cache.peek(V, "db") is None and loader.calls["db"] == 1


async def test_a_lease_granted_for_an_answer_that_cannot_be_served_is_given_back(
    loader: ScriptedLoader, clock: FakeClock, leases: Leases
) -> None:
    """The store granted a lease, then the answer could not be used (it does not fit the connection template,
    or is not a connection): the caller gets the error, and the lease is revoked once instead of expiring."""
    cache = make_cache(loader, clock, leases)
    failure = BackendError("b1:db: the secret has no key 'username' for the connection template")
    failure.lease = Lease("database/creds/x/unusable", 90, True, clock.now())
    failure.lease_holder = leases
    loader.answers["db"] = failure
    with pytest.raises(BackendError) as raised:
        await cache.get(V, "db")
    await settle()
    assert raised.value is failure
    assert leases.revoked == ["database/creds/x/unusable"] and cache.leases.live() == []
    assert (
        cache._metrics.registry.get_sample_value("broker_lease_renewals_total", {"backend": "b1", "outcome": "revoked"})
        == 1
    )


async def test_lost_lease_fetches_new_credential(loader: ScriptedLoader, clock: FakeClock, leases: Leases) -> None:
    loader.answers["db"] = "creds"
    loader.lease_duration["db"] = 90
    cache = make_cache(loader, clock, leases)
    await cache.get(V, "db")
    leases.fail = BackendError("lease not found")
    clock.advance(60)
    await cache.get(V, "db")
    await cache.run_due()
    await settle()
    assert loader.calls["db"] == 2


async def test_repr_never_shows_values(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["k"] = "super-secret-value"
    cache = make_cache(loader, clock)
    entry, _ = await cache.get(V, "k")
    assert "super-secret-value" not in repr(entry)
    assert "super-secret-value" not in repr(entry.resolved)


async def test_a_flood_of_unknown_names_does_not_evict_entries_in_use(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers.update({"hot1": "a", "hot2": "b"})
    cache = make_cache(loader, clock, max_entries=2, negative_max_entries=5)
    await value(cache, "hot1")
    await value(cache, "hot2")
    for i in range(50):
        with pytest.raises(SecretNotFound):
            await cache.get(V, f"unknown{i}")
    assert await value(cache, "hot1") == ("a", Status.HIT)
    assert await value(cache, "hot2") == ("b", Status.HIT)
    assert loader.calls["hot1"] == loader.calls["hot2"] == 1
    assert len(cache) == 2 + 5
    registry = cache._metrics.registry
    assert registry.get_sample_value("broker_cache_negative_entries") == 5
    assert registry.get_sample_value("broker_cache_events_total", {"event": "negative_eviction"}) == 45
    assert registry.get_sample_value("broker_cache_events_total", {"event": "eviction"}) is None
    # the newest negative entries are remembered, the oldest were let go
    with pytest.raises(SecretNotFound):
        await cache.get(V, "unknown49")
    assert loader.calls["unknown49"] == 1
    with pytest.raises(SecretNotFound):
        await cache.get(V, "unknown0")
    assert loader.calls["unknown0"] == 2


async def test_a_name_that_appears_leaves_the_negative_entries(loader: ScriptedLoader, clock: FakeClock) -> None:
    cache = make_cache(loader, clock)
    with pytest.raises(SecretNotFound):
        await cache.get(V, "late")
    loader.answers["late"] = "now"
    clock.advance(11)  # past negative_ttl
    assert await value(cache, "late") == ("now", Status.MISS)
    assert cache._metrics.registry.get_sample_value("broker_cache_negative_entries") == 0
    assert cache.invalidate(V, "late") == 1 and len(cache) == 0


async def test_cold_misses_load_at_miss_priority_and_refreshes_at_refresh(clock: FakeClock) -> None:
    from broker.ratelimit import PRIORITY, Priority

    seen: dict[str, list[Priority]] = {}

    async def load(kind: Kind, name: str, team: str | None = None) -> Resolved:
        seen.setdefault(name, []).append(PRIORITY.get())
        if name == "absent":
            raise SecretNotFound("no")
        return Resolved(value="v", backend="b1", version=None, lease=None, ttl=100.0, max_stale=50.0)

    cache = SecretCache(
        load,
        clock=clock,
        config=CacheConfig(ttl=100, refresh_ahead=0.75, refresh_jitter=0.0, max_stale=50, negative_ttl=10),
        leases=LeasesConfig(),
        metrics=Metrics(),
    )
    await cache.get(V, "k")  # cold
    clock.advance(80)  # past refresh-ahead: served, refreshed in the background
    await cache.get(V, "k")
    await settle()
    clock.advance(200)  # past fresh and stale: a client waits for it, but the entry was in use
    await cache.get(V, "k")
    for _ in range(2):  # cold, then cold again after the negative entry expires
        with pytest.raises(SecretNotFound):
            await cache.get(V, "absent")
        clock.advance(11)
    assert seen["k"] == [Priority.MISS, Priority.REFRESH, Priority.REFRESH]
    assert seen["absent"] == [Priority.MISS, Priority.MISS]


def lease_gauges(cache: SecretCache, backend: str = "b1") -> tuple[float, float]:
    metrics = cache._metrics
    return (
        metrics.registry.get_sample_value("broker_leases_active", {"backend": backend}) or 0.0,
        metrics.registry.get_sample_value("broker_lease_min_expiry_seconds", {"backend": backend}) or 0.0,
    )


async def test_lease_gauges_return_to_zero_when_the_last_lease_goes(
    loader: ScriptedLoader, clock: FakeClock, leases: Leases
) -> None:
    loader.answers.update(idle="x", expiring="y")
    loader.lease_duration.update(idle=300, expiring=300)
    cache = make_cache(loader, clock, leases, ttl=60)
    await cache.get(V, "idle")
    assert lease_gauges(cache) == (1.0, 300.0)
    clock.advance(201)  # idle past the limit: released and revoked
    await cache.run_due()
    await settle()
    assert leases.revoked and lease_gauges(cache) == (0.0, 0.0)
    await cache.get(V, "expiring")
    cache.invalidate(V, "expiring")  # no longer served; the lease lives on until it expires
    assert lease_gauges(cache)[0] == 1.0
    clock.advance(301)
    await cache.run_due()
    assert lease_gauges(cache) == (0.0, 0.0)


async def test_not_found_is_remembered_for_the_chains_negative_ttl(loader: ScriptedLoader, clock: FakeClock) -> None:
    loader.answers["short"] = NotFoundAnywhere("nope", negative_ttl=2.0)  # a backend asked says 2 s
    cache = make_cache(loader, clock, negative_ttl=10)
    for _ in range(3):
        with pytest.raises(SecretNotFound):
            await cache.get(V, "short")
    assert loader.calls["short"] == 1
    clock.advance(2.5)  # past the backend's 2 s, well inside the cache's 10 s
    with pytest.raises(SecretNotFound):
        await cache.get(V, "short")
    assert loader.calls["short"] == 2


async def test_an_entry_without_a_lease_or_failure_holds_no_side_object(
    loader: ScriptedLoader, clock: FakeClock
) -> None:
    loader.answers["k"] = "v"
    cache = make_cache(loader, clock)
    entry, _ = await cache.get(V, "k")
    assert entry.rare is None and entry.failures == 0 and entry.retry_at == 0.0 and not entry.lease_capped
    assert entry.last_access is entry.fetched_at  # not read since its fetch: no float of its own
    assert cache.hit(V, "k") is entry and entry.last_access is READ  # read: the float every read entry shares
    entry.failures += 1
    assert entry.rare is not None and entry.failures == 1 and entry.source is None


async def test_entries_with_the_same_ttl_stale_and_backend_share_one_tuple(
    loader: ScriptedLoader, clock: FakeClock
) -> None:
    loader.answers["a"] = loader.answers["b"] = "v"
    cache = make_cache(loader, clock)
    a, _ = await cache.get(V, "a")
    b, _ = await cache.get(V, "b")
    assert a.terms is b.terms
    a.ttl = 5.0  # one entry's change (a renewed lease) is its own
    assert a.ttl == 5.0 and b.ttl != 5.0 and a.stale == b.stale and a.backend == b.backend


def test_a_read_entry_stays_filed_under_its_own_key_string() -> None:
    """A lookup spells its key anew; the LRU keeps the entry's own string, so a read holds no second copy."""
    lru = _LRU(4, lambda entry: None)
    entry = Entry(
        spelled=spelled((V, "k", None)), head=b"", terms=(1.0, 0.0, None), fetched_at=0, refresh_in=0, last_access=0
    )
    lru.put(entry)
    assert lru.get((V, "k", None)) is entry
    assert [text for text in lru._recent] == [entry.spelled] and next(iter(lru._recent)) is entry.spelled
