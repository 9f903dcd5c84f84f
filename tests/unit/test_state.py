"""The reload plan (``BrokerState.apply``): for each shape of a new chain, which backends are kept as the same
objects, which are built, which are retired (and kept open while they hold a lease), and which cached answers
survive. Fake stores on our own Backend base class; no network, a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broker.backends.base import BrokerError, Kind
from broker.backends.guard import Guard
from broker.clock import FakeClock
from broker.config import BrokerConfig, validate_config
from broker.state import BrokerState
from tests.support.fake_store import Backend as FakeBackend
from tests.support.fake_store import use_fake_store

V = Kind.VARIABLE
A = {"name": "a", "type": "fake", "values": {"x": "1"}}
B = {"name": "b", "type": "fake", "values": {"y": "2"}}


def config(*backends: dict[str, Any], **top: Any) -> BrokerConfig:
    return validate_config(
        {"listen": {"socket": "/unused/b.sock"}, "metrics": {"listen": None}, **top, "backends": list(backends)}
    )


def fake(guard: Guard) -> FakeBackend:
    backend = guard.backend
    assert isinstance(backend, FakeBackend)
    return backend


@pytest.fixture
async def make_state(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[[BrokerConfig], BrokerState]]:
    use_fake_store(monkeypatch)
    made: list[BrokerState] = []

    def make(cfg: BrokerConfig) -> BrokerState:
        state = BrokerState(cfg, clock=FakeClock())
        made.append(state)
        return state

    yield make
    for state in made:
        await state.cache.aclose(revoke_leases=False)
        state.executor.shutdown(wait=True)


async def warm(state: BrokerState) -> None:
    """A found answer from each backend, and one id no backend has (remembered as not found)."""
    await state.cache.get(V, "x")
    await state.cache.get(V, "y")
    with pytest.raises(BrokerError):
        await state.cache.get(V, "nope")


def cached(state: BrokerState) -> set[str]:
    return {name for name in ("x", "y", "nope") if state.cache.peek(V, name) is not None}


async def test_an_unchanged_config_keeps_every_backend_and_entry(make_state: Any) -> None:
    state = make_state(config(A, B))
    before = list(state.guards)
    await warm(state)
    change = state.apply(config(A, B))  # an equal config, freshly parsed
    assert (change.kept, change.fresh, change.retired, change.dropped) == (["a", "b"], [], [], 0)
    assert all(new is old for new, old in zip(state.guards, before, strict=True))
    assert state.resolver.guards == before
    assert cached(state) == {"x", "y", "nope"}
    assert change.restart_needed == []


SHAPES = [
    # id, new chain, kept, built, retired, cached answers that survive
    ("changed", [A, {**B, "setting": "2"}], ["a"], ["b"], ["b"], {"x"}),
    ("first-changed", [{**A, "setting": "2"}, B], ["b"], ["a"], ["a"], set()),
    ("renamed", [A, {**B, "name": "c"}], ["a"], ["c"], ["b"], {"x"}),
    ("removed", [A], ["a"], [], ["b"], {"x"}),
    ("reordered", [B, A], ["a", "b"], [], [], set()),  # b now answers first: a's answers could be shadowed
    ("added", [A, B, {"name": "c", "type": "fake"}], ["a", "b"], ["c"], [], {"x", "y"}),
]


@pytest.mark.parametrize(
    ("new", "kept", "built", "retired", "survivors"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES]
)
async def test_reload_shapes(
    make_state: Any,
    new: list[dict[str, Any]],
    kept: list[str],
    built: list[str],
    retired: list[str],
    survivors: set[str],
) -> None:
    state = make_state(config(A, B))
    old = {g.name: g for g in state.guards}
    await warm(state)
    change = state.apply(config(*new))
    by_name = {g.name: g for g in state.guards}
    assert [g.name for g in state.guards] == [b["name"] for b in new]
    assert state.resolver.guards == state.guards  # the new chain, in the new order
    assert change.kept == kept
    assert sorted(n for n in by_name if n in old and by_name[n] is old[n]) == kept  # the same objects
    assert [g.name for g in change.fresh] == built
    assert all(g not in old.values() for g in change.fresh)
    assert [g.name for g in change.retired] == retired
    assert all(g is old[g.name] for g in change.retired)
    # A remembered "not found" holds only while the whole chain is the same; found answers only while every
    # backend in front of the one that answered is.
    assert cached(state) == survivors
    assert change.dropped == 3 - len(survivors)
    assert state.prefetched is False  # the prefetch list is warmed again for the new chain


async def test_values_after_a_reload_come_from_the_new_chain(make_state: Any) -> None:
    state = make_state(config(A, B))
    await warm(state)
    state.apply(config(A, {**B, "values": {"y": "new"}}))
    entry, _ = await state.cache.get(V, "y")
    assert entry.value == "new"
    assert fake(state.guards[1]).fetches == ["y"]


async def test_a_kept_backend_still_starting_is_not_started_again(make_state: Any) -> None:
    state = make_state(config({**A, "start_blocks": True}, B))
    a = state.guards[0]
    assert not a.started  # its start loop is under way (blocked at login)
    change = state.apply(config({**A, "start_blocks": True}, {**B, "setting": "2"}))
    assert change.kept == ["a"]
    assert [g.name for g in change.fresh] == ["b"]  # only what this reload built


async def test_a_retired_backend_holding_a_lease_stays_open_until_released(make_state: Any) -> None:
    state = make_state(config(A, {**B, "lease": 60}))
    await warm(state)
    old_b = state.guards[1]
    assert state.cache.leases.holders() == {old_b}
    change = state.apply(config(A, {**B, "name": "c", "lease": 60}))
    assert change.retired == [old_b]
    assert state.retire(change.retired) == []  # not closed: the lease is renewed or revoked through it
    assert state.retired == [old_b]
    assert [name for name, _ in state.cache.leases.live()] == ["b"]
    assert state.retire(change.retired) == [] and state.retired == [old_b]  # retired once
    assert state.released(state.guards[0]) is None  # a backend in the chain is never handed back
    assert state.released(old_b) is old_b
    assert state.retired == []


async def test_a_retired_backend_without_a_lease_is_closed_at_once(make_state: Any) -> None:
    state = make_state(config(A, {**B, "lease": 60}))
    await state.cache.get(V, "x")
    change = state.apply(config({**A, "name": "a2"}, {**B, "lease": 60}))
    assert state.retire(change.retired) == change.retired
    assert state.retired == []


@pytest.mark.parametrize(
    ("top", "needs_restart"),
    [
        ({"threads": 4}, ["threads"]),
        ({"metrics": {"listen": "127.0.0.1:9999"}}, ["metrics"]),
        ({"listen": {"socket": "/unused/other.sock"}}, ["listen"]),
        ({"audit": {"enabled": True}}, ["audit"]),
        ({"cache": {"max_entries": 5}}, ["cache.max_entries"]),
        ({"cache": {"negative_max_entries": 5}}, ["cache.negative_max_entries"]),
        ({"cache": {"ttl": 5}}, []),  # applied at once
        ({"leases": {"renew_at": 0.5}}, []),
    ],
)
async def test_sections_read_only_at_start_are_named(
    make_state: Any, top: dict[str, Any], needs_restart: list[str]
) -> None:
    state = make_state(config(A))
    new = config(A, **top)
    change = state.apply(new)
    assert change.restart_needed == needs_restart
    assert change.kept == ["a"]
    assert state.config is new
    assert state.cache.config == new.cache and state.cache.leases_config == new.leases


@pytest.mark.parametrize("answer", ["found", "missing"])
async def test_a_read_under_way_through_the_old_chain_is_served_not_kept(make_state: Any, answer: str) -> None:
    state = make_state(config(A, {**B, "fetch_blocks": True}))
    b = fake(state.guards[1])
    name = "y" if answer == "found" else "nope"
    read = asyncio.ensure_future(state.cache.get(V, name))
    while not b.fetches:
        await asyncio.sleep(0)
    state.apply(config(A, {**B, "values": {"y": "new"}}))
    b.answer.set()
    if answer == "found":
        entry, _ = await read
        assert entry.value == "2"  # the caller asked before the reload: it gets the old chain's answer
    else:
        with pytest.raises(BrokerError):
            await read
    assert state.cache.peek(V, name) is None  # but the new chain answers the next read
    if answer == "found":
        assert (await state.cache.get(V, name))[0].value == "new"


async def test_a_read_asked_after_a_reload_does_not_join_one_through_the_old_chain(make_state: Any) -> None:
    state = make_state(config(A, {**B, "fetch_blocks": True}))
    b = fake(state.guards[1])
    read = asyncio.ensure_future(state.cache.get(V, "y"))
    while not b.fetches:
        await asyncio.sleep(0)
    state.apply(config(A, {**B, "values": {"y": "new"}}))
    assert (await state.cache.get(V, "y"))[0].value == "new"  # while the old chain's read is still held
    b.answer.set()
    assert (await read)[0].value == "2"
    entry = state.cache.peek(V, "y")
    assert entry is not None and entry.value == "new"  # the old chain's answer, arriving last, is not kept
