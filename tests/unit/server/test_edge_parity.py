"""The two servers of the secrets API answer every request alike.

The same odd requests (bad names and kinds, oversize heads, missing and repeated tokens, forwarded headers,
bad request ids, teams, other methods, HTTP/1.0, ``Expect``, bodies, pipelining, garbage) go to a broker
with the fast path and to one without, both in-process on unix sockets (and loopback TCP) in a temporary
directory; status, headers and JSON bodies must be equal, and so must the requests and refusals counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.app import Broker
from broker.backends.base import Kind
from broker.config import validate_config
from tests.support.net import free_port

TOKEN = "parity-token-" + "x" * 30
H = b"Host: x\r\n"
TOK = b"X-Broker-Token: " + TOKEN.encode() + b"\r\n"
LAST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def get(target: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET " + target + b" HTTP/" + version + b"\r\n" + H + extra + b"\r\n"


# (case, request bytes, the first answer is to HEAD: no body). Each is followed by LAST on the same connection.
COMMON: list[tuple[str, bytes, bool]] = [
    ("hit", get(b"/v1/variables/plain"), False),
    ("connection hit", get(b"/v1/connections/pg"), False),
    ("nested id", get(b"/v1/variables/team/db"), False),
    ("not found", get(b"/v1/variables/absent"), False),
    ("request id", get(b"/v1/variables/plain", b"X-Request-Id: given-1\r\n"), False),
    ("two request ids", get(b"/v1/variables/plain", b"X-Request-Id: a-1\r\nX-Request-Id: b-2\r\n"), False),
    ("bad request id", get(b"/v1/variables/plain", b"X-Request-Id: a b\r\n"), False),
    ("long request id", get(b"/v1/variables/plain", b"X-Request-Id: " + b"r" * 65 + b"\r\n"), False),
    ("dotdot", get(b"/v1/variables/.."), False),
    ("dotdot segment", get(b"/v1/variables/a/../b"), False),
    ("empty segment", get(b"/v1/variables/a//b"), False),
    ("leading slash", get(b"/v1/variables//a"), False),
    ("encoded slash", get(b"/v1/variables/a%2Fb"), False),
    ("encoded backslash", get(b"/v1/variables/a%5Cb"), False),
    ("encoded newline", get(b"/v1/variables/a%0Ab"), False),
    ("bad utf-8", get(b"/v1/variables/%ff%fe"), False),
    ("empty name", get(b"/v1/variables/"), False),
    ("too long name", get(b"/v1/variables/" + b"n" * 251), False),
    ("space", get(b"/v1/variables/a%20b"), False),
    ("query", get(b"/v1/variables/plain?x=1"), False),
    ("fragment", get(b"/v1/variables/plain#x"), False),
    ("unknown kind", get(b"/v1/secrets/plain"), False),
    ("kind case", get(b"/v1/Variables/plain"), False),
    ("no name", get(b"/v1/variables"), False),
    ("other version", get(b"/v2/variables/plain"), False),
    ("absolute form", get(b"http://x/v1/variables/plain"), False),
    ("team", get(b"/v1/variables/plain?team=alpha"), False),
    ("bad team", get(b"/v1/variables/plain?team=ab"), False),
    ("two teams", get(b"/v1/variables/plain?team=alpha&team=beta"), False),
    ("encoded team", get(b"/v1/variables/plain?team=%61lpha"), False),
    ("config team", get(b"/v1/config/plain?team=alpha"), False),
    ("long header", get(b"/v1/variables/plain", b"X-Pad: " + b"p" * 9000 + b"\r\n"), False),
    ("long head", get(b"/v1/variables/plain", b"".join(b"X-P%d: %s\r\n" % (i, b"p" * 90) for i in range(120))), False),
    ("long url", get(b"/v1/variables/" + b"u" * 70_000), False),
    ("HEAD", b"HEAD /v1/variables/plain HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n", True),
    ("POST", b"POST /v1/variables/plain HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n", False),
    ("PUT", b"PUT /v1/variables/plain HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n", False),
    ("DELETE", b"DELETE /v1/connections/pg HTTP/1.1\r\n" + H + b"\r\n", False),
    ("GET invalidate", get(b"/v1/cache/invalidate"), False),
    ("POST healthz", b"POST /healthz HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n", False),
    ("unknown path", get(b"/nope"), False),
    ("HTTP/1.0", get(b"/v1/variables/plain", version=b"1.0"), False),
    ("connection close", get(b"/v1/variables/plain", b"Connection: close\r\n"), False),
    ("expect continue", get(b"/v1/variables/plain", b"Expect: 100-continue\r\n"), False),
    ("expect other", get(b"/v1/variables/plain", b"Expect: teapot\r\n"), False),
    ("body", get(b"/v1/variables/plain", b"Content-Length: 5\r\n") + b"hello", False),
    ("chunked", get(b"/v1/variables/plain", b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n", False),
    ("lowercase method", b"get /v1/variables/plain HTTP/1.1\r\n" + H + b"\r\n", False),
    ("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", False),
    (
        "pipelined",
        get(b"/v1/variables/plain")
        + get(b"/v1/variables/absent")
        + get(b"/v1/connections/pg", b"X-Request-Id: p-3\r\n")
        + get(b"/v1/variables/a%2Fb")
        + get(b"/v1/variables/plain"),
        False,
    ),
]

TCP_ONLY: list[tuple[str, bytes, bool]] = [
    ("no token", get(b"/v1/variables/plain"), False),
    ("wrong token", get(b"/v1/variables/plain", b"X-Broker-Token: " + b"w" * 43 + b"\r\n"), False),
    ("two good tokens", get(b"/v1/variables/plain", TOK + TOK), False),
    ("bad then good token", get(b"/v1/variables/plain", b"X-Broker-Token: nope\r\n" + TOK), False),
    ("good then bad token", get(b"/v1/variables/plain", TOK + b"X-Broker-Token: nope\r\n"), False),
    ("token not utf-8", get(b"/v1/variables/plain", b"X-Broker-Token: \xff\xfe\r\n"), False),
    (
        "token lowercase name",
        get(b"/v1/variables/plain", TOK.lower().replace(TOKEN.lower().encode(), TOKEN.encode())),
        False,
    ),
    ("forwarded for", get(b"/v1/variables/plain", TOK + b"X-Forwarded-For: 10.0.0.1\r\n"), False),
    ("forwarded", get(b"/v1/variables/plain", TOK + b"Forwarded: for=10.0.0.1\r\n"), False),
    ("forwarded, no token", get(b"/v1/variables/plain", b"X-Forwarded-For: 10.0.0.1\r\n"), False),
    ("pipelined, token lost", get(b"/v1/variables/plain", TOK) + get(b"/v1/variables/plain"), False),
]

TEAM_CASES: list[tuple[str, bytes, bool]] = [
    ("bound, no team", get(b"/v1/variables/plain"), False),
    ("bound, own team", get(b"/v1/variables/plain?team=alpha"), False),
    ("bound, other team", get(b"/v1/variables/plain?team=gamma"), False),
    ("bound, other team nested", get(b"/v1/variables/team/db?team=gamma"), False),
    ("bound, connection", get(b"/v1/connections/pg"), False),
    ("bound, pipelined", get(b"/v1/variables/plain?team=gamma") + get(b"/v1/variables/plain"), False),
]


def with_token(cases: list[tuple[str, bytes, bool]]) -> list[tuple[str, bytes, bool]]:
    """The cases with the token added to every request (after its request line)."""
    out = []
    for case, raw, head in cases:
        out.append((case, re.sub(rb"( HTTP/1\.[01]\r\n)", lambda m: m.group(1) + TOK, raw), head))
    return out


def responses(raw: bytes, first_is_head: bool) -> list[tuple[str, dict[str, str], Any]]:
    """Split a connection's answers; volatile headers dropped, request ids classified, ages zeroed."""
    out: list[tuple[str, dict[str, str], Any]] = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            out.append(("<truncated>", {}, head.decode("latin-1")))
            break
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        status = lines[0]
        if status.startswith("HTTP/1.1 100"):
            out.append((status, headers, None))
            continue
        length = 0 if first_is_head and not out else int(headers.get("Content-Length", "0"))
        body_raw, rest = rest[:length], rest[length:]
        for volatile in ("Date", "Keep-Alive"):
            headers.pop(volatile, None)
        rid = headers.get("X-Request-Id")
        if rid is not None and re.fullmatch(r"[0-9a-f]{16}", rid):
            headers["X-Request-Id"] = "<generated>"
        body: Any = body_raw.decode("latin-1")
        if headers.get("Content-Type", "").startswith("application/json") and body_raw:
            body = json.loads(body_raw)
            if isinstance(body, dict) and "age" in body:
                body["age"] = 0
        out.append((status, headers, body))
    return out


async def exchange(broker: Broker, tcp: bool, request: bytes, first_is_head: bool) -> list[Any]:
    if tcp:
        host, port = broker._listeners[-1].sock.getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
    else:
        path = str(broker.state.config.listen.socket)
        reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(request if first_is_head else request + LAST)
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # reset by a server that closed with unread bytes
    return responses(raw, first_is_head)


def counted(broker: Broker) -> dict[str, float]:
    """The request and refusal counters (bounded labels: kind, outcome, reason)."""
    out = {}
    for metric in broker.state.metrics.registry.collect():
        if metric.name in ("broker_requests", "broker_rejected"):
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    out[f"{sample.name}{sorted(sample.labels.items())}"] = sample.value
    return out


@pytest.fixture
def workdir() -> Any:
    path = Path(tempfile.mkdtemp(prefix="bp-", dir="/tmp"))  # short: unix socket paths are bounded
    (path / "variables.json").write_text(json.dumps({"plain": "value-1", "team/db": "nested-2", "a/b": "x"}))
    (path / "connections.json").write_text(json.dumps({"pg": {"conn_type": "postgres", "host": "db", "port": 5432}}))
    (path / "config.json").write_text(json.dumps({"plain": "c"}))
    (path / "token").write_text(TOKEN)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def start(workdir: Path, name: str, fast: bool, listen: dict[str, Any], multi_team: bool) -> Broker:
    config = validate_config(
        {
            "listen": {"socket": str(workdir / f"{name}.sock"), "fast_path": fast, **listen},
            "metrics": {"listen": None},
            "multi_team": multi_team,
            "shutdown": {"drain_delay": 0, "grace": 2},
            "audit": {"enabled": True, "output": str(workdir / f"{name}.audit")},
            "backends": [
                {
                    "name": "files",
                    "type": "file",
                    "variables_file_path": str(workdir / "variables.json"),
                    "connections_file_path": str(workdir / "connections.json"),
                    "config_file_path": str(workdir / "config.json"),
                }
            ],
        }
    )
    broker = Broker(config, None)
    await broker.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while broker.state.not_ready_reasons():
        assert loop.time() < deadline, broker.state.not_ready_reasons()
        await asyncio.sleep(0.01)
    return broker


@pytest.fixture
async def pair(workdir: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Broker, Broker, bool]]:
    listen, multi_team, tcp = request.param
    listens = [listen, listen]
    if tcp:
        listens = [{**listen, "tcp": f"127.0.0.1:{free_port()}", "token_file": str(workdir / "token")} for _ in "fp"]
    fast = await start(workdir, "f", True, listens[0], multi_team)
    plain = await start(workdir, "p", False, listens[1], multi_team)
    try:
        # Warm both caches the same way, so the fast path has hits to serve.
        for broker in (fast, plain):
            for team in {None, broker.state.config.listen.team, "alpha"}:
                for kind, name in ((Kind.VARIABLE, "plain"), (Kind.VARIABLE, "team/db"), (Kind.CONNECTION, "pg")):
                    await broker.state.cache.get(kind, name, team)
        yield fast, plain, tcp
    finally:
        await fast.stop()
        await plain.stop()
    # Both wrote the same audit trail: one line per lookup and per refused read, with the same outcome,
    # team, cache state and caller.
    trail = audited(workdir / "p.audit")
    assert trail and audited(workdir / "f.audit") == trail


def audited(path: Path) -> list[tuple[Any, ...]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    fields = ("kind", "name", "team", "backend", "outcome", "cache", "caller", "asserted")
    return sorted((json.dumps([line[f] for f in fields], sort_keys=True),) for line in lines)


async def assert_alike(fast: Broker, plain: Broker, tcp: bool, cases: list[tuple[str, bytes, bool]]) -> None:
    for case, raw, first_is_head in cases:
        try:
            got_plain = await exchange(plain, tcp, raw, first_is_head)
            got_fast = await exchange(fast, tcp, raw, first_is_head)
        except TimeoutError:
            raise AssertionError(f"{case}: no answer") from None
        assert got_fast == got_plain, case
        assert got_plain, case
        for status, headers, _ in got_plain:  # every answer is JSON, errors included (none of aiohttp's text)
            assert status.startswith("HTTP/1.1 100") or headers["Content-Type"] == "application/json", (case, status)
    assert counted(fast) == counted(plain)


UNIX = ({}, False, False)
TCP = ({}, False, True)
BOUND = ({"team": "alpha"}, True, False)
ME = os.getuid()


@pytest.mark.parametrize("pair", [UNIX], indirect=True)
async def test_unix_socket_answers_alike(pair: tuple[Broker, Broker, bool]) -> None:
    await assert_alike(*pair, COMMON)


@pytest.mark.parametrize("pair", [TCP], indirect=True)
async def test_tcp_listener_answers_alike(pair: tuple[Broker, Broker, bool]) -> None:
    await assert_alike(*pair, [*with_token(COMMON), *TCP_ONLY])


@pytest.mark.parametrize("pair", [BOUND], indirect=True)
async def test_team_bound_listener_answers_alike(pair: tuple[Broker, Broker, bool]) -> None:
    await assert_alike(*pair, [*COMMON, *TEAM_CASES])
    fast = pair[0]
    # The bound team's hits are the fast path's own (counted as hits without a cache miss).
    hits = fast.state.metrics.registry.get_sample_value("broker_requests_total", {"kind": "variable", "outcome": "hit"})
    assert hits is not None and hits > 10


@pytest.mark.parametrize(
    "pair",
    [
        ({"allowed_uids": [ME + 12345]}, False, False),
        ({"allowed_uids": [ME + 12345], "allowed_gids": [os.getgid()]}, False, False),
        ({"peer_teams": [{"uid": ME, "team": "alpha"}]}, True, False),
        ({"team": "gamma", "peer_teams": [{"gid": os.getgid(), "team": "alpha"}]}, True, False),
    ],
    indirect=True,
    ids=["peer denied", "peer allowed by gid", "uid bound", "gid bound over the listener's team"],
)
async def test_peer_rules_answer_alike(pair: tuple[Broker, Broker, bool]) -> None:
    await assert_alike(*pair, [*COMMON[:8], *TEAM_CASES])
