"""The edge rules on their own: tokens, request ids, targets, teams, peers, refusal bytes and what they report."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
from multidict import CIMultiDict

from broker.audit import Caller
from broker.backends.base import Kind
from broker.config import validate_config
from broker.metrics import Metrics
from broker.server import edge

TOKEN = b"k" * 32


def listen(**cfg: Any) -> Any:
    multi = "team" in cfg or "peer_teams" in cfg
    return validate_config(
        {"multi_team": multi, "listen": {"socket": "/tmp/x.sock", **cfg}, "backends": [{"name": "e", "type": "env"}]}
    ).listen


@pytest.mark.parametrize(
    ("given", "ok"),
    [
        ([TOKEN], True),
        ([], False),
        ([b""], False),
        ([b"k" * 31], False),
        ([TOKEN + b"k"], False),
        ([TOKEN, TOKEN], False),  # exactly once: a repeated header is refused even when both are right
        ([b"wrong", TOKEN], False),
        ([TOKEN, b"wrong"], False),
    ],
)
def test_token_exactly_once_and_equal(given: list[bytes], ok: bool) -> None:
    assert edge.token_ok(given, TOKEN) is ok


@pytest.mark.parametrize(
    ("given", "ok"),
    [
        ("abc-123", True),
        ("A.b_c-9", True),
        ("r" * 64, True),
        ("r" * 65, False),
        ("", False),
        ("a b", False),
        ("a\tb", False),
        ("é", False),
        ("a/b", False),
    ],
)
def test_request_id_rule_is_the_same_for_text_and_bytes(given: str, ok: bool) -> None:
    assert edge.valid_request_id(given) is ok
    assert edge.valid_request_id(given.encode()) is ok


def test_a_request_gets_its_one_acceptable_id_or_a_new_one() -> None:
    policy = edge.EdgePolicy(listen())
    assert policy.request_id(["given-1"]) == "given-1"
    assert policy.request_id_bytes([b"given-1"]) == b"given-1"
    fresh = {policy.request_id([]), policy.request_id(["a", "b"]), policy.request_id(["a b"])}
    fresh |= {policy.request_id_bytes(None).decode(), policy.request_id_bytes([b"a", b"b"]).decode()}
    assert len(fresh) == 5 and all(len(r) == 16 and int(r, 16) >= 0 for r in fresh)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (b"/v1/variables/plain", (Kind.VARIABLE, "plain", None)),
        (b"/v1/connections/pg", (Kind.CONNECTION, "pg", None)),
        (b"/v1/config/core.x", (Kind.CONFIG, "core.x", None)),
        (b"/v1/variables/team/db", (Kind.VARIABLE, "team/db", None)),
        (b"/v1/variables/a%40b", (Kind.VARIABLE, "a@b", None)),
        (b"/v1/variables/plain?team=alpha", (Kind.VARIABLE, "plain", "alpha")),
        (b"/v1/connections/pg?team=a_b-c", (Kind.CONNECTION, "pg", "a_b-c")),
        # Everything below is left to the application, which answers it (often 400, sometimes 200).
        (b"/v1/config/plain?team=alpha", None),
        (b"/v1/variables/plain?team=ab", None),
        (b"/v1/variables/plain?team=%61lpha", None),
        (b"/v1/variables/plain?team=alpha&team=beta", None),
        (b"/v1/variables/plain?x=1", None),
        (b"/v1/variables/plain?team=\xff\xff\xff", None),
        (b"/v1/variables/..", None),
        (b"/v1/variables/a//b", None),
        (b"/v1/variables/a%2Fb", None),
        (b"/v1/variables/%ff", None),
        (b"/v1/variables/\xc3\xa9", None),
        (b"/v1/variables/", None),
        (b"/v1/variables", None),
        (b"/v1/secrets/x", None),
        (b"/v2/variables/x", None),
        (b"http://x/v1/variables/x", None),
        (b"/v1/variables/" + b"n" * 251, None),
    ],
)
def test_fast_targets(url: bytes, target: Any) -> None:
    assert edge.fast_target(url) == target


@pytest.mark.parametrize(
    "url",
    [b"/v1/variables/plain", b"/v1/variables/team/db", b"/v1/connections/pg", b"/v1/variables/a%40b?team=alpha"],
)
def test_a_fast_target_is_what_the_application_reads(url: bytes) -> None:
    fast = edge.fast_target(url)
    assert fast is not None
    assert edge.lookup_target(url.decode()) == fast[:2]


@pytest.mark.parametrize(
    ("teams", "kind", "problem"),
    [
        ([], Kind.VARIABLE, None),
        (["alpha"], Kind.VARIABLE, None),
        (["alpha"], Kind.CONFIG, "config lookups take no team"),
        (["alpha", "beta"], Kind.CONNECTION, "at most once"),
        (["ab"], Kind.CONNECTION, "3 to 50"),
        (["a/b"], Kind.CONNECTION, "3 to 50"),
    ],
)
def test_team_query_rules(teams: list[str], kind: Kind, problem: str | None) -> None:
    found = edge.team_query_problem(teams, kind)
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(
    ("bound", "asked", "served"),
    [
        (None, None, (None, False)),
        (None, "beta", ("beta", False)),
        ("alpha", None, ("alpha", False)),
        ("alpha", "alpha", ("alpha", False)),
        ("alpha", "beta", ("beta", True)),
    ],
)
def test_bound_team(bound: str | None, asked: str | None, served: tuple[str | None, bool]) -> None:
    assert edge.bound_team(bound, asked) == served


def split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], dict(line.split(": ", 1) for line in lines[1:]), body


def test_the_connection_cap_answer_is_well_formed_json() -> None:
    status, headers, body = split(edge.OVER_CAP_ANSWER)
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert int(headers["Content-Length"]) == len(body)  # it once said 75 for a 74-byte body
    assert json.loads(body) == {"error": "overloaded", "message": "too many connections; retry shortly"}
    assert headers["Retry-After"] == "1" and headers["Connection"] == "close"
    assert headers["Cache-Control"] == "no-store" and headers["Content-Type"] == "application/json"


def test_raw_responses_count_their_body() -> None:
    body = json.dumps({"value": "é"}).encode()
    status, headers, got = split(edge.raw_response(404, [("A", "b"), ("Content-Length", "1")], body, b"rid-1"))
    assert status == "HTTP/1.1 404 Not Found"
    assert headers == {"A": "b", "Content-Length": str(len(body)), "X-Request-Id": "rid-1"} and got == body


@pytest.mark.parametrize("refusal", [edge.FORWARDED, edge.UNAUTHORIZED, edge.PEER_DENIED, edge.TEAM_DENIED])
def test_refusal_bodies_are_the_error_shape(refusal: edge.Refusal) -> None:
    assert json.loads(refusal.body) == {"error": refusal.code, "message": refusal.message}
    assert (refusal.status, refusal.code) in {
        (400, "bad_request"),
        (401, "unauthorized"),
        (403, "forbidden"),
    }


@pytest.mark.parametrize(
    ("headers", "refusal"),
    [
        ([("X-Broker-Token", TOKEN.decode())], None),
        ([("x-broker-token", TOKEN.decode())], None),
        ([], edge.UNAUTHORIZED),
        ([("X-Broker-Token", TOKEN.decode())] * 2, edge.UNAUTHORIZED),
        ([("X-Broker-Token", "\udcff\udcfe")], edge.UNAUTHORIZED),  # bytes that are not UTF-8, as aiohttp keeps them
        ([("X-Broker-Token", TOKEN.decode()), ("X-Forwarded-For", "10.0.0.1")], edge.FORWARDED),
        ([("Forwarded", "for=10.0.0.1")], edge.FORWARDED),  # forwarded is looked at before the token
    ],
)
def test_tcp_refusals(headers: list[tuple[str, str]], refusal: edge.Refusal | None) -> None:
    policy = edge.EdgePolicy(listen(), TOKEN)
    peer = policy.peer(None)
    assert peer.caller.listener == "tcp" and peer.caller.token is not None and TOKEN.decode() not in peer.caller.token
    assert policy.refusal(peer, CIMultiDict(headers)) is refusal


class FakeTransport:
    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default


ME, MY_GID = os.getuid(), os.getgid()


@pytest.mark.parametrize(
    ("cfg", "allowed", "team"),
    [
        ({}, True, None),
        ({"allowed_uids": [ME]}, True, None),
        ({"allowed_uids": [ME + 1]}, False, None),
        ({"allowed_uids": [ME + 1], "allowed_gids": [MY_GID]}, True, None),
        ({"allowed_gids": [MY_GID + 1]}, False, None),
        ({"team": "alpha"}, True, "alpha"),
        ({"peer_teams": [{"uid": ME, "team": "beta"}]}, True, "beta"),
        ({"peer_teams": [{"uid": ME + 1, "team": "beta"}]}, True, None),
        ({"team": "alpha", "peer_teams": [{"gid": MY_GID, "team": "beta"}]}, True, "beta"),
        ({"team": "alpha", "peer_teams": [{"gid": MY_GID + 1, "team": "beta"}]}, True, "alpha"),
        (
            {"peer_teams": [{"gid": MY_GID, "team": "gidteam"}, {"uid": ME, "team": "uidteam"}]},
            True,
            "uidteam",
        ),  # a uid's entry wins over a gid's
    ],
)
def test_peer_rules(unix_pair: socket.socket, cfg: dict[str, Any], allowed: bool, team: str | None) -> None:
    policy = edge.EdgePolicy(listen(**cfg))
    transport = FakeTransport(unix_pair)
    peer = policy.peer(transport, audit=True)
    assert (peer.allowed, peer.team) == (allowed, team)
    assert (peer.caller.uid, peer.caller.gid, peer.caller.pid) == (ME, MY_GID, os.getpid())
    assert policy.peer(transport) is peer  # asked once per connection
    assert policy.refusal(peer, CIMultiDict()) is (None if allowed else edge.PEER_DENIED)


def test_peer_credentials_are_read_only_when_needed(unix_pair: socket.socket) -> None:
    plain = edge.EdgePolicy(listen())
    transport = FakeTransport(unix_pair)
    assert plain.peer(transport).caller == Caller("unix")  # nothing asked of the kernel
    assert plain.peer(transport, audit=True).caller.uid == ME  # the audit trail wants to know who
    assert plain.peer(FakeTransport(None), audit=True).allowed  # an in-process test server: no peer
    assert not edge.EdgePolicy(listen(allowed_uids=[ME])).peer(None).allowed  # no transport: refused


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[Any, ...]] = []

    def record(self, rid: Any, kind: str, name: str, outcome: str, **kw: Any) -> None:
        self.lines.append((rid, kind, name, outcome, kw.get("caller")))


@pytest.mark.parametrize(
    ("refusal", "method", "path", "audited"),
    [
        (edge.UNAUTHORIZED, "GET", "/v1/variables/team/db", ("variable", "team/db")),
        (edge.PEER_DENIED, "HEAD", "/v1/connections/pg?team=alpha", ("connection", "pg")),
        (edge.PEER_DENIED, "POST", "/v1/connections/pg", None),  # not a read
        (edge.PEER_DENIED, "GET", "/v1/variables/a%2Fb", None),  # not a lookup that could have happened
        (edge.PEER_DENIED, "GET", "/healthz", None),
        (edge.FORWARDED, "GET", "/v1/variables/plain", None),  # a proxy, not a reader
    ],
)
def test_what_a_refusal_reports(refusal: edge.Refusal, method: str, path: str, audited: Any) -> None:
    metrics, audit, caller = Metrics(), Recorder(), Caller("unix", uid=1, gid=2, pid=3)
    edge.report_refusal(
        refusal,
        metrics,
        audit,
        request_id="r1",
        method=method,
        raw_path=path,
        caller=caller,  # type: ignore[arg-type]
    )
    assert metrics.registry.get_sample_value("broker_rejected_total", {"reason": refusal.reason}) == 1
    assert audit.lines == ([("r1", *audited, "denied", caller)] if audited else [])
