"""A SIGHUP's reload through ``Broker.reload``: the config file re-read, an invalid one refused with the key named
and the running config kept, new backends started (and retried) once each, retired ones closed once they hold no
lease, and every lease revoked through the backend that granted it at shutdown. Fake stores, a fake clock, no
listener and no network."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.app import Broker
from broker.backends.base import Kind
from broker.backends.guard import Guard
from broker.clock import FakeClock
from broker.config import load_config
from tests.support.fake_store import Backend as FakeBackend
from tests.support.fake_store import use_fake_store
from tests.support.polling import until

V = Kind.VARIABLE
A = {"name": "a", "type": "fake", "values": {"x": "1"}}
B = {"name": "b", "type": "fake", "values": {"y": "2"}, "lease": 60}


def fake(guard: Guard) -> FakeBackend:
    backend = guard.backend
    assert isinstance(backend, FakeBackend)
    return backend


class Harness:
    def __init__(self, path: Path, clock: FakeClock) -> None:
        self.path = path
        self.clock = clock
        self.broker: Broker | None = None

    def write(self, *backends: dict[str, Any], **top: Any) -> None:
        doc = {"listen": {"socket": str(self.path.parent / "b.sock")}, "metrics": {"listen": None}}
        doc["shutdown"] = {"drain_delay": 0, "grace": 1}
        self.path.write_text(yaml.safe_dump({**doc, **top, "backends": list(backends)}))

    async def start(self, *backends: dict[str, Any], **top: Any) -> Broker:
        """A broker on this chain whose backends are starting (as ``Broker.start`` does, without listeners)."""
        self.write(*backends, **top)
        broker = Broker(load_config(self.path), self.path, clock=self.clock)

        async def no_wait(_: float) -> None:
            await asyncio.sleep(0)

        broker.backoff.sleep = no_wait
        self.broker = broker
        broker._spawn(broker._start_backends(broker.state.guards), "backend-start")
        return broker

    async def reload(self, *backends: dict[str, Any], **top: Any) -> bool:
        assert self.broker is not None
        self.write(*backends, **top)
        return await self.broker.reload()


@pytest.fixture
async def harness(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Harness]:
    use_fake_store(monkeypatch)
    h = Harness(tmp_path / "broker.yaml", FakeClock())
    yield h
    if h.broker is not None:
        await h.broker.stop()


def started(broker: Broker) -> bool:
    return all(g.started for g in broker.state.guards)


# ---------------------------------------------------------------------------------------------- invalid configs


@pytest.mark.parametrize(
    ("new", "error"),
    [
        ([A, {**B, "bogus": 1}], "backends[1].bogus: unknown key"),
        ([A, {**B, "name": "a"}], "backends[1].name: duplicate backend name 'a' (also backends[0])"),
        ([{**A, "timeout": 0}], "backends[0].timeout: "),
        ([{**A, "type": "nosuch"}], "backends[0].type: unknown backend type 'nosuch'"),
        ([], "backends: expected a non-empty list of backends"),
    ],
    ids=["unknown-key", "duplicate-name", "bad-bound", "unknown-type", "no-backends"],
)
async def test_an_invalid_config_is_refused_naming_the_key_and_the_old_one_kept(
    harness: Harness, caplog: pytest.LogCaptureFixture, new: list[dict[str, Any]], error: str
) -> None:
    broker = await harness.start(A, B)
    await until(lambda: started(broker), "backends started")
    config, guards = broker.state.config, list(broker.state.guards)
    with caplog.at_level(logging.ERROR, logger="broker"):
        assert await harness.reload(*new) is False
    assert broker.state.config is config
    assert broker.state.guards == guards
    assert all(fake(g).closes == 0 for g in guards)
    [record] = [r for r in caplog.records if r.getMessage().startswith("reload refused")]
    assert any(e.startswith(error) for e in record.errors), record.errors  # type: ignore[attr-defined]
    assert broker.state.metrics.reloads.labels("invalid")._value.get() == 1
    entry, _ = await broker.state.cache.get(V, "x")  # still serving from the running chain
    assert entry.value == "1"


async def test_a_yaml_syntax_error_names_the_line(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    broker = await harness.start(A)
    config = broker.state.config
    harness.path.write_text("backends: [\n")
    with caplog.at_level(logging.ERROR, logger="broker"):
        assert await broker.reload() is False
    assert broker.state.config is config
    [record] = [r for r in caplog.records if r.getMessage().startswith("reload refused")]
    assert "invalid YAML" in record.errors[0] and "line 2" in record.errors[0]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- starts


async def test_a_new_backend_that_fails_to_start_is_retried_until_it_does(harness: Harness) -> None:
    broker = await harness.start(A)
    await until(lambda: started(broker), "a started")
    # retries: 0, so the broker's start loop (not the guard's own retries, which really wait) tries again.
    assert await harness.reload(A, {**B, "start_failures": 3, "start_blocks": True, "retries": 0}) is True
    b = broker.state.guards[1]
    assert broker.state.not_ready_reasons() == ["backend b: not started", "prefetch list not warm yet"]
    fake(b).release.set()
    await until(lambda: b.started, "b started after its failed logins")
    assert fake(b).starts == 4 and fake(b).most_starting == 1
    assert fake(broker.state.guards[0]).starts == 1  # the kept backend is not logged in again
    await until(lambda: broker.state.not_ready_reasons() == [], "ready")


async def test_a_kept_backend_still_starting_is_started_once(harness: Harness) -> None:
    broker = await harness.start({**A, "start_blocks": True}, B)
    a = broker.state.guards[0]
    await until(lambda: fake(a).starts == 1, "a's login under way")
    assert await harness.reload({**A, "start_blocks": True}, {**B, "setting": "2"}) is True
    assert broker.state.guards[0] is a
    await until(lambda: broker.state.guards[1].started, "the new b started")
    fake(a).release.set()
    await until(lambda: a.started, "a started")
    assert (fake(a).starts, fake(a).most_starting) == (1, 1)


async def test_a_backend_retired_while_starting_stops_logging_in_and_is_closed(harness: Harness) -> None:
    broker = await harness.start({**A, "start_blocks": True})
    a = broker.state.guards[0]
    await until(lambda: fake(a).starts == 1, "a's login under way")
    assert await harness.reload({**A, "name": "a2"}) is True
    await until(lambda: fake(a).closes == 1, "the retired a closed")
    fake(a).release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert fake(a).starts == 1 and not a.started
    assert fake(a).after_close == []
    await until(lambda: started(broker), "a2 started")


# ---------------------------------------------------------------------------------------------- leases


SHAPES = {
    "renamed": [A, {**B, "name": "c"}],
    "removed": [A],
    "reordered": [B, A],
    "changed": [A, {**B, "setting": "2"}],
    "unchanged": [A, B],
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_every_reload_shape_then_shutdown_revokes_each_lease_through_its_backend(
    harness: Harness, shape: str
) -> None:
    broker = await harness.start(A, B)
    await until(lambda: started(broker), "backends started")
    entry, _ = await broker.state.cache.get(V, "y")
    assert entry.lease is not None
    lease_id = entry.lease.lease_id
    granting = broker.state.guards[1]
    built = [g for g in broker.state.guards]
    assert await harness.reload(*SHAPES[shape]) is True
    built += [g for g in broker.state.guards if g not in built]
    await until(lambda: len(broker._tasks) <= 1, "reload's starts and closes done")
    assert fake(granting).closes == 0  # open while its lease lives, whatever the reload did
    in_chain = granting in broker.state.guards
    assert broker.state.retired == ([] if in_chain else [granting])

    await broker.stop()
    harness.broker = None
    assert fake(granting).revoked == [lease_id]
    assert all(fake(g).revoked == [] for g in built if g is not granting)
    assert {g.name: fake(g).closes for g in built} == {g.name: 1 for g in built}  # each closed once
    assert all(fake(g).after_close == [] for g in built)
    assert broker.state.retired == []
    assert broker.state.cache.leases.live() == []


async def test_a_retired_backend_is_closed_when_its_last_lease_expires(harness: Harness) -> None:
    broker = await harness.start(A, B)
    await until(lambda: started(broker), "backends started")
    await broker.state.cache.get(V, "y")
    old_b = broker.state.guards[1]
    assert await harness.reload(A, {**B, "name": "c"}) is True
    assert broker.state.retired == [old_b] and fake(old_b).closes == 0
    harness.clock.advance(30)
    await broker.state.cache.run_due()
    assert fake(old_b).closes == 0  # the lease still lives
    harness.clock.advance(31)
    await broker.state.cache.run_due()  # prunes the expired lease
    await until(lambda: fake(old_b).closes == 1, "the retired b closed")
    assert broker.state.retired == []
    assert broker.state.metrics.registry.get_sample_value("broker_leases_active", {"backend": "b"}) == 0
    await broker.stop()
    harness.broker = None
    assert fake(old_b).closes == 1 and fake(old_b).revoked == []  # expired: nothing to give back
    assert fake(old_b).after_close == []


async def test_a_retired_backend_with_two_leases_stays_open_until_both_are_gone(harness: Harness) -> None:
    broker = await harness.start(A, {**B, "values": {"y": "2", "z": "3"}})
    await until(lambda: started(broker), "backends started")
    await broker.state.cache.get(V, "y")
    harness.clock.advance(20)
    await broker.state.cache.get(V, "z")  # granted 20 s later: expires 20 s later
    old_b = broker.state.guards[1]
    assert await harness.reload(A) is True
    harness.clock.advance(45)
    await broker.state.cache.run_due()
    for _ in range(10):
        await asyncio.sleep(0)
    assert fake(old_b).closes == 0 and broker.state.retired == [old_b]
    harness.clock.advance(30)
    await broker.state.cache.run_due()
    await until(lambda: fake(old_b).closes == 1, "the retired b closed")


async def test_a_start_loop_that_crashes_is_logged_and_the_others_go_on(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = await harness.start(A)
    await until(lambda: started(broker), "a started")
    start_loop = broker._start_loop

    async def crash_for_c(guard: Guard) -> None:
        if guard.name == "c":
            raise RuntimeError("bug")
        await start_loop(guard)

    monkeypatch.setattr(broker, "_start_loop", crash_for_c)
    with caplog.at_level(logging.ERROR, logger="broker"):
        assert await harness.reload(A, B, {"name": "c", "type": "fake"}) is True
        await until(lambda: broker.state.prefetched, "prefetch done after the crash")
    assert broker.state.guards[1].started
    [record] = [r for r in caplog.records if r.getMessage() == "backend start crashed"]
    assert record.backend == "c"  # type: ignore[attr-defined]


@pytest.mark.parametrize("leased", [False, True], ids=["plain", "leased"])
async def test_a_backend_retired_during_a_read_is_closed_after_it(harness: Harness, leased: bool) -> None:
    old = {**B, "fetch_blocks": True, "lease": 60 if leased else None}
    broker = await harness.start(A, old)
    await until(lambda: started(broker), "backends started")
    b = broker.state.guards[1]
    read = asyncio.ensure_future(broker.state.cache.get(V, "y"))
    await until(lambda: fake(b).fetches == ["y"], "the read under way")
    assert await harness.reload(A, {**B, "name": "c"}) is True
    for _ in range(10):
        await asyncio.sleep(0)
    assert fake(b).closes == 0  # not while the read is under way
    fake(b).answer.set()
    await read
    if leased:
        # The read granted a lease: b stays open for it, and is closed when it expires.
        await until(lambda: broker.state.retired == [b], "b kept for its lease")
        harness.clock.advance(61)
        await broker.state.cache.run_due()
    await until(lambda: fake(b).closes == 1, "b closed")
    assert fake(b).after_close == []


async def test_shutdown_during_a_read_through_a_retired_backend_closes_it_once(harness: Harness) -> None:
    broker = await harness.start(A, {**B, "fetch_blocks": True})
    await until(lambda: started(broker), "backends started")
    b = broker.state.guards[1]
    read = asyncio.ensure_future(broker.state.cache.get(V, "y"))
    await until(lambda: fake(b).fetches == ["y"], "the read under way")
    assert await harness.reload(A) is True
    await broker.stop()  # the read never answers: the cache cancels it, then b is closed
    harness.broker = None
    assert read.done()
    assert fake(b).closes == 1 and fake(b).after_close == []


async def test_prefetch_warms_the_list_for_every_team_a_caller_is_served_as(harness: Harness) -> None:
    listen = {
        "socket": str(harness.path.parent / "b.sock"),
        "team": "shared",
        "peer_teams": [{"uid": 50001, "team": "etl"}, {"uid": 50002, "team": "science"}, {"gid": 60000, "team": "etl"}],
    }
    broker = await harness.start(A, multi_team=True, listen=listen, prefetch={"variables": ["x", "x"]})
    await until(lambda: broker.state.prefetched, "prefetch warm")
    teams = ["shared", "etl", "science"]  # listen.team, then each peer team once
    assert broker.state.prefetch_keys() == [(V, "x", team) for team in teams]
    for team in teams:
        entry = broker.state.cache.peek(V, "x", team)
        assert entry is not None and entry.value == "1", team
    assert broker.state.cache.peek(V, "x") is None  # no caller is served with no team
    assert fake(broker.state.guards[0]).fetches == ["x"] * 3  # one load per team, none twice


@pytest.mark.parametrize("waiting", [True, False], ids=["read-waiting", "reader-left"])
async def test_a_read_that_reaches_a_backend_after_its_retirement_finds_it_open(
    harness: Harness, waiting: bool
) -> None:
    """A read begun before a reload walks the old chain: it may reach a retired backend only after the reload.
    That backend is closed once such reads are done, never under them, and a lease it grants is renewed or
    revoked through it while it is still open."""
    broker = await harness.start({**A, "fetch_blocks": True}, B)
    await until(lambda: started(broker), "backends started")
    a, b = broker.state.guards
    read = asyncio.ensure_future(broker.state.cache.get(V, "y"))
    await until(lambda: fake(a).fetches == ["y"], "the read under way at a")
    assert await harness.reload({**A, "fetch_blocks": True}) is True
    for _ in range(10):
        await asyncio.sleep(0)
    assert fake(b).closes == 0  # a read of the old chain may still need it
    if not waiting:
        read.cancel()
    fake(a).answer.set()  # not found at a: the read goes on to b
    if waiting:
        entry, _ = await read
        assert entry.value == "2" and entry.lease is not None
        await until(lambda: broker.state.retired == [b], "b kept for the lease it granted")
        await broker.stop()
        harness.broker = None
        assert fake(b).revoked == [entry.lease.lease_id]
    else:
        await until(lambda: fake(b).closes == 1, "b closed once its lease was revoked")
        assert len(fake(b).revoked) == 1
    assert fake(b).closes == 1 and fake(b).after_close == []
