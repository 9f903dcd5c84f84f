"""The cache against a reference model: random sequences of store answers, clock moves and reads.

The oracle is the contract, not the implementation: a read either makes a backend call (and then answers
what the store said, or stale within bounds when the store failed) or makes none (and then it is a fresh
hit, a remembered "not found", or a stale value inside the retry back-off after a failure).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from broker.backends.base import AccessDenied, BackendUnavailable, BrokerError, Kind, SecretNotFound
from broker.cache import SecretCache, Status
from broker.clock import FakeClock
from broker.config import CacheConfig, LeasesConfig
from broker.metrics import Metrics
from broker.resolver import Resolved

TTL, MAX_STALE, NEGATIVE_TTL, MAX_ENTRIES = 10.0, 20.0, 5.0, 2
KEYS = ["a", "b"]
ANSWERS = st.one_of(st.sampled_from(["v1", "v2", "v3"]), st.sampled_from(["not_found", "down", "denied"]))


@dataclass
class Known:
    """What the model knows about a key's cache entry."""

    value: str | None  # None: remembered as not found
    fetched: float
    failed_since: bool = False


class CacheModel(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.answers = dict.fromkeys(KEYS, "not_found")
        self.calls = 0
        self.known: dict[str, Known] = {}
        config = CacheConfig(
            ttl=TTL, max_stale=MAX_STALE, negative_ttl=NEGATIVE_TTL, refresh_ahead=0, max_entries=MAX_ENTRIES
        )

        async def loader(kind: Kind, name: str, team: str | None = None) -> Resolved:
            self.calls += 1
            answer = self.answers[name]
            if answer == "not_found":
                raise SecretNotFound("nf")
            if answer == "down":
                raise BackendUnavailable("down")
            if answer == "denied":
                raise AccessDenied("denied")
            return Resolved(answer, "b", None, None, TTL, MAX_STALE)

        self.cache = SecretCache(
            loader, clock=self.clock, config=config, leases=LeasesConfig(), metrics=Metrics(), rng=random.Random(0)
        )

    def teardown(self) -> None:
        if hasattr(self, "loop"):
            self.loop.run_until_complete(self.cache.aclose(revoke_leases=False))
            self.loop.close()

    @rule(key=st.sampled_from(KEYS), answer=ANSWERS)
    def store_changes(self, key: str, answer: str) -> None:
        self.answers[key] = answer

    @rule(seconds=st.sampled_from([0.5, 3.0, 6.0, 11.0, 25.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(key=st.sampled_from(KEYS))
    def invalidate(self, key: str) -> None:
        self.cache.invalidate(Kind.VARIABLE, key)
        self.known.pop(key, None)

    @rule(key=st.sampled_from(KEYS))
    def read(self, key: str) -> None:
        now = self.clock.now()
        before = self.calls
        known = self.known.get(key)
        if self.cache.peek(Kind.VARIABLE, key) is None:
            known = self.known.pop(key, None) and None  # evicted by the LRU bound: the model forgets it too
        try:
            entry, status = self.loop.run_until_complete(self.cache.get(Kind.VARIABLE, key))
            got: str | BrokerError = entry.resolved.value if entry.resolved else "?"
        except BrokerError as exc:
            got, status = exc, None
        called = self.calls > before
        assert self.calls - before <= 1, "one read made more than one backend call"
        if called:
            answer = self.answers[key]
            if answer in ("v1", "v2", "v3"):
                assert got == answer and status in (Status.MISS, Status.REFRESHED)
                self.known[key] = Known(answer, now)
            elif answer == "not_found":
                assert isinstance(got, SecretNotFound)
                self.known[key] = Known(None, now)
            elif answer == "denied":
                assert isinstance(got, AccessDenied)
                self.known.pop(key, None)
            else:  # the store is down: stale within bounds, else the error, never "not found"
                assert not isinstance(got, SecretNotFound)
                if known is not None and known.value is not None and now < known.fetched + TTL + MAX_STALE:
                    assert got == known.value and status is Status.STALE
                    known.failed_since = True
                else:
                    assert isinstance(got, BackendUnavailable)
        else:
            assert known is not None, "no backend call for a key the cache cannot know"
            if now < known.fetched + (NEGATIVE_TTL if known.value is None else TTL):
                if known.value is None:
                    assert isinstance(got, SecretNotFound)
                else:
                    assert got == known.value and status is Status.HIT
            else:
                # only a value, only inside max_stale, only after a failed refresh
                assert known.value is not None and known.failed_since and got == known.value
                assert status is Status.STALE and now < known.fetched + TTL + MAX_STALE

    @invariant()
    def bounded(self) -> None:
        if hasattr(self, "cache"):
            assert len(self.cache) <= MAX_ENTRIES


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(
    max_examples=400, stateful_step_count=50, deadline=None, derandomize=False, database=None
)
