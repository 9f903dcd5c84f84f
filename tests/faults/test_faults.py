"""Faults between the broker and every networked backend type: refused connections, resets, stalls, answers
cut in the middle, 5xx and throttling. Each backend gets its own broker and proxy; the scenarios run side by
side. For each fault: cached keys keep being served (zero failed client requests), an uncached key is answered
503/504 (never a hang, never "not found"), and the broker recovers when the fault clears, without a restart.
Then the circuit breaker: with the store failing, the proxy sees a bounded number of attempts however many
clients ask, and one probe after the cool-down.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.servers.stores import Harness, planted_values, value_of
from tests.support.broker_process import wait_for
from tests.support.figures import report

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAULTS = ("refuse", "reset", "stall", "cut", "error", "throttle")
TIMEOUT = 1.0  # per attempt
RETRIES = 1
THRESHOLD = 3
COOLDOWN = 2.0
CLIENT_TIMEOUT = 30.0  # far above what the broker may take: a hang would show as a client timeout


def fault_config(harness: Harness) -> dict[str, Any]:
    backend = harness.config(
        timeout=TIMEOUT,
        retries=RETRIES,
        circuit_breaker={"threshold": THRESHOLD, "cooldown": COOLDOWN, "max_cooldown": COOLDOWN * 2},
    )
    return {"cache": {"ttl": 1, "max_stale": 300, "refresh_ahead": 0, "negative_ttl": 1}, "backends": [backend]}


def get(broker: Any, name: str) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    status, body, _ = broker.request("GET", f"/v1/variables/{name}", timeout=CLIENT_TIMEOUT)
    return status, body, time.monotonic() - started


def fresh(broker: Any, harness: Harness) -> bool:
    status, body, _ = get(broker, "cached")
    return status == 200 and body.get("cache") in ("miss", "hit", "refreshed")


def scenario(harness: Harness, broker: Any) -> dict[str, Any]:
    store = harness.name
    uncached = iter(harness.keys[1:])
    figures: dict[str, Any] = {}
    status, body, _ = get(broker, "cached")
    assert (status, body.get("value")) == (200, value_of(store, "cached")), (store, status, body)
    for fault in FAULTS:
        harness.proxy.set(fault)
        served, failed, stale = 0, 0, 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            status, body, _ = get(broker, "cached")
            if status == 200 and body.get("value") == value_of(store, "cached"):
                served += 1
                stale += body.get("cache") == "stale"
            else:
                failed += 1
            time.sleep(0.05)
        status, body, took = get(broker, next(uncached))
        assert failed == 0, f"{store}/{fault}: {failed} failed cached requests"
        assert status in (503, 504), f"{store}/{fault}: uncached key answered {status} {body}"
        assert body["error"] in ("backend_unavailable", "backend_timeout"), (store, fault, body)
        harness.proxy.set("pass")
        wait_for(lambda: fresh(broker, harness), timeout=40, interval=0.2, what=f"{store} recovery after {fault}")
        figures[fault] = {"served": served, "stale": stale, "uncached_status": status, "uncached_s": round(took, 2)}
    return figures


def circuit(harness: Harness, broker: Any) -> dict[str, Any]:
    """Store failing (5xx): many clients, few attempts; one probe after the cool-down; closes on recovery."""
    store = harness.name
    wait_for(lambda: broker.metric("broker_backend_circuit_open", backend=harness.backend["name"]) == 0, 30)
    harness.proxy.set("error")
    before = harness.proxy.counts()[0]
    statuses = [get(broker, f"k{i % 4}")[0] for i in range(40)]
    during = harness.proxy.counts()[0] - before
    assert set(statuses) <= {503, 504}, (store, statuses)
    # Without a breaker: 40 requests x (1 + RETRIES) attempts. With it: the threshold, then fail-fast.
    assert during <= THRESHOLD * (RETRIES + 1) + 2, f"{store}: {during} attempts reached a dead store"
    assert broker.metric("broker_backend_circuit_open", backend=harness.backend["name"]) == 1
    assert broker.metric("broker_backend_calls_total", backend=harness.backend["name"], outcome="circuit_open") > 0
    time.sleep(COOLDOWN * 2 + 0.5)  # past the longest cool-down a failed probe may have set
    before_probe = harness.proxy.counts()[0]
    get(broker, "k5")
    probes = harness.proxy.counts()[0] - before_probe
    assert 1 <= probes <= RETRIES + 1, f"{store}: {probes} probe attempts"
    harness.proxy.set("pass")
    wait_for(lambda: get(broker, "k6")[0] == 200, timeout=40, interval=0.3, what=f"{store} circuit closes")
    assert broker.metric("broker_backend_circuit_open", backend=harness.backend["name"]) == 0
    return {"client_requests": 40, "attempts_with_circuit": during, "probe_attempts": probes}


def test_every_backend_survives_every_fault(broker_factory: Any, harnesses: dict[str, Harness]) -> None:
    brokers = {name: broker_factory(fault_config(h), env=h.env) for name, h in harnesses.items()}

    def run(name: str) -> dict[str, Any]:
        harness, broker = harnesses[name], brokers[name]
        try:
            return {"faults": scenario(harness, broker), "circuit": circuit(harness, broker)}
        finally:
            harness.proxy.set("pass")

    with ThreadPoolExecutor(len(brokers)) as pool:
        results = dict(zip(brokers, pool.map(run, brokers), strict=True))
    for name, result in results.items():
        faults = result["faults"]
        served = sum(f["served"] for f in faults.values())
        report(
            f"faults {name}",
            f"{len(faults)} faults survived, {served} cached requests served during them (0 failed), "
            f"uncached answered {sorted({f['uncached_status'] for f in faults.values()})} in at most "
            f"{max(f['uncached_s'] for f in faults.values())} s; circuit: {result['circuit']}",
        )
        logs = brokers[name].logs()
        for value in planted_values():
            assert value not in logs, f"{name}: a planted secret value reached the log"
        # retries stayed inside the budget: never more attempts per fetch than 1 + retries
        attempts = brokers[name].metric("broker_backend_calls_total", backend=harnesses[name].backend["name"])
        assert attempts > 0
