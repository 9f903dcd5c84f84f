"""A fast front for the secrets API: fresh cache hits answered straight from the protocol.

``GET /v1/{connections|variables|config}/{name}[?team=T]`` whose answer is a fresh cache hit is parsed
with httptools, checked with the listener's edge rules (``broker.server.edge``: name rules, TCP token,
proxy headers, unix peer credentials, the caller's team) and answered with a prepared response, with no
framework work per request. A cache miss on such a request (or a refused team) is looked up with the same
``lookup()`` the application uses and written back in order. Anything else (other paths and methods,
bodies, HEAD, HTTP/1.0, ``Connection: close``, ``Expect``, a bad name, a missing token, a refused peer,
a long or malformed head) is handed, from the first byte of that request on, to the aiohttp request
handler for the rest of the connection, so every refusal is answered in one place.

Wiring (see ``FastFront``): the listener's protocol factory returns ``front.protocol(runner.server)``
instead of ``runner.server()``; ``front.close_idle()`` runs when the listener stops accepting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools  # type: ignore[import-not-found,unused-ignore]

from broker.audit import ASSERTED_HEADERS_BYTES, Caller
from broker.backends.base import Kind
from broker.server import edge, lookup
from broker.server.edge import FORWARDED_HEADERS_BYTES, HIT_PREFIX, MAX_FIELD_SIZE, bound_team, found_body

if TYPE_CHECKING:
    from aiohttp import web

    from broker.server.edge import EdgePolicy
    from broker.state import BrokerState

DRAIN_QUIET = 0.2  # seconds without a byte before an idle kept-alive connection is closed on shutdown
_MAX_TARGETS = 4096
_MAX_HEADS, _MAX_HEAD_SIZE = 256, 1024

# What a request head says, as the parser read it: the target, X-Broker-Token values, whether it carried a
# proxy header, X-Request-Id values, the asserted X-Airflow-* headers.
_Head = tuple[bytes, "list[bytes] | None", bool, "list[bytes] | None", "list[tuple[str, bytes]] | None"]


def _serialise(response: web.Response, request_id: bytes) -> bytes:
    """An aiohttp Response as HTTP/1.1 bytes (status, its headers, length, request id, body)."""
    body = response.body if isinstance(response.body, bytes) else b""
    return edge.raw_response(response.status, response.headers.items(), body, request_id)


class FastFront:
    """Per listener: the state, its edge rules (shared with the listener's application), and the live fast
    connections."""

    def __init__(self, state: BrokerState, *, policy: EdgePolicy, seen: set[int] | None = None) -> None:
        self.state = state
        self.policy = policy
        self.tcp_token = policy.tcp_token
        self.seen = seen  # the listener's header-timeout bookkeeping (ids of protocols that sent a request)
        self.connections: set[FastProtocol] = set()
        self.draining = False
        metrics = state.metrics
        self.hit_tallies = {k: metrics.hit_tally(k.value) for k in Kind}
        # Request targets already read (raw URL -> kind, name, team): repeated lookups skip decoding and checks.
        self.targets: dict[bytes, tuple[Kind, str, str | None]] = {}
        # Request heads already read, byte for byte: a client repeating a lookup sends the same head, and the
        # parser reads the same bytes the same way, so it is not run again (the checks on what it read are).
        self.heads: dict[bytes, _Head] = {}
        # Both hold only what was read for a lookup answered as a fresh hit: a miss waits on a store anyway,
        # and a name looked up once (a cache being filled) would only push out the ones looked up again.

    def learn(self, head: bytes, read: _Head, target: tuple[Kind, str, str | None]) -> None:
        """Remember what ``head`` read and the target its URL names, for the next time they are sent."""
        if len(head) <= _MAX_HEAD_SIZE and read[3] is None:  # a request id is usually new every time
            if len(self.heads) >= _MAX_HEADS:
                self.heads.clear()
            self.heads[head] = read
        if len(self.targets) >= _MAX_TARGETS:
            self.targets.clear()
        self.targets[read[0]] = target

    def protocol(self, handler_factory: Callable[[], asyncio.Protocol]) -> FastProtocol:
        return FastProtocol(self, handler_factory)

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
        # Python 3.11's get_running_loop() makes a getpid() system call: once per connection, not per read.
        self.loop = asyncio.get_running_loop()
        self.buf = b""
        self.pending: asyncio.Task[Any] | None = None
        # per-request parse results
        self.url = b""
        self.tokens: list[bytes] | None = None  # X-Broker-Token values (lists made only when there are any)
        self.forwarded = False
        self.expect = False
        self.request_ids: list[bytes] | None = None
        self.complete = False
        self.keep_alive = False
        self.last_activity = self.loop.time()
        self.audit = front.state.audit
        self.caller: Caller | None = None  # set once per connection when the audit trail is on
        self.bound: str | None = None  # the team this connection's caller is bound to
        self.request_id_of = front.policy.request_id_bytes
        self.new_request_id = front.policy.new_request_id
        self.asserted: list[tuple[str, bytes]] | None = None  # the request's X-Airflow-* headers
        # What the request's head and target read when the front had not remembered both (FastFront.learn)
        self.fresh: tuple[bytes, _Head, tuple[Kind, str, str | None]] | None = None

    # ---- httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"x-broker-token":
            if self.tokens is None:
                self.tokens = []
            self.tokens.append(value)
        elif lowered in FORWARDED_HEADERS_BYTES:
            self.forwarded = True
        elif lowered == b"x-request-id":
            if self.request_ids is None:
                self.request_ids = []
            self.request_ids.append(value)
        elif lowered == b"expect":
            self.expect = True  # aiohttp's expect handler answers it (100 Continue, or 417)
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
        peer = self.front.policy.peer(transport, audit=self.audit is not None)
        self.bound = peer.team
        if self.audit is not None:
            self.caller = peer.caller
        if not peer.allowed:
            self._hand_off(b"")  # aiohttp answers every request on it with 403 and counts it

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
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
                if len(self.buf) > MAX_FIELD_SIZE:
                    self._hand_off(self.buf)
                return
            if end > MAX_FIELD_SIZE:  # it may hold a field longer than aiohttp accepts: aiohttp says
                self._hand_off(self.buf)
                return
            head = self.buf[: end + 4]
            if self.front.seen is not None:
                self.front.seen.add(id(self))  # lifts the header timeout, as aiohttp's middleware does
            target = self._parse(head)
            if target is None:
                self._hand_off(self.buf)
                return
            kind, name, asked = target
            self.buf = self.buf[end + 4 :]
            if self.bound is None:
                answer = self._hit(kind, name, asked)
            else:
                team, refused = bound_team(self.bound, asked)
                answer = None if refused else self._hit(kind, name, team)
            if answer is not None:
                if self.fresh is not None:
                    self.front.learn(*self.fresh)
                    self.fresh = None
                transport.write(answer)
                if self.front.draining:
                    transport.close()  # the answer said Connection: close; written before the close
                    return
                continue
            # A miss (or anything but a plain fresh hit): the application's own lookup, in order. A refused
            # team goes there too: lookup() refuses it, logs it and audits it.
            self.fresh = None
            transport.pause_reading()
            self.pending = self.loop.create_task(self._slow(kind, name, asked, self._rid(), self.asserted))
            return

    def _parse(self, head: bytes) -> tuple[Kind, str, str | None] | None:
        """(kind, name, team) when ``head`` is a complete, qualifying GET; None to hand it to aiohttp."""
        front = self.front
        read = front.heads.get(head)
        known = read is not None
        if read is None:
            read = self._read(head)
            if read is None:
                return None
        url, self.tokens, forwarded, self.request_ids, self.asserted = read
        token = front.tcp_token
        if token is not None and (forwarded or not edge.token_ok(self.tokens or [], token)):
            return None  # refused: aiohttp answers it with the same rules
        target = front.targets.get(url)
        if target is None:
            target = edge.fast_target(url)
            if target is None:
                return None
        elif known:
            return target
        self.fresh = (head, read, target)
        return target

    def _read(self, head: bytes) -> _Head | None:
        """What the parser reads in ``head``, when it is one complete keep-alive HTTP/1.1 GET without Expect."""
        self.url, self.forwarded, self.expect = b"", False, False
        self.tokens = self.request_ids = None
        self.asserted = None
        self.complete = self.keep_alive = False
        try:
            self.parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # not an error subclass
            return None
        if not self.complete or self.parser.get_method() != b"GET" or self.parser.get_http_version() != "1.1":
            return None
        if not self.keep_alive or self.expect:
            return None
        return self.url, self.tokens, self.forwarded, self.request_ids, self.asserted

    def _hit(self, kind: Kind, name: str, team: str | None) -> bytes | None:
        """The prepared answer for a fresh hit, or None when the cache has to do more than look."""
        started = time.perf_counter()
        state = self.front.state
        entry = state.cache.hit(kind, name, team)
        if entry is None:
            return None  # a miss, stale, or due for refresh-ahead: the cache's get() decides
        body = found_body(entry, b"hit", state.clock.now())
        rid = self._rid()
        answer = b"%s%sContent-Length: %d\r\nX-Request-Id: %s\r\n\r\n%s" % (
            HIT_PREFIX,
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
                team=team,
                caller=self.caller,
                asserted=self.asserted,
            )
        self.front.hit_tallies[kind].add(time.perf_counter() - started)
        return answer

    def _rid(self) -> bytes:
        given = self.request_ids
        return self.new_request_id() if given is None else self.request_id_of(given)

    async def _slow(
        self,
        kind: Kind,
        name: str,
        team: str | None,
        request_id: bytes,
        asserted: list[tuple[str, bytes]] | None,
    ) -> None:
        transport = self.transport
        assert transport is not None
        try:
            response = await lookup(
                self.front.state,
                kind,
                name,
                rid=request_id,
                caller=self.caller,
                asserted=asserted,
                team=team,
                bound=self.bound,
            )
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
