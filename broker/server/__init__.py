"""The HTTP edge: the secrets API (unix socket, optional loopback TCP) and the metrics listener.

Every answer is JSON; every error carries ``{"error": code, "message": ...}`` and never a secret value.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.audit import ASSERTED_HEADERS, Caller, outcome_of
from broker.backends.base import BrokerError, Kind
from broker.cache import Entry, SecretCache, Status
from broker.logging import request_id
from broker.resolver import decode_name, name_problem
from broker.server import edge
from broker.server.edge import KINDS, NO_STORE, EdgePolicy, Refusal
from broker.server.listener import ListenError, with_header_timeout

if TYPE_CHECKING:
    from broker.state import BrokerState

log = logging.getLogger("broker.server")

# Routes match the decoded path: ``[\s\S]`` (not ``.``) so a name with an encoded newline still reaches the
# handler and is refused 400 by the name rules, instead of missing the route and answering 404 not_found.
ANY_UNDER_V1 = r"/v1/{tail:[\s\S]*}"
ANY_PATH = r"/{tail:[\s\S]*}"
STATE: web.AppKey[BrokerState] = web.AppKey("state")
EDGE: web.AppKey[EdgePolicy] = web.AppKey("edge")
PEER: web.RequestKey[edge.Peer] = web.RequestKey("peer")  # set by the edge middleware
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
    return web.Response(
        status=status,
        body=edge.error_body(code, message),
        content_type="application/json",
        headers={**NO_STORE, **(headers or {})},
    )


def refusal_response(refusal: Refusal) -> web.Response:
    return web.Response(
        status=refusal.status,
        body=refusal.body,
        content_type="application/json",
        headers={**NO_STORE, **dict(refusal.headers)},
    )


def json_response(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers={**NO_STORE, **(headers or {})},
    )


# ---------------------------------------------------------------------------------------------- API app


def build_api_app(state: BrokerState, *, tcp_token: bytes | None = None) -> web.Application:
    """The secrets API. ``tcp_token`` set means this app serves the loopback TCP listener."""
    cfg = state.config.listen
    policy = EdgePolicy(cfg, tcp_token)
    metrics = state.metrics

    @web.middleware
    async def edge_rules(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = policy.request_id(request.headers.getall("X-Request-Id", []))
        token = request_id.set(rid)
        try:
            peer = policy.peer(request.transport, audit=state.audit is not None)
            refusal = policy.refusal(peer, request.headers)
            if refusal is not None:
                # A wrong token names no caller: its fingerprint would be the listener's own token's.
                caller = Caller("tcp") if refusal is edge.UNAUTHORIZED else peer.caller
                edge.report_refusal(
                    refusal,
                    metrics,
                    state.audit,
                    request_id=rid,
                    method=request.method,
                    raw_path=request.raw_path,
                    caller=caller,
                )
                response: web.StreamResponse = refusal_response(refusal)
            else:
                request[PEER] = peer
                response = await handler(request)
        except web.HTTPException as exc:
            code = {404: "not_found", 405: "method_not_allowed", 413: "bad_request"}.get(exc.status, "bad_request")
            response = error_response(exc.status, code, exc.reason)
        finally:
            request_id.reset(token)
        response.headers["X-Request-Id"] = rid
        return response

    app = web.Application(
        middlewares=[edge_rules],
        client_max_size=cfg.max_body_bytes,
        handler_args={"max_field_size": edge.MAX_FIELD_SIZE, "max_line_size": edge.MAX_LINE_SIZE},
    )
    app[STATE] = state
    app[EDGE] = policy

    async def secret(request: web.Request) -> web.Response:
        peer = request[PEER]
        caller = peer.caller if state.audit is not None else None
        if state.node is None:
            return await serve_secret(state, request, caller, bound=peer.team)
        # Node mode: every request is the calling pod's, verified before anything else is looked at.
        try:
            pod, partition = await state.node.caller(request.headers.get("Authorization"))
        except BrokerError as exc:
            if caller is not None:
                edge.report_denied_read(
                    state.audit,
                    request_id=request_id.get() or "",
                    method=request.method,
                    raw_path=request.raw_path,
                    caller=caller,
                )
            headers = {"Retry-After": "1"} if exc.status == 429 else None
            return error_response(exc.status, exc.code, exc.message, headers)
        if caller is not None:
            caller = dataclasses.replace(caller, verified=pod.as_audit())
        partition.active += 1
        try:
            return await serve_secret(state, request, caller, partition.cache, bound=peer.team)
        finally:
            partition.active -= 1
            partition.last_used = state.clock.now()

    app.router.add_route("*", ANY_UNDER_V1, secret, expect_handler=expect_handler)
    return _with_plain_routes(app, {"/healthz": _healthz, "/readyz": _readyz, "/openapi.json": _openapi})


def _with_plain_routes(
    app: web.Application, get: dict[str, Callable[[web.Request], Awaitable[web.Response]]]
) -> web.Application:
    """Add the GET-only routes, then our own catch-all for every other path, and the head timeout."""
    for path, handler in get.items():
        app.router.add_get(path, handler, expect_handler=expect_handler)
    app.router.add_route("*", ANY_PATH, _no_route(frozenset(get)), expect_handler=expect_handler)
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


async def serve_secret(
    state: BrokerState,
    request: web.Request,
    caller: Caller | None = None,
    cache: SecretCache | None = None,
    *,
    bound: str | None = None,
) -> web.Response:
    """GET /v1/{connections|variables|config}/{name} and POST /v1/cache/invalidate, on ``cache`` (node mode:
    the caller's identity partition) or the broker's own; ``bound``: the team the caller is bound to."""
    split = edge.split_path(request.raw_path)
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
    teams = request.rel_url.query.getall("team", [])
    team_error = edge.team_query_problem(teams, kind)
    team = teams[0] if teams and not team_error else None
    if name is None or team_error:
        state.metrics.requests.labels(kind.value, "bad_request").inc()
        return error_response(400, "bad_request", problem or team_error or "bad request")
    asserted = None
    if state.audit is not None:
        headers = request.headers
        asserted = [(field, headers[h]) for h, field in ASSERTED_HEADERS.items() if h in headers]
    rid = request_id.get() or ""
    return await lookup(
        state, kind, name, rid=rid, caller=caller, asserted=asserted, cache=cache, team=team, bound=bound
    )


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
    bound: str | None = None,
) -> web.Response:
    """Answer one secret lookup for ``team`` (None: team-agnostic); with the audit trail on, exactly one audit
    line records it. A caller bound to a team (``bound``: the listener's or its uid's) is answered for that
    team only: no team means the bound one, another team is refused with 403 ``forbidden``."""
    metrics = state.metrics
    audit = state.audit
    team, refused = edge.bound_team(bound, team)
    if refused:
        refusal = edge.TEAM_DENIED
        metrics.requests.labels(kind.value, "forbidden").inc()
        metrics.rejected.labels(refusal.reason).inc()
        log.warning("request for another team refused", extra={"kind": kind.value, "team": team, "bound": bound})
        if audit is not None:
            audit.record(rid, kind.value, name, "denied", team=team, caller=caller, asserted=asserted)
        return refusal_response(refusal)
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
    return web.Response(
        body=edge.found_body(entry, status.value.encode(), now),
        content_type="application/json",
        headers={**NO_STORE, "X-Broker-Cache": status.value},
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

    return _with_plain_routes(app, {"/metrics": metrics, "/healthz": _healthz, "/readyz": _readyz})


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
