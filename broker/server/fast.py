"""A fast front for the secrets API: fresh cache hits answered straight from the protocol.

``GET /v1/{connections|variables|config}/{name}`` whose answer is a fresh cache hit is parsed with
httptools, checked (name rules, TCP token, proxy headers, unix peer credentials) and answered with a
prepared response, with no framework work per request. A cache miss on such a request is looked up with
the same ``lookup()`` the application uses and written back in order. Anything else (other paths and
methods, bodies, HEAD, HTTP/1.0, ``Connection: close``, a bad name, a missing token, a refused peer,
a malformed request) is handed, from the first byte of that request on, to the aiohttp request handler
for the rest of the connection, so every error answer and edge rule stays in one place.

Wiring (see ``FastFront``): the listener's protocol factory returns ``front.protocol(runner.server)``
instead of ``runner.server()``; ``front.close_idle()`` runs when the listener stops accepting.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools  # type: ignore[import-not-found,unused-ignore]

from broker.audit import ASSERTED_HEADERS_BYTES, Caller, token_caller, unix_caller
from broker.backends.base import Kind
from broker.resolver import decode_name
from broker.server import lookup, peer_credentials

if TYPE_CHECKING:
    from aiohttp import web

    from broker.state import BrokerState

KINDS = {b"connections": Kind.CONNECTION, b"variables": Kind.VARIABLE, b"config": Kind.CONFIG}
DRAIN_QUIET = 0.2  # seconds without a byte before an idle kept-alive connection is closed on shutdown
_MAX_HEAD = 16_384  # a longer head goes to aiohttp, which answers it with its own limits
_RID_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_HIT_PREFIX = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
    b"X-Content-Type-Options: nosniff\r\nServer: broker\r\nX-Broker-Cache: hit\r\n"
)


def _serialise(response: web.Response, request_id: bytes) -> bytes:
    """An aiohttp Response as HTTP/1.1 bytes (status, its headers, length, request id, body)."""
    body = response.body if isinstance(response.body, bytes) else b""
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    lines += [f"{k}: {v}" for k, v in response.headers.items() if k.lower() != "content-length"]
    lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\nX-Request-Id: " + request_id + b"\r\n\r\n" + body


class FastFront:
    """Per listener: the state, the TCP token (None on the unix socket), and the live fast connections."""

    def __init__(self, state: BrokerState, *, tcp_token: bytes | None, seen: set[int] | None = None) -> None:
        self.state = state
        self.tcp_token = tcp_token
        self.seen = seen  # the listener's header-timeout bookkeeping (ids of protocols that sent a request)
        self.connections: set[FastProtocol] = set()
        self.draining = False
        listen = state.config.listen
        self.uids = set(listen.allowed_uids) if listen.allowed_uids is not None else None
        self.gids = set(listen.allowed_gids) if listen.allowed_gids is not None else None
        metrics = state.metrics
        self.hit_counters = {k: metrics.requests.labels(k.value, "hit") for k in Kind}
        # Request targets already checked (raw URL -> kind, name): repeated lookups skip decoding and checks.
        self.targets: dict[bytes, tuple[Kind, str]] = {}
        self._rid_prefix = os.urandom(4).hex()
        self._rid_seq = itertools.count(1)
        self.latency = {k: metrics.request_latency.labels(k.value) for k in Kind}
        self.tcp_caller = token_caller(tcp_token) if tcp_token is not None else None

    def target(self, url: bytes) -> tuple[Kind, str] | None:
        """(kind, name) for ``GET /v1/{collection}/{name}`` with an acceptable name, else None."""
        known = self.targets.get(url)
        if known is not None:
            return known
        parts = url.split(b"/")
        if len(parts) != 4 or parts[0] or parts[1] != b"v1":
            return None
        kind = KINDS.get(parts[2])
        if kind is None:
            return None
        try:
            raw = parts[3].decode("ascii")
        except UnicodeDecodeError:
            return None
        name, _ = decode_name(raw)  # also refuses '?', '#', '%' and an encoded '/' or '\\'
        if name is None:
            return None
        if len(self.targets) >= 4096:
            self.targets.clear()
        self.targets[url] = (kind, name)
        return kind, name

    def request_id(self) -> bytes:
        return f"{self._rid_prefix}{next(self._rid_seq):x}".encode()

    def protocol(self, handler_factory: Callable[[], asyncio.Protocol]) -> FastProtocol:
        return FastProtocol(self, handler_factory)

    def peer_allowed(self, sock: socket.socket | None) -> bool:
        if self.uids is None and self.gids is None:
            return True
        if sock is None or sock.family != socket.AF_UNIX:
            return True
        try:
            _, uid, gid = peer_credentials(sock)
        except OSError:
            return False
        return (self.uids is not None and uid in self.uids) or (self.gids is not None and gid in self.gids)

    def close_idle(self, quiet: float = 0.0) -> None:
        """Close fast connections with no request in progress and nothing received for ``quiet`` seconds."""
        now = asyncio.get_running_loop().time()
        for proto in list(self.connections):
            if now - proto.last_activity >= quiet:
                proto.close_if_idle()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a cancel scope
        """Finish what kept-alive connections are doing, then close them (aiohttp's runner does not see them).

        From now on every answer says ``Connection: close`` and its connection closes once it is written;
        a connection with nothing in progress is closed once it has been quiet for a moment, so a request
        a client sent just before the close is read and answered rather than reset.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(p.inner is None for p in self.connections) and loop.time() < deadline:
            self.close_idle(DRAIN_QUIET)
            await asyncio.sleep(0.02)
        for proto in list(self.connections):
            if proto.transport is not None and proto.inner is None:
                proto.transport.close()


class FastProtocol(asyncio.Protocol):
    """One connection: fast answers while requests qualify, then aiohttp's handler for the rest."""

    def __init__(self, front: FastFront, handler_factory: Callable[[], asyncio.Protocol]) -> None:
        self.front = front
        self.handler_factory = handler_factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.buf = b""
        self.pending: asyncio.Task[Any] | None = None
        # per-request parse results
        self.url = b""
        self.token: bytes | None = None
        self.tokens = 0
        self.forwarded = False
        self.request_id: bytes | None = None
        self.complete = False
        self.keep_alive = False
        self.last_activity = asyncio.get_running_loop().time()
        self.audit = front.state.audit
        self.caller: Caller | None = None  # set once per connection when the audit trail is on
        self.asserted: list[tuple[str, bytes]] | None = None  # the request's X-Airflow-* headers

    # ---- httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"x-broker-token":
            self.token = value
            self.tokens += 1
        elif lowered in (b"x-forwarded-for", b"forwarded"):
            self.forwarded = True
        elif lowered == b"x-request-id":
            self.request_id = value
        elif self.audit is not None and lowered.startswith(b"x-airflow-"):
            field = ASSERTED_HEADERS_BYTES.get(lowered)
            if field is not None:
                if self.asserted is None:
                    self.asserted = []
                self.asserted.append((field, value))

    def on_headers_complete(self) -> None:
        # Only meaningful inside the parser's callbacks: read after feed_data() it can describe the
        # previous message on a pipelined connection.
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.complete = True

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.connections.add(self)
        if self.audit is not None:
            self.caller = self.front.tcp_caller or unix_caller(transport.get_extra_info("socket"))
        if not self.front.peer_allowed(transport.get_extra_info("socket")):
            self._hand_off(b"")  # aiohttp answers every request on it with 403 and counts it

    def data_received(self, data: bytes) -> None:
        self.last_activity = asyncio.get_running_loop().time()
        if self.inner is not None:
            self.inner.data_received(data)
            return
        self.buf += data
        if self.pending is None:
            self._drain()

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        if self.front.seen is not None:
            self.front.seen.discard(id(self.inner))
        if self.pending is not None:
            self.pending.cancel()
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def close_if_idle(self) -> None:
        if self.inner is None and self.pending is None and not self.buf and self.transport is not None:
            self.transport.close()

    # ---- the fast path

    def _drain(self) -> None:
        """Answer every complete, qualifying request in the buffer; hand off at the first that is not."""
        transport = self.transport
        assert transport is not None
        while self.buf:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._hand_off(self.buf)
                return
            head = self.buf[: end + 4]
            if self.front.seen is not None:
                self.front.seen.add(id(self))  # lifts the header timeout, as aiohttp's middleware does
            target = self._parse(head)
            if target is None:
                self._hand_off(self.buf)
                return
            kind, name = target
            self.buf = self.buf[end + 4 :]
            answer = self._hit(kind, name)
            if answer is not None:
                transport.write(answer)
                if self.front.draining:
                    transport.close()  # the answer said Connection: close; written before the close
                    return
                continue
            # A miss (or anything but a plain fresh hit): the application's own lookup, in order.
            transport.pause_reading()
            self.pending = asyncio.get_running_loop().create_task(self._slow(kind, name, self._rid(), self.asserted))
            return

    def _parse(self, head: bytes) -> tuple[Kind, str] | None:
        """(kind, name) when ``head`` is a complete, qualifying GET; None to hand it to aiohttp."""
        self.url, self.token, self.tokens, self.forwarded, self.request_id = b"", None, 0, False, None
        self.asserted = None
        self.complete = self.keep_alive = False
        try:
            self.parser.feed_data(head)
        except httptools.HttpParserError:
            return None
        if not self.complete or self.parser.get_method() != b"GET" or self.parser.get_http_version() != "1.1":
            return None
        if not self.keep_alive:
            return None
        token = self.front.tcp_token
        if token is not None and (
            self.forwarded or self.tokens != 1 or self.token is None or not hmac.compare_digest(self.token, token)
        ):
            return None
        return self.front.target(self.url)

    def _hit(self, kind: Kind, name: str) -> bytes | None:
        """The prepared answer for a fresh hit, or None when the cache has to do more than look."""
        started = time.perf_counter()
        state = self.front.state
        entry = state.cache.hit(kind, name)
        if entry is None:
            return None  # a miss, stale, or due for refresh-ahead: the cache's get() decides
        now = state.clock.now()
        body = entry.json_head() + b',"cache":"hit","age":%d}' % max(0, int(now - entry.fetched_at))
        rid = self._rid()
        answer = b"%s%sContent-Length: %d\r\nX-Request-Id: %s\r\n\r\n%s" % (
            _HIT_PREFIX,
            b"Connection: close\r\n" if self.front.draining else b"",
            len(body),
            rid,
            body,
        )
        if self.audit is not None:
            resolved = entry.resolved
            self.audit.record(
                rid,
                kind.value,
                name,
                "found",
                backend=resolved.backend if resolved is not None else None,
                cache="hit",
                caller=self.caller,
                asserted=self.asserted,
            )
        self.front.hit_counters[kind].inc()
        self.front.latency[kind].observe(time.perf_counter() - started)
        return answer

    def _rid(self) -> bytes:
        given = self.request_id
        if given is not None and 0 < len(given) <= 64 and all(c in _RID_OK for c in given):
            return given
        return self.front.request_id()

    async def _slow(self, kind: Kind, name: str, request_id: bytes, asserted: list[tuple[str, bytes]] | None) -> None:
        transport = self.transport
        assert transport is not None
        try:
            response = await lookup(self.front.state, kind, name, rid=request_id, caller=self.caller, asserted=asserted)
        except Exception:
            # lookup() maps every BrokerError itself; anything else is a bug: drop the connection
            # rather than leave the client waiting.
            transport.close()
            raise
        finally:
            self.pending = None
        if transport.is_closing():
            return
        if self.front.draining:
            response.headers["Connection"] = "close"
            transport.write(_serialise(response, request_id))
            transport.close()
            return
        transport.write(_serialise(response, request_id))
        transport.resume_reading()
        self._drain()

    def _hand_off(self, data: bytes) -> None:
        """From here on the connection is aiohttp's; ``data`` starts at the first byte of a request."""
        assert self.transport is not None
        inner = self.handler_factory()
        self.inner = inner
        inner.connection_made(self.transport)
        self.buf = b""
        if data:
            inner.data_received(data)
