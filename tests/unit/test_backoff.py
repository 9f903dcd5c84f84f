"""The one backoff rule: exponential, capped, full jitter, floors, injected randomness and sleep."""

from __future__ import annotations

import random

import pytest

from broker.backoff import Backoff


def test_delays_are_full_jitter_under_a_doubling_capped_ceiling() -> None:
    b = Backoff(0.1, 2.0, rng=random.Random(3))
    assert [b.ceiling(a) for a in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert b.ceiling(10_000) == 2.0  # no float overflow however long a store stays down
    delays = {a: [b.delay(a) for _ in range(200)] for a in range(8)}
    for attempt, drawn in delays.items():
        assert all(0.0 <= d <= b.ceiling(attempt) for d in drawn)
        # full jitter: draws spread over the whole range, not around the ceiling
        assert min(drawn) < b.ceiling(attempt) * 0.1 and max(drawn) > b.ceiling(attempt) * 0.9
    assert len({d for drawn in delays.values() for d in drawn}) == 1600


def test_floor_and_retry_after() -> None:
    b = Backoff(1.0, 30.0, floor=0.5, rng=random.Random(1))
    assert min(b.delay(0) for _ in range(500)) >= 0.5  # a loop cannot spin
    assert b.delay(0, retry_after=4.0) >= 4.0  # the store said when
    assert b.delay(20, retry_after=90.0) == 90.0  # even past the cap
    assert b.delay(-3) <= 1.0  # a negative attempt is the first


def test_same_seed_same_schedule() -> None:
    one, two = Backoff(1, 30, rng=random.Random(9)), Backoff(1, 30, rng=random.Random(9))
    assert [one.delay(a) for a in range(10)] == [two.delay(a) for a in range(10)]


async def test_wait_uses_the_injected_sleep() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    b = Backoff(1.0, 8.0, rng=random.Random(2), sleep=sleep)
    waited = [await b.wait(a) for a in range(5)]
    assert slept == waited and all(0 <= w <= 8.0 for w in waited)


@pytest.mark.parametrize(("base", "cap", "floor"), [(0, 1, 0), (1, 1, 2), (1, 1, -1)])
def test_nonsense_is_refused(base: float, cap: float, floor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base, cap, floor=floor)
