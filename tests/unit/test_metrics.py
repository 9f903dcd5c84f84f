"""SharedGauge: one series per backend over every source that writes it, combined at scrape time; the fast
path's hit tallies: what they add to the registry equals observing every hit one by one."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from broker.backends.base import Kind
from broker.metrics import LATENCY_BUCKETS, Metrics, SharedGauge, soonest_expiry


def reading(metrics: Metrics, name: str, backend: str = "vault") -> float | None:
    return metrics.registry.get_sample_value(name, {"backend": backend})


@pytest.mark.parametrize(
    ("values", "soonest"),
    [
        ([600.0], 600.0),
        ([-1.0], -1.0),  # does not expire
        ([-1.0, 300.0, 600.0], 300.0),  # one that never expires does not hide one that does
        ([0.0, -1.0], 0.0),  # expired
    ],
)
def test_soonest_expiry(values: list[float], soonest: float) -> None:
    assert soonest_expiry(values) == soonest


@pytest.mark.parametrize(
    ("attribute", "gauge", "a", "b", "combined"),
    [
        ("backend_up", "broker_backend_up", 1, 0, 0),  # up only when every partition's backend is
        ("circuit_open", "broker_backend_circuit_open", 0, 1, 1),  # open when any partition's circuit is
        ("identity_expiry", "broker_identity_expiry_seconds", 600, 300, 300),
        ("identity_expiry", "broker_identity_expiry_seconds", -1, 300, 300),
        ("leases_active", "broker_leases_active", 3, 1, 4),
        ("lease_expiry", "broker_lease_min_expiry_seconds", 600, 120, 120),
    ],
)
def test_each_gauge_combines_its_sources(attribute: str, gauge: str, a: float, b: float, combined: float) -> None:
    metrics = Metrics()
    shared: SharedGauge = getattr(metrics, attribute)
    first, second = object(), object()
    shared.set(first, "vault", a)
    assert reading(metrics, gauge) == a  # one source (sidecar mode): its own value
    shared.set(second, "vault", b)
    assert reading(metrics, gauge) == combined
    shared.withdraw(second, "vault")
    assert reading(metrics, gauge) == a


def test_the_series_goes_with_its_last_source_unless_it_has_an_idle_reading() -> None:
    metrics = Metrics()
    up = SharedGauge(Gauge("up", "", ["backend"], registry=metrics.registry), min)
    count = SharedGauge(Gauge("count", "", ["backend"], registry=metrics.registry), sum, idle=0.0)
    source = object()
    up.set(source, "vault", 1)
    count.set(source, "vault", 2)
    up.withdraw(source, "vault")
    count.withdraw(source, "vault")
    up.withdraw(object(), "vault")  # a source that never wrote: nothing to forget
    assert reading(metrics, "up") is None
    assert reading(metrics, "count") == 0
    up.set(source, "vault", 0)  # the series comes back with a new source
    assert reading(metrics, "up") == 0


def test_an_unlabelled_gauge_reads_the_sum_of_its_sources() -> None:
    metrics = Metrics()
    first, second = object(), object()
    metrics.cache_entries.set(first, None, 5)
    assert metrics.registry.get_sample_value("broker_cache_entries") == 5  # one cache (sidecar mode): its own
    metrics.cache_entries.set(second, None, 2)
    metrics.cache_entries.set(first, None, 4)
    assert metrics.registry.get_sample_value("broker_cache_entries") == 6
    metrics.cache_entries.withdraw(first, None)
    metrics.cache_entries.withdraw(second, None)
    assert metrics.registry.get_sample_value("broker_cache_entries") == 0


def test_an_unlabelled_gauge_without_an_idle_reading_is_refused_when_built() -> None:
    registry = CollectorRegistry()
    with pytest.raises(ValueError, match="SharedGauge entries: a gauge without labels needs an idle reading"):
        SharedGauge(Gauge("entries", "", registry=registry), sum)
    held = SharedGauge(Gauge("held", "", registry=registry), sum, idle=0.0)
    source = object()
    held.set(source, None, 3)
    held.withdraw(source, None)
    assert registry.get_sample_value("held") == 0


def test_a_function_is_read_at_each_scrape() -> None:
    metrics = Metrics()
    left = [300.0]
    metrics.lease_expiry.set(object(), "vault", lambda: left[0])
    assert reading(metrics, "broker_lease_min_expiry_seconds") == 300
    left[0] = 120.0
    assert reading(metrics, "broker_lease_min_expiry_seconds") == 120


DURATIONS = [0.00005, 0.0001, 0.0001000001, 0.0004, 0.003, 0.7, 10.0, 12.5, *LATENCY_BUCKETS]


def exposition(metrics: Metrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return [
        line
        for line in text.splitlines()
        if line.startswith(("broker_requests_total{", "broker_request_duration_seconds_")) and "_created" not in line
    ]


@pytest.mark.parametrize("collect_between", [False, True])
def test_a_tally_exports_what_observing_each_hit_would(collect_between: bool) -> None:
    tallied, observed = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    tally = tallied.hit_tally("variable")
    for i, seconds in enumerate(DURATIONS):
        tally.add(seconds)
        observed.requests.labels("variable", "hit").inc()
        observed.request_latency.labels("variable").observe(seconds)
        if collect_between and i % 3 == 0:
            exposition(tallied)
    assert exposition(tallied) == exposition(observed)
    assert tallied.registry.get_sample_value("broker_requests_total", {"kind": "variable", "outcome": "hit"}) == len(
        DURATIONS
    )
    assert exposition(tallied) == exposition(observed)  # a second collection adds nothing


def test_a_tally_is_one_per_kind() -> None:
    metrics = Metrics(CollectorRegistry())
    assert metrics.hit_tally("variable") is metrics.hit_tally("variable")
    assert metrics.hit_tally("variable") is not metrics.hit_tally("connection")


def test_cache_hits_are_counted_on_collection() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.cache_hits.count += 3
    assert metrics.registry.get_sample_value("broker_cache_events_total", {"event": "hit"}) == 3
    metrics.cache_hits.count += 1
    assert metrics.registry.get_sample_value("broker_cache_events_total", {"event": "hit"}) == 4


def test_labels_answers_the_series_the_library_would() -> None:
    metrics = Metrics()
    first = metrics.backend_calls.labels("vault", "fetch", "ok")
    assert metrics.backend_calls.labels("vault", "fetch", "ok") is first
    assert metrics.backend_calls.labels(backend="vault", operation="fetch", outcome="ok") is first
    assert metrics.requests.labels(Kind.VARIABLE, "hit") is metrics.requests.labels("variable", "hit")
    assert metrics.rate_limit_wait.labels(5) is metrics.rate_limit_wait.labels("5")
    first.inc(2)
    assert (
        metrics.registry.get_sample_value(
            "broker_backend_calls_total", {"backend": "vault", "operation": "fetch", "outcome": "ok"}
        )
        == 2
    )
    for wrong in [lambda: metrics.backend_calls.labels("vault"), lambda: first.labels("vault", "fetch", "ok")]:
        with pytest.raises(ValueError):
            wrong()
    with pytest.raises(ValueError):
        metrics.inflight.labels("x")
