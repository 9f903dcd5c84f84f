"""200 concurrent clients for BROKER_LOAD_SECONDS (60 by default) on the unix socket against a real broker
over files and OpenBao, mixing hits, misses (real OpenBao reads), not-founds and bad requests: no 5xx, every
error a JSON 4xx, no descriptor left behind, bounded RSS growth. Figures are printed in the run's summary."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker.backends.rest import POOL_LIMIT
from tests.load.conftest import COLD_KEYS, HOT_KEYS, fd_kinds, files_backend, rss_mib, vault_backend
from tests.load.loadgen import Tally, client, get
from tests.servers.openbao import OpenBao
from tests.support.broker_process import wait_for
from tests.support.figures import report

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 200
SECONDS = float(os.environ.get("BROKER_LOAD_SECONDS", "60"))
BAD = [
    ("bad", get("/v1/variables/..%2F..%2Fetc%2Fpasswd")),
    ("bad", get("/v1/variables/" + "x" * 300)),
    ("bad", get("/v1/nothing/here")),
    ("bad", b"DELETE /v1/variables/file1 HTTP/1.1\r\nHost: broker\r\n\r\n"),
    ("bad", get("/v1/variables/a%00b")),
]


def request_mix(client_id: int) -> Any:
    def next_request(n: int) -> tuple[str, bytes]:
        slot = (client_id + n) % 20
        if slot < 10:  # hits on a small hot set, both backends
            key = f"file{n % HOT_KEYS}" if slot % 2 else f"kv{n % HOT_KEYS}"
            return "hit", get(f"/v1/variables/{key}")
        if slot < 13:  # not found: new names keep arriving (negative entries, LRU-bounded)
            return "not_found", get(f"/v1/variables/absent-{client_id}-{n}")
        if slot < 16:  # a cold set too large to stay fresh with a 2 s TTL: most of these are read from OpenBao
            return "miss", get(f"/v1/variables/cold{(client_id * 7919 + n * 31) % COLD_KEYS}")
        label, raw = BAD[n % len(BAD)]
        return label, raw

    return next_request


async def run_clients(socket_path: str, seconds: float, on_warm: Any) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    tasks = [asyncio.create_task(client(socket_path, request_mix(i), until, tally)) for i in range(CLIENTS)]
    await asyncio.sleep(min(10.0, seconds / 3))
    on_warm()
    await asyncio.gather(*tasks)
    return tally


def test_sustained_mixed_load(broker_factory: Any, bao: OpenBao, tmp_path: Path) -> None:
    config = {
        "listen": {"max_connections": 1000, "max_concurrency": 1000},
        "cache": {"ttl": 2, "max_entries": 20_000},
        "backends": [vault_backend(bao, tmp_path), files_backend(tmp_path)],
    }
    broker = broker_factory(config)
    pid = broker.proc.pid
    assert broker.get("variable", "kv1")[0] == 200
    idle, rss_idle = fd_kinds(pid), rss_mib(pid)
    reads_before = broker.metric("broker_backend_calls_total", backend="vault", outcome="ok")
    warm: dict[str, Any] = {}

    def on_warm() -> None:
        warm["rss"], warm["fds"] = rss_mib(pid), fd_kinds(pid)

    tally = asyncio.run(run_clients(broker.socket_path, SECONDS, on_warm))

    def settled() -> Counter[str] | None:  # the descriptors once the clients' connections are closed
        kinds = fd_kinds(pid)
        return kinds if kinds["unix"] <= idle["unix"] else None

    after = wait_for(settled, 10, what="client connections closed")
    rss_after = rss_mib(pid)
    store_reads = broker.metric("broker_backend_calls_total", backend="vault", outcome="ok") - reads_before

    by_label: dict[str, dict[int, int]] = {}
    for (label, status), n in tally.statuses.items():
        by_label.setdefault(label, {})[status] = n
    assert not tally.errors, f"connection failures under load: {dict(tally.errors)}"
    assert all(status < 500 for _, status in tally.statuses), by_label
    assert set(by_label["hit"]) == {200} and set(by_label["miss"]) == {200}, by_label
    assert set(by_label["not_found"]) == {404}, by_label
    assert set(by_label["bad"]) <= {400, 404, 405, 414}, by_label
    assert tally.non_json_errors == 0
    # The misses really reached OpenBao: far more reads than the hot and cold sets hold.
    assert store_reads > 2 * (HOT_KEYS + COLD_KEYS), store_reads
    # Every client connection is closed again; the only descriptors beyond the idle set are kept-alive
    # connections to OpenBao, which the pool bounds whatever the number of requests served.
    assert after["unix"] == idle["unix"], (idle, after)
    assert after["tcp"] <= idle["tcp"] + POOL_LIMIT, (idle, after)
    for kind in ("file", "pipe", "anon", "socket"):
        assert after[kind] == idle[kind], (kind, idle, after)
    assert rss_after - warm["rss"] < 40, (warm["rss"], rss_after)
    assert tally.total > CLIENTS * 10

    def fds(kinds: Counter[str]) -> str:
        return f"{kinds.total()} ({kinds['unix']} unix, {kinds['tcp']} tcp)"

    report(
        "load",
        f"{CLIENTS} clients x {SECONDS:.0f} s: {tally.total} requests ({tally.total / SECONDS:.0f} req/s), "
        f"p50 {tally.percentile(0.5) * 1000:.1f} ms, p99 {tally.percentile(0.99) * 1000:.1f} ms, 0 5xx, "
        f"{store_reads:.0f} OpenBao reads, statuses {by_label}; "
        f"fds idle {fds(idle)}, under load {fds(warm['fds'])}, after {fds(after)} (pool limit {POOL_LIMIT}); "
        f"RSS idle {rss_idle:.1f} MiB, warm {warm['rss']:.1f} MiB, end {rss_after:.1f} MiB",
    )
