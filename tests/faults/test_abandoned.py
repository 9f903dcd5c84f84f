"""Clients that disconnect mid-request leave nothing behind: with the store stalled, 30 clients send a lookup
and hang up; once the store answers again, no request is still in flight, the client connections are gone
(unix-socket descriptors back to the idle count; connections to the store stay within the pool's bound) and
the broker serves normally."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from broker.backends.rest import POOL_LIMIT
from tests.load.conftest import fd_kinds
from tests.servers.stores import Harness, value_of
from tests.support.broker_process import BrokerProcess, wait_for

pytestmark = pytest.mark.integration


def test_abandoned_requests_leave_no_stuck_task(harnesses: dict[str, Harness], tmp_path: Any) -> None:
    harness = harnesses["vault"]
    broker = BrokerProcess({"backends": [harness.config(timeout=3, retries=0)]}, tmp_path).start()
    try:
        assert broker.get("variable", "cached")[1]["value"] == value_of("vault", "cached")
        assert broker.proc is not None
        pid = broker.proc.pid
        idle = fd_kinds(pid)
        harness.proxy.set("stall")
        for i in range(30):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(broker.socket_path)
                sock.sendall(f"GET /v1/variables/k{i % 10} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                time.sleep(0.01)
        wait_for(lambda: broker.metric("broker_requests_in_flight") >= 1, 10, what="lookups in flight")
        harness.proxy.set("pass")
        wait_for(lambda: broker.metric("broker_requests_in_flight") == 0, 20, what="no request left in flight")
        wait_for(lambda: fd_kinds(pid)["unix"] == idle["unix"], 20, what="client connections closed")
        after = fd_kinds(pid)
        assert after["tcp"] <= idle["tcp"] + POOL_LIMIT and after["file"] == idle["file"], (idle, after)
        assert broker.get("variable", "k11")[1]["value"] == value_of("vault", "k11")
    finally:
        harness.proxy.set("pass")
        broker.stop()
