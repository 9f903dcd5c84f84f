"""The HTTP edge: the secrets API (unix socket, optional loopback TCP) and the metrics listener.

Every answer is JSON; every error carries ``{"error": code, "message": ...}`` and never a secret value.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import logging
import os
import socket
import stat
import struct
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.audit import ASSERTED_HEADERS, Caller, outcome_of, token_caller, unix_caller
from broker.backends.base import BrokerError, Kind
from broker.cache import Entry, SecretCache, Status
from broker.logging import request_id
from broker.resolver import decode_name, name_problem, team_problem
from broker.server.listener import ListenError, with_header_timeout

if TYPE_CHECKING:
    from broker.state import BrokerState

log = logging.getLogger("broker.server")

KINDS = {"connections": Kind.CONNECTION, "variables": Kind.VARIABLE, "config": Kind.CONFIG}
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Server": "broker"}
# Routes match the decoded path: ``[\s\S]`` (not ``.``) so a name with an encoded newline still reaches the
# handler and is refused 400 by the name rules, instead of missing the route and answering 404 not_found.
ANY_UNDER_V1 = r"/v1/{tail:[\s\S]*}"
ANY_PATH = r"/{tail:[\s\S]*}"
_RID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
STATE: web.AppKey[BrokerState] = web.AppKey("state")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` is honoured; anything else is refused with JSON (aiohttp's own handler
    echoes the header into its answer and fails on bytes that are not UTF-8)."""
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        if request.version == (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None
    return error_response(417, "bad_request", "unsupported Expect header")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": code, "message": message})
    return web.Response(
        status=status, body=body.encode(), content_type="application/json", headers={**NO_STORE, **(headers or {})}
    )


def json_response(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers={**NO_STORE, **(headers or {})},
    )


# ---------------------------------------------------------------------------------------------- peers


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class PeerPolicy:
    """The uid/gid allowlist for the unix socket, checked once per connection (results kept per transport)."""

    def __init__(self, uids: list[int] | None, gids: list[int] | None) -> None:
        self.uids = set(uids) if uids is not None else None
        self.gids = set(gids) if gids is not None else None
        self._seen: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

    @property
    def active(self) -> bool:
        return self.uids is not None or self.gids is not None

    def allowed(self, request: web.Request) -> bool:
        transport = request.transport
        if transport is None:
            return False
        known = self._seen.get(transport)
        if known is not None:
            return known
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return True  # TCP listeners have their own token check
        try:
            _, uid, gid = peer_credentials(sock)
        except OSError:
            ok = False
        else:
            ok = (self.uids is not None and uid in self.uids) or (self.gids is not None and gid in self.gids)
        self._seen[transport] = ok
        return ok


# ---------------------------------------------------------------------------------------------- API app


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if 0 < len(given) <= 64 and all(c in _RID_OK for c in given):
        return given
    return uuid.uuid4().hex[:16]


def build_api_app(state: BrokerState, *, tcp_token: bytes | None = None) -> web.Application:
    """The secrets API. ``tcp_token`` set means this app serves the loopback TCP listener."""
    cfg = state.config.listen
    peers = PeerPolicy(cfg.allowed_uids, cfg.allowed_gids)
    tcp_caller = token_caller(tcp_token) if tcp_token is not None else None
    callers: weakref.WeakKeyDictionary[Any, Caller] = weakref.WeakKeyDictionary()

    def caller_of(request: web.Request) -> Caller | None:
        """Who is asking, for the audit trail (None when it is off): looked up once per connection."""
        if state.audit is None:
            return None
        if tcp_caller is not None:
            return tcp_caller
        transport = request.transport
        if transport is None:
            return Caller("unix")
        known = callers.get(transport)
        if known is None:
            known = callers[transport] = unix_caller(transport.get_extra_info("socket"))
        return known

    def audit_refused(request: web.Request, rid: str, caller: Caller) -> None:
        """A secret lookup refused at the edge is a read attempt too: one audit line, outcome denied."""
        if state.audit is None or request.method not in ("GET", "HEAD"):
            return
        target = _lookup_target(request.raw_path)
        if target is not None:
            state.audit.record(rid, target[0].value, target[1], "denied", caller=caller)

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = _request_id(request)
        token = request_id.set(rid)
        try:
            if tcp_token is not None:
                if "X-Forwarded-For" in request.headers or "Forwarded" in request.headers:
                    state.metrics.rejected.labels("forwarded").inc()
                    return error_response(
                        400, "bad_request", "proxied requests are refused (X-Forwarded-For/Forwarded)"
                    )
                given = request.headers.get("X-Broker-Token", "").encode()
                if not hmac.compare_digest(given, tcp_token):
                    state.metrics.rejected.labels("unauthorized").inc()
                    audit_refused(request, rid, Caller("tcp"))
                    return error_response(401, "unauthorized", "missing or wrong X-Broker-Token")
            elif peers.active and not peers.allowed(request):
                state.metrics.rejected.labels("peer_denied").inc()
                audit_refused(request, rid, caller_of(request) or Caller("unix"))
                return error_response(403, "forbidden", "this uid/gid may not use the broker socket")
            response = await handler(request)
            response.headers["X-Request-Id"] = rid
            return response
        except web.HTTPException as exc:
            code = {404: "not_found", 405: "method_not_allowed", 413: "bad_request"}.get(exc.status, "bad_request")
            return error_response(exc.status, code, exc.reason)
        finally:
            request_id.reset(token)

    app = web.Application(
        middlewares=[edge],
        client_max_size=cfg.max_body_bytes,
        handler_args={"max_field_size": 8190, "max_line_size": 65536},
    )
    app[STATE] = state

    async def secret(request: web.Request) -> web.Response:
        caller = caller_of(request)
        if state.node is None:
            return await serve_secret(state, request, caller)
        # Node mode: every request is the calling pod's, verified before anything else is looked at.
        try:
            pod, partition = await state.node.caller(request.headers.get("Authorization"))
        except BrokerError as exc:
            if caller is not None:
                audit_refused(request, request_id.get() or "", caller)
            headers = {"Retry-After": "1"} if exc.status == 429 else None
            return error_response(exc.status, exc.code, exc.message, headers)
        if caller is not None:
            caller = dataclasses.replace(caller, verified=pod.as_audit())
        partition.active += 1
        try:
            return await serve_secret(state, request, caller, partition.cache)
        finally:
            partition.active -= 1
            partition.last_used = state.clock.now()

    app.router.add_route("*", ANY_UNDER_V1, secret, expect_handler=expect_handler)
    app.router.add_get("/healthz", _healthz, expect_handler=expect_handler)
    app.router.add_get("/readyz", _readyz, expect_handler=expect_handler)
    app.router.add_get("/openapi.json", _openapi, expect_handler=expect_handler)
    app.router.add_route(
        "*", ANY_PATH, _no_route(frozenset({"/healthz", "/readyz", "/openapi.json"})), expect_handler=expect_handler
    )
    return with_header_timeout(app)


def _no_route(get_only: frozenset[str]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Our own catch-all, so that aiohttp's built-in 404 route (and its Expect handling) is never used:
    405 with ``Allow`` for another method on one of the app's GET endpoints, else 404."""

    async def handler(request: web.Request) -> web.Response:
        if request.path in get_only and request.method not in ("GET", "HEAD"):
            message = f"{request.path} answers GET and HEAD only"
            return error_response(405, "method_not_allowed", message, {"Allow": "GET, HEAD"})
        return error_response(404, "not_found", "no such endpoint")

    return handler


async def _healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    reasons = state.not_ready_reasons()
    state.metrics.ready.set(0 if reasons else 1)
    if reasons:
        return json_response({"status": "not_ready", "reasons": reasons}, status=503)
    return json_response({"status": "ready"})


@functools.cache
def _openapi_document() -> bytes | None:
    try:
        return (Path(__file__).resolve().parent.parent / "openapi.json").read_bytes()
    except OSError:
        return None


async def _openapi(_request: web.Request) -> web.Response:
    body = _openapi_document()  # read once, then served from memory
    if body is None:
        return error_response(404, "not_found", "no API description in this build")
    return web.Response(body=body, content_type="application/json", headers=NO_STORE)


def _split(raw_path: str) -> tuple[str, str] | None:
    """('connections', raw name) from the raw, still percent-encoded path, or None for no such endpoint.

    The raw name is everything after the collection: a nested id (``team/db``) keeps its slashes.
    """
    path = raw_path.split("?", 1)[0]
    parts = path.split("/", 3)
    # ['', 'v1', '<collection>', '<name, maybe with slashes>']
    if len(parts) != 4 or parts[0] or parts[1] != "v1":
        return None
    return parts[2], parts[3]


def _lookup_target(raw_path: str) -> tuple[Kind, str] | None:
    """(kind, name) when ``raw_path`` is a well-formed secret lookup, else None."""
    split = _split(raw_path)
    if split is None or split[0] not in KINDS:
        return None
    name, _ = decode_name(split[1])
    return None if name is None else (KINDS[split[0]], name)


def requested_team(request: web.Request) -> tuple[str | None, str | None]:
    """(team, None) from the optional ``?team=`` query parameter (None when absent), or (None, problem)."""
    teams = request.rel_url.query.getall("team", [])
    if not teams:
        return None, None
    if len(teams) > 1:
        return None, "give team at most once"
    problem = team_problem(teams[0])
    return (None, problem) if problem else (teams[0], None)


async def serve_secret(
    state: BrokerState, request: web.Request, caller: Caller | None = None, cache: SecretCache | None = None
) -> web.Response:
    """GET /v1/{connections|variables|config}/{name} and POST /v1/cache/invalidate, on ``cache`` (node mode:
    the caller's identity partition) or the broker's own."""
    split = _split(request.raw_path)
    if split is None:
        return error_response(404, "not_found", "no such endpoint")
    collection, raw_name = split
    if collection == "cache" and raw_name == "invalidate":
        if request.method != "POST":
            return error_response(405, "method_not_allowed", "use POST", {"Allow": "POST"})
        return await _invalidate(state, request, state.cache if cache is None else cache)
    kind = KINDS.get(collection)
    if kind is None:
        return error_response(404, "not_found", "no such endpoint")
    if request.method not in ("GET", "HEAD"):
        return error_response(405, "method_not_allowed", "use GET", {"Allow": "GET"})
    name, problem = decode_name(raw_name)
    team, team_error = requested_team(request)
    if team is not None and kind is Kind.CONFIG:
        team_error = "config lookups take no team (Airflow reads config with no team)"
    if name is None or team_error:
        state.metrics.requests.labels(kind.value, "bad_request").inc()
        return error_response(400, "bad_request", problem or team_error or "bad request")
    asserted = None
    if state.audit is not None:
        headers = request.headers
        asserted = [(field, headers[h]) for h, field in ASSERTED_HEADERS.items() if h in headers]
    rid = request_id.get() or ""
    return await lookup(state, kind, name, rid=rid, caller=caller, asserted=asserted, cache=cache, team=team)


async def lookup(
    state: BrokerState,
    kind: Kind,
    name: str,
    *,
    rid: str | bytes = "",
    caller: Caller | None = None,
    asserted: Any = None,
    cache: SecretCache | None = None,
    team: str | None = None,
) -> web.Response:
    """Answer one secret lookup for ``team`` (None: team-agnostic); with the audit trail on, exactly one audit
    line records it. A listener bound to a team answers for that team only: no team means the bound one,
    another team is refused with 403 ``forbidden``."""
    metrics = state.metrics
    audit = state.audit
    bound = state.config.listen.team
    if bound is not None:
        if team is not None and team != bound:
            metrics.requests.labels(kind.value, "forbidden").inc()
            metrics.rejected.labels("team_denied").inc()
            log.warning("request for another team refused", extra={"kind": kind.value, "team": team, "bound": bound})
            if audit is not None:
                audit.record(rid, kind.value, name, "denied", team=team, caller=caller, asserted=asserted)
            return error_response(403, "forbidden", "this listener serves one team only; no other team's secrets")
        team = bound
    if state.inflight >= state.config.listen.max_concurrency:
        metrics.requests.labels(kind.value, "overloaded").inc()
        if audit is not None:
            audit.record(rid, kind.value, name, "overloaded", team=team, caller=caller, asserted=asserted)
        return error_response(429, "overloaded", "too many requests in flight; retry shortly", {"Retry-After": "1"})
    state.inflight += 1
    metrics.inflight.inc()
    started = time.perf_counter()
    try:
        try:
            entry, status = await (state.cache if cache is None else cache).get(kind, name, team)
        except BrokerError as exc:
            metrics.requests.labels(kind.value, exc.code).inc()
            if audit is not None:
                audit.record(rid, kind.value, name, outcome_of(exc.code), team=team, caller=caller, asserted=asserted)
            if exc.status >= 500:
                log.warning("lookup failed", extra={"kind": kind.value, "error": exc.code, "detail": exc.message})
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
            return error_response(exc.status, exc.code, exc.message, headers)
        metrics.requests.labels(kind.value, status.value).inc()
        if audit is not None:
            backend = entry.resolved.backend if entry.resolved is not None else None
            audit.record(
                rid,
                kind.value,
                name,
                "found",
                backend=backend,
                cache=status.value,
                team=team,
                caller=caller,
                asserted=asserted,
            )
        return _found(entry, status, state.clock.now())
    finally:
        state.inflight -= 1
        metrics.inflight.dec()
        metrics.request_latency.labels(kind.value).observe(time.perf_counter() - started)


def _found(entry: Entry, status: Status, now: float) -> web.Response:
    body = entry.json_head() + b',"cache":"%s","age":%d}' % (status.value.encode(), max(0, int(now - entry.fetched_at)))
    return web.Response(
        body=body, content_type="application/json", headers={**NO_STORE, "X-Broker-Cache": status.value}
    )


async def _invalidate(state: BrokerState, request: web.Request, cache: SecretCache) -> web.Response:
    try:
        raw = await request.read()
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return error_response(400, "bad_request", "body must be JSON")
    if not isinstance(body, dict) or set(body) - {"kind", "name"}:
        return error_response(400, "bad_request", 'body must be {"kind": ..., "name": ...} or {}')
    if any(not isinstance(body[key], str) for key in body):
        return error_response(400, "bad_request", "kind and name must be strings (leave a key out to mean all)")
    kind_raw, name = body.get("kind"), body.get("name")
    kind = None
    if kind_raw is not None:
        try:
            kind = Kind(kind_raw)
        except ValueError:
            return error_response(400, "bad_request", "kind must be connection, variable or config")
    if name is not None:
        if kind is None:
            return error_response(400, "bad_request", "name needs a kind")
        if not isinstance(name, str):
            return error_response(400, "bad_request", "name must be a string")
        problem = name_problem(name)
        if problem:
            return error_response(400, "bad_request", problem)
    dropped = cache.invalidate(kind, name)
    state.metrics.requests.labels("invalidate", "ok").inc()
    log.info("cache invalidated", extra={"kind": kind_raw or "all", "entries": dropped})
    return web.Response(status=204, headers=NO_STORE)


# ---------------------------------------------------------------------------------------------- metrics app


def build_metrics_app(state: BrokerState) -> web.Application:
    """/metrics, /healthz, /readyz: no secret and no secret name is ever served here."""
    app = web.Application()
    app[STATE] = state

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(state.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics, expect_handler=expect_handler)
    app.router.add_get("/healthz", _healthz, expect_handler=expect_handler)
    app.router.add_get("/readyz", _readyz, expect_handler=expect_handler)
    app.router.add_route(
        "*", ANY_PATH, _no_route(frozenset({"/metrics", "/healthz", "/readyz"})), expect_handler=expect_handler
    )
    return with_header_timeout(app)


# ---------------------------------------------------------------------------------------------- sockets


class SocketPathError(ListenError):
    """The socket path is taken by something we must not replace."""


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """A listening unix socket at ``path`` with ``mode``, whatever the umask.

    A stale socket file (nobody accepting) is replaced; a live one or a non-socket file is an error.
    Raises SocketPathError.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketPathError(
                f"API socket (listen.socket) {path} exists and is not a socket; refusing to replace it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        except OSError as exc:
            raise SocketPathError(
                f"API socket (listen.socket) {path}: cannot probe the existing socket: {exc.strerror}"
            ) from None
        else:
            raise SocketPathError(
                f"API socket (listen.socket) {path}: address already in use (another process is accepting on it)"
            )
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the file is never more open than 0600 before the chmod below
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SocketPathError(f"API socket (listen.socket) {path}: cannot listen: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock
