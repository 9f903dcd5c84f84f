"""A lookup storm against SSM (moto behind the counting proxy) with a per-store rate limit.

2,000 lookups over 500 distinct names in about 2 s, ``rate_limit: {per_second: 20}``: the store sees at most
the limit over the elapsed time plus the burst; the values in use are refreshed before they expire (served
as fresh hits throughout); nothing that exists is answered "not found" because of the limit; no value is
evicted; and after the storm the values in use are still cached.

Nothing here depends on how fast this machine is: ``cache.max_entries`` has room for every value the storm
can fetch (so which values stay cached is not a race between hot reads and cold loads in the LRU), and the
values in use are due for refresh 1 s after they were fetched but expire only after 4 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from tests.integration.aws.conftest import ssm_backend, static_env
from tests.servers.aws_proxy import AwsProxy
from tests.support.broker_process import BrokerProcess, wait_for
from tests.support.figures import report
from tests.support.leakcheck import plant

GET = "AmazonSSM.GetParameter"
RATE, BURST = 20, 10
HOT = [f"hot{i}" for i in range(4)]
EXISTING = [f"exists{i}" for i in range(100)]
UNKNOWN = [f"unknown{i}" for i in range(500 - len(HOT) - len(EXISTING))]
LOOKUPS, SECONDS = 2000, 2.0
TTL, REFRESH_AHEAD = 4.0, 0.25  # refresh due 1 s after a fetch, 3 s before the value expires


def hot_value(name: str) -> str:
    return f"storm-hot-value-{name}-5e1d"


@pytest.fixture(scope="module")
def storm_parameters(moto_proxy: AwsProxy) -> None:
    ssm = moto_proxy.ssm  # type: ignore[attr-defined]
    for name in HOT:
        ssm.put_parameter(Name=f"/airflow/variables/{name}", Value=hot_value(name), Type="SecureString")
    for name in EXISTING:
        ssm.put_parameter(Name=f"/airflow/variables/{name}", Value=f"storm-cold-{name}", Type="SecureString")
    plant("aws storm", *(hot_value(n) for n in HOT))


def storm_names() -> list[str]:
    """Every fourth lookup is a value in use; the rest walk the 496 cold names."""
    cold = EXISTING + UNKNOWN
    return [HOT[(i // 4) % len(HOT)] if i % 4 == 0 else cold[i % len(cold)] for i in range(LOOKUPS)]


def run_storm(broker: BrokerProcess, names: list[str]) -> list[tuple[str, int, str]]:
    """(name, status, error code or cache state) per lookup. Open loop: each lookup is sent at its time
    over ``SECONDS`` whether or not earlier ones were answered, as a storm of task processes would."""

    async def storm() -> list[tuple[str, int, str]]:
        connector = aiohttp.UnixConnector(path=broker.socket_path, limit=400)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.05

            async def one(i: int) -> tuple[str, int, str]:
                await asyncio.sleep(max(0.0, start + i * SECONDS / len(names) - loop.time()))  # pacing only
                async with session.get(f"http://broker/v1/variables/{quote(names[i])}") as resp:
                    body = await resp.json()
                    return names[i], resp.status, body.get("error") or body.get("cache", "")

            return await asyncio.gather(*(one(i) for i in range(len(names))))

    return asyncio.run(storm())


def test_storm_is_held_to_the_limit_and_values_in_use_stay_fresh(
    broker_factory: Any, proxy: AwsProxy, storm_parameters: None, tmp_path: Path
) -> None:
    backend = ssm_backend(
        ttl=TTL,
        rate_limit={"per_second": RATE, "burst": BURST, "max_wait": 1.0},
    )
    audit = tmp_path / "audit.jsonl"
    broker = broker_factory(
        {
            "audit": {"enabled": True, "output": str(audit)},
            "backends": [backend],
            "cache": {
                "refresh_ahead": REFRESH_AHEAD,
                "refresh_jitter": 0.0,
                "max_entries": 2 * (len(HOT) + len(EXISTING)),
                "negative_max_entries": 8,
                "negative_ttl": 60,
            },
        },
        env=static_env(proxy),
    )
    for name in HOT:
        assert broker.get("variable", name)[1]["value"] == hot_value(name)
    started = time.monotonic()  # before the count starts, so the bound on store calls covers all of it
    proxy.reset()
    results = run_storm(broker, storm_names())
    store_calls = proxy.calls[GET]
    elapsed = time.monotonic() - started

    assert len(results) == LOOKUPS
    outcomes = Counter((("hot" if n in HOT else "exists" if n in EXISTING else "unknown"), s) for n, s, _ in results)
    # the store saw no more than the limit allows over the storm, and the limit was really met
    assert store_calls <= RATE * elapsed + BURST, (store_calls, elapsed)
    refused = broker.metric("broker_rate_limited_total", backend="ssm", priority="miss", outcome="refused")
    answered_429 = outcomes[("exists", 429)] + outcomes[("unknown", 429)]
    assert 0 < refused <= answered_429  # clients waiting on one refused load (single-flight) share its 429
    # values in use: refreshed in the background before they expired, so every read was a fresh hit
    hot = [r for r in results if r[0] in HOT]
    assert {(status, cache) for _, status, cache in hot} == {(200, "hit")}, Counter((s, c) for _, s, c in hot)
    # each was refreshed during the storm (its refresh, started by a read in the storm, may still be under way)
    wait_for(
        lambda: all(proxy.calls_by_id[f"/airflow/variables/{n}"] >= 1 for n in HOT),
        timeout=30,
        what="a refresh of every value in use",
    )
    # no value was pushed out of the cache (the unknown names are remembered in the negative LRU only)
    assert broker.metric("broker_cache_events_total", event="eviction") == 0
    # the limit is never "not found": existing names are found or refused, unknown ones not found or refused
    assert {s for (group, s) in outcomes if group == "exists"} <= {200, 429}
    assert {s for (group, s) in outcomes if group == "unknown"} <= {404, 429}
    assert all(cache == "overloaded" for _, status, cache in results if status == 429)
    # after the storm the values in use are still cached
    for name in HOT:
        status, data = broker.get("variable", name)
        assert status == 200 and data["cache"] == "hit"
    assert broker.metric("broker_cache_negative_entries") <= 8
    # the audit trail has exactly one line per lookup, and the refusals in it as overloaded, never not_found
    total = len(HOT) * 2 + LOOKUPS

    def audited() -> list[dict[str, Any]] | None:
        found = [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []
        return found if len(found) >= total else None

    trail = wait_for(audited, what="one audit line per lookup")
    assert len(trail) == total
    storm = Counter((x["outcome"], x["name"] in EXISTING) for x in trail[len(HOT) : len(HOT) + LOOKUPS])
    assert storm[("overloaded", True)] + storm[("overloaded", False)] == answered_429
    assert storm[("not_found", True)] == 0
    report(
        "rate-limit storm",
        f"{LOOKUPS} lookups over {len(HOT) + len(EXISTING) + len(UNKNOWN)} names in {elapsed:.2f}s at "
        f"per_second={RATE}, burst={BURST}: {store_calls} store calls (bound {RATE * elapsed + BURST:.0f}), "
        f"{int(refused)} refused 429, hot reads {len(hot)} all fresh hits, outcomes {dict(sorted(outcomes.items()))}",
    )
