"""The secrets API's edge rules, written once for both servers (the aiohttp app and the fast path).

Who may connect (``SO_PEERCRED`` uid/gid allowlists on the unix socket), which team a caller is bound to
(``listen.team``, ``listen.peer_teams``), the TCP token (``X-Broker-Token``, exactly once, compared in
constant time), the refusal of proxied requests, the request-id rule, how a lookup target is read from a
request path, the bytes of a found answer and of every refusal, and what an edge refusal reports to the
metrics and the audit trail. ``broker.server`` and ``broker.server.fast`` only read requests and write
answers; every decision about them is made here.
"""

from __future__ import annotations

import hmac
import itertools
import json
import os
import socket
import struct
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from broker.audit import Caller, token_caller
from broker.backends.base import Kind
from broker.resolver import decode_name, team_problem

if TYPE_CHECKING:
    from broker.audit import AuditLog
    from broker.cache import Entry
    from broker.config import ListenConfig
    from broker.metrics import Metrics

KINDS = {"connections": Kind.CONNECTION, "variables": Kind.VARIABLE, "config": Kind.CONFIG}
KINDS_BYTES = {k.encode(): v for k, v in KINDS.items()}
# Headers on every answer of the secrets API.
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Server": "broker"}
# aiohttp's request-parser limits on the API listeners. A head longer than MAX_FIELD_SIZE might hold a
# field aiohttp would refuse, so the fast path leaves such heads to aiohttp.
MAX_FIELD_SIZE = 8190
MAX_LINE_SIZE = 65536
TOKEN_HEADER = "X-Broker-Token"  # noqa: S105 - a header name
FORWARDED_HEADERS = ("X-Forwarded-For", "Forwarded")
FORWARDED_HEADERS_BYTES = frozenset(h.lower().encode() for h in FORWARDED_HEADERS)
MAX_REQUEST_ID = 64
_RID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_RID_OK_BYTES = frozenset(ord(c) for c in _RID_OK)


# ---------------------------------------------------------------------------------------------- answers


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every error answer: ``{"error": code, "message": ...}`` (never a secret value)."""
    return json.dumps({"error": code, "message": message}).encode()


def raw_response(
    status: int, headers: Iterable[tuple[str, str]], body: bytes, request_id: bytes | None = None
) -> bytes:
    """One HTTP/1.1 answer as bytes, its Content-Length counted from ``body`` (for answers written
    straight to a transport: the fast path's and the connection cap's)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() != "content-length"]
    lines.append(f"Content-Length: {len(body)}")
    head = "\r\n".join(lines).encode("latin-1")
    if request_id is not None:
        head += b"\r\nX-Request-Id: " + request_id
    return head + b"\r\n\r\n" + body


def found_body(entry: Entry, cache: bytes, now: float) -> bytes:
    """The JSON body of a 200: the entry's value and metadata, then how it was served (``cache``: a
    ``Status`` value, encoded) and its age."""
    return entry.json_head() + b',"cache":"%s","age":%d}' % (cache, max(0, int(now - entry.fetched_at)))


# The fixed part of a fast-path hit's answer, up to its per-request headers.
HIT_PREFIX = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in NO_STORE.items())
    + b"X-Broker-Cache: hit\r\n"
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused at the edge: its answer, the ``broker_rejected_total`` reason, and whether a refused
    secret lookup is a read attempt for the audit trail."""

    status: int
    code: str
    message: str
    reason: str
    audited: bool = True
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", error_body(self.code, self.message))


FORWARDED = Refusal(
    400, "bad_request", "proxied requests are refused (X-Forwarded-For/Forwarded)", "forwarded", audited=False
)
UNAUTHORIZED = Refusal(401, "unauthorized", "missing or wrong X-Broker-Token (send it exactly once)", "unauthorized")
PEER_DENIED = Refusal(403, "forbidden", "this uid/gid may not use the broker socket", "peer_denied")
TEAM_DENIED = Refusal(403, "forbidden", "this listener serves one team only; no other team's secrets", "team_denied")
CONNECTION_CAP = Refusal(
    503, "overloaded", "too many connections; retry shortly", "connection_cap", False, (("Retry-After", "1"),)
)
OVER_CAP_ANSWER = raw_response(
    503,
    [("Content-Type", "application/json"), ("Connection", "close"), *NO_STORE.items(), *CONNECTION_CAP.headers],
    CONNECTION_CAP.body,
)


# ---------------------------------------------------------------------------------------------- requests


def valid_request_id(given: str | bytes) -> bool:
    """A client's X-Request-Id is echoed (and logged) only when it is 1-64 of ``[A-Za-z0-9._-]``."""
    allowed = _RID_OK_BYTES if isinstance(given, bytes) else _RID_OK
    return 0 < len(given) <= MAX_REQUEST_ID and all(c in allowed for c in given)


def token_ok(given: list[bytes], token: bytes) -> bool:
    """The TCP listener's token rule: the header exactly once, equal to the token (constant time)."""
    return len(given) == 1 and hmac.compare_digest(given[0], token)


def split_path(raw_path: str) -> tuple[str, str] | None:
    """('connections', raw name) from the raw, still percent-encoded path, or None for no such endpoint.

    The raw name is everything after the collection: a nested id (``team/db``) keeps its slashes.
    """
    path = raw_path.split("?", 1)[0]
    parts = path.split("/", 3)
    # ['', 'v1', '<collection>', '<name, maybe with slashes>']
    if len(parts) != 4 or parts[0] or parts[1] != "v1":
        return None
    return parts[2], parts[3]


def lookup_target(raw_path: str) -> tuple[Kind, str] | None:
    """(kind, name) when ``raw_path`` is a well-formed secret lookup, else None."""
    split = split_path(raw_path)
    if split is None or split[0] not in KINDS:
        return None
    name, _ = decode_name(split[1])
    return None if name is None else (KINDS[split[0]], name)


def team_query_problem(teams: list[str], kind: Kind) -> str | None:
    """Why the ``?team=`` values of a lookup are refused with 400, or None."""
    if not teams:
        return None
    if len(teams) > 1:
        return "give team at most once"
    if kind is Kind.CONFIG:
        return "config lookups take no team (Airflow reads config with no team)"
    return team_problem(teams[0])


def fast_target(url: bytes) -> tuple[Kind, str, str | None] | None:
    """(kind, name, team) for a request target the fast path may answer, else None (aiohttp answers it).

    The same reading as the application's for what it accepts; anything it would refuse, or read with
    more care (percent-encoded query values, other parameters), gives None.
    """
    path, _, query = url.partition(b"?")
    parts = path.split(b"/", 3)
    if len(parts) != 4 or parts[0] or parts[1] != b"v1":
        return None
    kind = KINDS_BYTES.get(parts[2])
    if kind is None:
        return None
    team = None
    if query:
        if not query.startswith(b"team=") or kind is Kind.CONFIG:
            return None
        try:
            team = query[5:].decode("ascii")
        except UnicodeDecodeError:
            return None
        if team_problem(team):
            return None
    try:
        raw = parts[3].decode("ascii")
    except UnicodeDecodeError:
        return None
    name, _ = decode_name(raw)  # also refuses '?', '#', '%' and an encoded '/' or '\\'
    if name is None:
        return None
    return kind, name, team


def bound_team(bound: str | None, asked: str | None) -> tuple[str | None, bool]:
    """(the team a lookup is served for, refused): a caller bound to a team is served that team's secrets
    whatever it asks with no team; a request for another team is refused (``TEAM_DENIED``)."""
    if bound is None:
        return asked, False
    if asked is not None and asked != bound:
        return asked, True
    return bound, False


# ---------------------------------------------------------------------------------------------- peers


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket. Raises OSError."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def unix_caller(sock: socket.socket | None) -> Caller:
    """The peer of a unix socket connection (uid/gid/pid None when the kernel would not say)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return Caller("unix")
    try:
        pid, uid, gid = peer_credentials(sock)
    except OSError:
        return Caller("unix")
    return Caller("unix", uid=uid, gid=gid, pid=pid)


@dataclass(frozen=True, slots=True)
class Peer:
    """One connection's standing: allowed at all, the team it is bound to (None: any), who it is."""

    allowed: bool
    team: str | None
    caller: Caller


class EdgePolicy:
    """One listener's edge rules. ``tcp_token`` set means the loopback TCP listener (token and proxy rules);
    else the unix socket (peer rules). The peer of a connection is looked up once and kept per transport,
    so the fast path and the application, which share a connection, ask the kernel once."""

    def __init__(self, listen: ListenConfig, tcp_token: bytes | None = None) -> None:
        self.tcp_token = tcp_token
        self.team = listen.team
        self.uids = set(listen.allowed_uids) if listen.allowed_uids is not None else None
        self.gids = set(listen.allowed_gids) if listen.allowed_gids is not None else None
        self.uid_teams = {p.uid: p.team for p in listen.peer_teams if p.uid is not None}
        self.gid_teams = {p.gid: p.team for p in listen.peer_teams if p.gid is not None}
        # Peer credentials are read only when a rule needs them (or the audit trail asks who called).
        self.needs_peer = self.uids is not None or self.gids is not None or bool(listen.peer_teams)
        self._tcp_peer = Peer(True, listen.team, token_caller(tcp_token)) if tcp_token is not None else None
        self._anonymous = Peer(True, listen.team, Caller("unix"))
        self._peers: weakref.WeakKeyDictionary[Any, Peer] = weakref.WeakKeyDictionary()
        self._rid_prefix = os.urandom(4).hex().encode()
        self._rid_seq = itertools.count(1)

    def new_request_id(self) -> bytes:
        """A request id for a request that brought no acceptable one: unique per listener, 16 characters."""
        return b"%s%08x" % (self._rid_prefix, next(self._rid_seq))

    def request_id(self, given: list[str]) -> str:
        """The request's id: the client's when it sent exactly one acceptable X-Request-Id, else a new one."""
        if len(given) == 1 and valid_request_id(given[0]):
            return given[0]
        return self.new_request_id().decode()

    def request_id_bytes(self, given: list[bytes] | None) -> bytes:
        """``request_id`` for the fast path, which reads headers as bytes (None: no X-Request-Id at all)."""
        if given is None:
            return self.new_request_id()
        if len(given) == 1 and valid_request_id(given[0]):
            return given[0]
        return self.new_request_id()

    def peer(self, transport: Any, *, audit: bool = False) -> Peer:
        """The standing of the connection on ``transport``; ``audit`` asks for the caller's identity too."""
        if self._tcp_peer is not None:
            return self._tcp_peer
        if transport is None:
            return Peer(False, self.team, Caller("unix")) if self.needs_peer else self._anonymous
        known = self._peers.get(transport)
        if known is not None:
            return known
        if not self.needs_peer and not audit:
            return self._anonymous
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return self._anonymous  # not a unix socket (an in-process test server): no peer to ask about
        caller = unix_caller(sock)
        peer = Peer(self._allowed(caller), self._team_of(caller), caller)
        self._peers[transport] = peer
        return peer

    def _allowed(self, caller: Caller) -> bool:
        if self.uids is None and self.gids is None:
            return True
        if caller.uid is None:  # the kernel would not say who it is
            return False
        return (self.uids is not None and caller.uid in self.uids) or (
            self.gids is not None and caller.gid in self.gids
        )

    def _team_of(self, caller: Caller) -> str | None:
        """A uid's entry wins over a gid's; a peer with neither gets ``listen.team``."""
        if caller.uid is not None and caller.uid in self.uid_teams:
            return self.uid_teams[caller.uid]
        if caller.gid is not None and caller.gid in self.gid_teams:
            return self.gid_teams[caller.gid]
        return self.team

    def refusal(self, peer: Peer, headers: Any) -> Refusal | None:
        """The refusal a request gets at the edge, or None. ``headers``: the request's (a multidict)."""
        token = self.tcp_token
        if token is not None:
            if any(h in headers for h in FORWARDED_HEADERS):
                return FORWARDED
            given = [v.encode("utf-8", "surrogateescape") for v in headers.getall(TOKEN_HEADER, [])]
            return None if token_ok(given, token) else UNAUTHORIZED
        return None if peer.allowed else PEER_DENIED


def report_refusal(
    refusal: Refusal,
    metrics: Metrics,
    audit: AuditLog | None,
    *,
    request_id: str | bytes,
    method: str,
    raw_path: str,
    caller: Caller,
) -> None:
    """Count an edge refusal; a refused secret lookup is a read attempt too: one audit line, outcome denied."""
    metrics.rejected.labels(refusal.reason).inc()
    if refusal.audited:
        report_denied_read(audit, request_id=request_id, method=method, raw_path=raw_path, caller=caller)


def report_denied_read(
    audit: AuditLog | None, *, request_id: str | bytes, method: str, raw_path: str, caller: Caller
) -> None:
    """The audit line of a secret lookup refused before it was looked up (edge rules, node verification)."""
    if audit is None or method not in ("GET", "HEAD"):
        return
    target = lookup_target(raw_path)
    if target is not None:
        audit.record(request_id, target[0].value, target[1], "denied", caller=caller)
