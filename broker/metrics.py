"""Prometheus metrics on one injected registry. Labels are bounded: backend, kind, outcome, never a secret name."""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Hashable
from typing import TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Info
from prometheus_client.metrics_core import Metric

from broker import __version__

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BACKEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_M = TypeVar("_M")


def soonest_expiry(seconds_left: list[float]) -> float:
    """The soonest of several expiries in seconds, where -1 is "does not expire" (-1 only when none does)."""
    expiring = [s for s in seconds_left if s >= 0]
    return min(expiring) if expiring else -1.0


class _KnownChildren:
    """``labels()`` answers a series already made for these values, as given, from the parent's own table of
    them. prometheus_client's ``labels()`` builds the values' tuple anew with ``tuple()`` over a generator,
    which sizes it for ten items and shrinks it: each one made so comes from no free list and goes to one when
    freed, so the interpreter's free lists of 1-, 2- and 3-item tuples fill to their bound of 2,000 each
    (about 350 KiB held) while the secrets being cached grow; it also costs a lock and several calls per
    update. New series, and values that are not the strings of an existing one, take the library's path."""

    def labels(self: _M, *labelvalues: object, **labelkwargs: object) -> _M:
        if not labelkwargs:
            children: dict[tuple[object, ...], _M] | None = getattr(self, "_metrics", None)
            if children is not None:
                child = children.get(labelvalues)
                if child is not None:
                    return child
        return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc, no-any-return]


class Counter(_KnownChildren, prometheus_client.Counter):
    pass


class Gauge(_KnownChildren, prometheus_client.Gauge):
    pass


class Histogram(_KnownChildren, prometheus_client.Histogram):
    pass


class SharedGauge:
    """A gauge labelled by backend that several sources write: in node mode every identity partition builds
    its own backends under the same names, so each guard, token source and lease keeper keeps its own value
    here and the series reads ``combine`` over them when Prometheus scrapes. A source that closes withdraws
    its value. With no source left the series reads ``idle``, or is removed when ``idle`` is None. With one
    source (sidecar mode) the series reads that source's value. No label names the partition: it would grow
    with the service accounts, and name them.

    A gauge without labels (each partition's cache writes the entry counts) is written with ``backend``
    None; it needs an ``idle`` reading, since its one series cannot be removed. Raises ValueError without one.
    """

    def __init__(self, gauge: Gauge, combine: Callable[[list[float]], float], *, idle: float | None = None) -> None:
        if idle is None and not gauge._labelnames:
            raise ValueError(
                f"SharedGauge {gauge._name}: a gauge without labels needs an idle reading (its one series cannot "
                "be removed when its last source withdraws)"
            )
        self.gauge = gauge
        self._combine = combine
        self._idle = idle
        self._values: dict[str | None, dict[Hashable, float | Callable[[], float]]] = {}

    def set(self, source: Hashable, backend: str | None, value: float | Callable[[], float]) -> None:
        """``source``'s value for ``backend``: a number, or a function read at each scrape."""
        values = self._values.get(backend)
        if values is None:
            values = self._values[backend] = {}
            series = self.gauge if backend is None else self.gauge.labels(backend)
            series.set_function(lambda: self._read(backend))
        values[source] = value

    def withdraw(self, source: Hashable, backend: str | None) -> None:
        """Forget ``source``'s value for ``backend`` (a source that never set one is ignored)."""
        values = self._values.get(backend)
        if values is None or values.pop(source, None) is None:
            return
        if not values and self._idle is None:
            del self._values[backend]
            self.gauge.remove(backend)

    def _read(self, backend: str | None) -> float:
        values = tuple(self._values.get(backend, {}).values())
        if not values:
            return self._idle or 0.0
        return self._combine([value() if callable(value) else value for value in values])


class CountTally:
    """A counter's increments kept as a plain integer on the event loop, added to the counter whenever the
    registry is collected (for the hottest counts: a Prometheus counter takes a lock and several calls)."""

    __slots__ = ("_counter", "count")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self.count = 0

    def flush(self) -> None:
        if self.count:
            self._counter.inc(self.count)
            self.count = 0


class HitTally:
    """Requests answered on the fast path for one kind, counted in plain integers on the event loop and added
    to ``broker_requests_total{outcome="hit"}`` and ``broker_request_duration_seconds`` whenever the registry
    is collected: a Prometheus counter or histogram takes a lock and several calls for each update."""

    __slots__ = ("_bounds", "_buckets", "_counter", "_histogram", "_sum", "count")

    def __init__(self, counter: Counter, histogram: Histogram) -> None:
        self._counter = counter
        self._histogram = histogram
        self._bounds = (*LATENCY_BUCKETS, float("inf"))
        self._buckets = [0] * len(self._bounds)
        self._sum = 0.0
        self.count = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self._sum += seconds
        self._buckets[bisect_left(self._bounds, seconds)] += 1  # the first bucket whose bound is >= seconds

    def flush(self) -> None:
        if not self.count:
            return
        self._counter.inc(self.count)
        # Histogram has no public way to add many observations at once; these are its own value cells.
        self._histogram._sum.inc(self._sum)
        for cell, n in zip(self._histogram._buckets, self._buckets, strict=True):
            if n:
                cell.inc(n)
        self._buckets = [0] * len(self._bounds)
        self._sum = 0.0
        self.count = 0


class _FlushTallies:
    """Registered before every metric, so each collection adds the tallies first."""

    def __init__(self) -> None:
        self.tallies: list[CountTally | HitTally] = []

    def collect(self) -> list[Metric]:
        for tally in self.tallies:
            tally.flush()
        return []


class Metrics:
    """Every metric the broker exports. Build one per process (tests build their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._tallies = _FlushTallies()
        r.register(self._tallies)
        self._hit_tallies: dict[str, HitTally] = {}
        self.build_info = Info("broker_build", "Version of the running broker.", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        self.requests = Counter(
            "broker_requests_total",
            "Secrets API requests by kind and outcome (hit, miss, stale, refreshed, or an error code).",
            ["kind", "outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "broker_request_duration_seconds",
            "Secrets API request latency, from routing to the response being ready.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("broker_requests_in_flight", "Secrets API requests being served.", registry=r)
        self.rejected = Counter(
            "broker_rejected_total",
            "Requests or connections refused at the edge, by reason.",
            ["reason"],
            registry=r,
        )
        self.cache_events = Counter(
            "broker_cache_events_total",
            "Cache events: hit, miss, stale, negative_hit, refresh, refresh_failed, eviction, negative_eviction.",
            ["event"],
            registry=r,
        )
        self.cache_hits = CountTally(self.cache_events.labels("hit"))
        self._tallies.tallies.append(self.cache_hits)
        self.cache_entries = SharedGauge(
            Gauge(
                "broker_cache_entries",
                "Entries held in the cache (including negative; node mode: in every partition's cache).",
                registry=r,
            ),
            sum,
            idle=0.0,
        )
        self.cache_negative_entries = SharedGauge(
            Gauge(
                "broker_cache_negative_entries",
                "Names remembered as not found (bounded by cache.negative_max_entries, apart from max_entries; "
                "node mode: in every partition's cache).",
                registry=r,
            ),
            sum,
            idle=0.0,
        )
        self.backend_calls = Counter(
            "broker_backend_calls_total",
            "Calls to secret stores by backend, operation (fetch, renew, revoke, login, check) and outcome.",
            ["backend", "operation", "outcome"],
            registry=r,
        )
        self.backend_latency = Histogram(
            "broker_backend_call_duration_seconds",
            "Latency of one call (one attempt) to a secret store.",
            ["backend", "operation"],
            buckets=BACKEND_BUCKETS,
            registry=r,
        )
        self.backend_up = SharedGauge(
            Gauge(
                "broker_backend_up",
                "1 when the backend's last call succeeded or answered authoritatively (node mode: in every "
                "identity partition).",
                ["backend"],
                registry=r,
            ),
            min,
        )
        self.circuit_open = SharedGauge(
            Gauge(
                "broker_backend_circuit_open",
                "1 while the backend's circuit breaker is open (calls fail fast; node mode: in any partition).",
                ["backend"],
                registry=r,
            ),
            max,
        )
        self.leases_active = SharedGauge(
            Gauge("broker_leases_active", "Leases held for dynamic secrets.", ["backend"], registry=r), sum, idle=0.0
        )
        self.lease_renewals = Counter(
            "broker_lease_renewals_total",
            "Lease renewals by outcome (ok, capped, failed, rotated, revoked).",
            ["backend", "outcome"],
            registry=r,
        )
        self.lease_expiry = SharedGauge(
            Gauge(
                "broker_lease_min_expiry_seconds",
                "Seconds until the soonest held lease expires.",
                ["backend"],
                registry=r,
            ),
            min,
            idle=0.0,
        )
        self.identity_expiry = SharedGauge(
            Gauge(
                "broker_identity_expiry_seconds",
                "Seconds until the backend's login token or cloud credential expires (-1 when it does not "
                "expire; node mode: the soonest of any partition).",
                ["backend"],
                registry=r,
            ),
            soonest_expiry,
        )
        self.logins = Counter(
            "broker_logins_total",
            "Logins / credential refreshes by backend and outcome.",
            ["backend", "outcome"],
            registry=r,
        )
        self.rate_limited = Counter(
            "broker_rate_limited_total",
            "Calls to a store that met its rate_limit, by priority (refresh, miss) and outcome (waited, refused).",
            ["backend", "priority", "outcome"],
            registry=r,
        )
        self.rate_limit_wait = Histogram(
            "broker_rate_limit_wait_seconds",
            "Time a call to a store waited for its rate_limit.",
            ["backend"],
            buckets=BACKEND_BUCKETS,
            registry=r,
        )
        self.audit_lines = Counter("broker_audit_lines", "Audit lines written to the audit stream.", registry=r)
        self.audit_dropped = Counter(
            "broker_audit_dropped",
            "Audit lines lost, by reason (queue_full, or the write error such as ENOSPC, EBADF, EPIPE).",
            ["reason"],
            registry=r,
        )
        self.audit_failing = Gauge("broker_audit_failing", "1 while the audit stream cannot be written.", registry=r)
        self.ready = Gauge("broker_ready", "1 when /readyz answers 200.", registry=r)
        self.reloads = Counter("broker_config_reloads_total", "Config reloads by outcome.", ["outcome"], registry=r)
        self.node_identities = Gauge(
            "broker_node_identities", "Node mode: identity partitions alive (one per service account).", registry=r
        )
        self.node_auth = Counter(
            "broker_node_auth_total",
            "Node mode: pod token verifications by outcome (ok, unauthorized, forbidden, unavailable, overloaded).",
            ["outcome"],
            registry=r,
        )
        self.node_released = Counter(
            "broker_node_identities_released_total", "Node mode: identity partitions closed for idleness.", registry=r
        )

    def hit_tally(self, kind: str) -> HitTally:
        """The fast path's tally of hits for ``kind`` (one per kind, shared by every listener)."""
        tally = self._hit_tallies.get(kind)
        if tally is None:
            tally = HitTally(self.requests.labels(kind, "hit"), self.request_latency.labels(kind))
            self._hit_tallies[kind] = tally
            self._tallies.tallies.append(tally)
        return tally
