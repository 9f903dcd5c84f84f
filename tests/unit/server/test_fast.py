"""The fast path on its own: a FastProtocol over a fake transport, a real cache, a loader that counts."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from broker.backends.base import Kind
from broker.server import EDGE, build_api_app
from broker.server.edge import EdgePolicy
from broker.server.fast import FastFront, FastProtocol
from tests.support.server_state import recording_state

TOKEN = b"f" * 32


class Transport:
    """What FastProtocol needs of a transport; keeps what was written."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock
        self.written = b""
        self.closed = False
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Inner(asyncio.Protocol):
    """Stands in for aiohttp's request handler: keeps what it was handed."""

    def __init__(self) -> None:
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.data += data


def make_state(tmp_path: Path, **listen: Any) -> Any:
    return recording_state(tmp_path, multi_team="team" in listen or "peer_teams" in listen, **listen)


def front_for(state: Any, tcp_token: bytes | None = None) -> FastFront:
    app = build_api_app(state, tcp_token=tcp_token)
    policy: EdgePolicy = app[EDGE]
    return FastFront(state, policy=policy)


def connect(front: FastFront, sock: socket.socket | None = None) -> tuple[FastProtocol, Transport, Inner]:
    inner = Inner()
    proto = front.protocol(lambda: inner)
    transport = Transport(sock)
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport, inner


def answers(raw: bytes) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers["Content-Length"])
        out.append((int(lines[0].split()[1]), headers, json.loads(raw[:length])))
        raw = raw[length:]
    return out


async def settle(proto: FastProtocol) -> None:
    for _ in range(100):
        if proto.pending is None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the slow lookup did not finish")


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *extra]) + "\r\n\r\n").encode()


async def test_a_miss_then_hits_in_order_with_one_load(tmp_path: Path) -> None:
    st = make_state(tmp_path)
    proto, transport, inner = connect(front_for(st))
    proto.data_received(get("/v1/variables/k") + get("/v1/variables/k", "X-Request-Id: two"))
    await settle(proto)
    await settle(proto)
    (s1, h1, b1), (s2, h2, b2) = answers(transport.written)
    assert (s1, b1["cache"], s2, b2["cache"]) == (200, "miss", 200, "hit")
    assert b1["value"] == b2["value"] == "None:k" and h2["X-Request-Id"] == "two" and len(h1["X-Request-Id"]) == 16
    assert h2["X-Broker-Cache"] == "hit" and h2["Cache-Control"] == "no-store"
    assert st.loads == [("k", None)] and inner.data == b""
    assert st.audit.lines == [("variable", "k", "found", None)] * 2
    st.executor.shutdown(wait=False)


async def test_a_bound_listener_serves_its_hits_on_the_fast_path(tmp_path: Path) -> None:
    st = make_state(tmp_path, team="alpha")
    await st.cache.get(Kind.CONNECTION, "db", "alpha")
    proto, transport, inner = connect(front_for(st))
    proto.data_received(get("/v1/connections/db") + get("/v1/connections/db?team=alpha"))
    assert proto.pending is None  # both answered at once: no lookup task
    assert [(s, b["value"], b["cache"]) for s, _, b in answers(transport.written)] == [(200, "alpha:db", "hit")] * 2
    assert st.metrics.registry.get_sample_value("broker_requests_total", {"kind": "connection", "outcome": "hit"}) == 2
    assert st.audit.lines == [("connection", "db", "found", "alpha")] * 2
    transport.written = b""
    proto.data_received(get("/v1/connections/db?team=gamma"))
    await settle(proto)
    ((status, _, body),) = answers(transport.written)
    assert (status, body["error"]) == (403, "forbidden")
    assert st.loads == [("db", "alpha")]  # the other team's secret was never looked up
    assert st.audit.lines[-1] == ("connection", "db", "denied", "gamma")
    assert st.metrics.rejected.labels("team_denied")._value.get() == 1
    assert inner.data == b""  # refused by the same lookup() the application uses, not handed off
    st.executor.shutdown(wait=False)


async def test_a_peer_bound_by_uid_gets_its_team(tmp_path: Path, unix_pair: socket.socket) -> None:
    st = make_state(tmp_path, team="alpha", peer_teams=[{"uid": os.getuid(), "team": "beta"}])
    proto, transport, _ = connect(front_for(st), unix_pair)
    proto.data_received(get("/v1/variables/v"))
    await settle(proto)
    proto.data_received(get("/v1/variables/v?team=beta") + get("/v1/variables/v?team=alpha"))
    await settle(proto)
    got = [(s, b.get("value"), b.get("error")) for s, _, b in answers(transport.written)]
    assert got == [(200, "beta:v", None), (200, "beta:v", None), (403, None, "forbidden")]
    assert st.loads == [("v", "beta")]
    st.executor.shutdown(wait=False)


@pytest.mark.parametrize(
    "request_bytes",
    [
        get("/v1/variables/k", "Expect: 100-continue"),
        get("/v1/variables/k", "X-Pad: " + "p" * 9000),
        get("/v1/variables/k", "Connection: Upgrade", "Upgrade: h2c"),
        get("/v1/variables/k", "Connection: close"),
        get("/v1/variables/a%2Fb"),
        get("/v1/config/k?team=alpha"),
        b"HEAD /v1/variables/k HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/variables/k HTTP/1.0\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ],
    ids=["expect", "long header", "upgrade", "close", "encoded slash", "config team", "HEAD", "HTTP/1.0", "garbage"],
)
async def test_what_the_fast_path_leaves_to_aiohttp(tmp_path: Path, request_bytes: bytes) -> None:
    st = make_state(tmp_path)
    proto, transport, inner = connect(front_for(st))
    proto.data_received(request_bytes + get("/v1/variables/k"))
    assert transport.written == b"" and proto.inner is inner
    assert inner.data == request_bytes + get("/v1/variables/k")  # from the first byte of that request on
    st.executor.shutdown(wait=False)


@pytest.mark.parametrize(
    ("headers", "fast"),
    [
        ([f"X-Broker-Token: {TOKEN.decode()}"], True),
        ([], False),
        ([f"X-Broker-Token: {TOKEN.decode()}"] * 2, False),
        ([f"X-Broker-Token: {TOKEN.decode()}", "X-Broker-Token: wrong"], False),
        ([f"X-Broker-Token: {TOKEN.decode()}", "X-Forwarded-For: 10.0.0.1"], False),
        ([f"X-Broker-Token: {TOKEN.decode()}", "Forwarded: for=x"], False),
    ],
)
async def test_the_token_rule_on_the_fast_path(tmp_path: Path, headers: list[str], fast: bool) -> None:
    st = make_state(tmp_path)
    await st.cache.get(Kind.VARIABLE, "k", None)
    proto, transport, _ = connect(front_for(st, TOKEN))
    proto.data_received(get("/v1/variables/k", *headers))
    assert (transport.written != b"") is fast and (proto.inner is None) is fast
    st.executor.shutdown(wait=False)


async def test_a_repeated_head_is_answered_and_checked_like_the_first(tmp_path: Path) -> None:
    st = make_state(tmp_path)
    await st.cache.get(Kind.VARIABLE, "k", None)
    front = front_for(st, TOKEN)
    token = f"X-Broker-Token: {TOKEN.decode()}"
    for _ in range(2):
        proto, transport, _ = connect(front)
        proto.data_received(get("/v1/variables/k", token) * 3 + get("/v1/variables/k", token, "X-Request-Id: mine"))
        got = answers(transport.written)
        assert [(s, b["value"], b["cache"]) for s, _, b in got] == [(200, "None:k", "hit")] * 4
        ids = [h["X-Request-Id"] for _, h, _ in got]
        assert len(set(ids[:3])) == 3 and ids[3] == "mine"  # a new id for each request that brought none
    for refused in (get("/v1/variables/k", token, "X-Forwarded-For: 10.0.0.1"), get("/v1/variables/k")):
        for _ in range(2):
            proto, transport, inner = connect(front)
            proto.data_received(refused)
            assert transport.written == b"" and inner.data == refused
    st.executor.shutdown(wait=False)


async def test_the_front_remembers_what_hits_read_and_nothing_of_misses(tmp_path: Path) -> None:
    st = make_state(tmp_path)
    front = front_for(st)
    proto, transport, _ = connect(front)
    proto.data_received(get("/v1/variables/once"))  # a cache being filled: each name read once, each a miss
    await settle(proto)
    assert front.heads == {} and front.targets == {}
    proto.data_received(get("/v1/variables/once") * 2)
    assert [b["cache"] for _, _, b in answers(transport.written)] == ["miss", "hit", "hit"]
    assert front.heads.keys() == {get("/v1/variables/once")}
    assert front.targets == {b"/v1/variables/once": (Kind.VARIABLE, "once", None)}
    st.executor.shutdown(wait=False)


async def test_a_refused_peer_is_handed_to_aiohttp_at_once(tmp_path: Path, unix_pair: socket.socket) -> None:
    st = make_state(tmp_path, allowed_uids=[os.getuid() + 1])
    proto, _, inner = connect(front_for(st), unix_pair)
    assert proto.inner is inner
    st.executor.shutdown(wait=False)
