"""Listening sockets around aiohttp's request handler: a connection cap and a header timeout.

aiohttp has neither: a client that opens connections and never finishes its headers would hold them
forever. Each accepted connection gets ``header_timeout`` to deliver its first request; connections past
``max_connections`` get a 503 JSON answer and are closed at once.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server

from broker.metrics import Metrics
from broker.server.edge import CONNECTION_CAP, NO_STORE, OVER_CAP_ANSWER, error_body

SEEN: web.AppKey[set[int]] = web.AppKey("seen_protocols")


class _JsonErrors(RequestHandler):
    """aiohttp's request handler with JSON answers for the requests it cannot parse (a head too long, bytes
    that are not HTTP) and for unexpected errors: its own are text that quotes the request's bytes."""

    __slots__ = ()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises when an answer was already sent
        if status >= 500:
            body = error_body("internal_error", "the broker failed to answer this request")
        else:
            body = error_body("bad_request", "malformed or oversized HTTP request")
        resp = web.Response(status=status, body=body, content_type="application/json", headers=NO_STORE)
        resp.force_close()
        return resp


def request_handler(server: Server) -> RequestHandler:
    """A request handler for one connection to ``server``, as ``server()`` would make it, with JSON errors."""
    return _JsonErrors(server, loop=asyncio.get_running_loop(), **server._kwargs)


class ListenError(Exception):
    """A listener cannot be bound; the message names the listener and its address."""


class _Refuse(asyncio.Protocol):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._metrics.rejected.labels(CONNECTION_CAP.reason).inc()
        # uvloop's transports do not subclass asyncio.WriteTransport, so no isinstance check here.
        transport.write(OVER_CAP_ANSWER)  # type: ignore[attr-defined]
        transport.close()


class _Guarded(asyncio.Protocol):
    """Forwards to aiohttp's RequestHandler; counts the connection and enforces the header timeout."""

    def __init__(self, inner: Any, listener: Listener) -> None:
        self._inner = inner
        self._listener = listener
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._listener.connections += 1
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._listener.header_timeout, self._expire)
        self._inner.connection_made(transport)

    def _expire(self) -> None:
        if id(self._inner) not in self._listener.seen and self._transport is not None:
            self._listener.metrics.rejected.labels("header_timeout").inc()
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.connections -= 1
        self._listener.seen.discard(id(self._inner))
        if self._timer is not None:
            self._timer.cancel()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class Listener:
    """One listening socket served by an aiohttp runner's request handler."""

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        *,
        max_connections: int,
        header_timeout: float,
        metrics: Metrics,
        front: Any = None,
    ) -> None:
        self.runner = runner
        self.sock = sock
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.metrics = metrics
        self.front = front  # broker.server.fast.FastFront for API listeners, when enabled
        self.connections = 0
        # ids of handlers that have received a complete request (aiohttp's handler has __slots__)
        self.seen: set[int] = runner.app[SEEN]
        self._server: asyncio.base_events.Server | None = None

    def _factory(self) -> asyncio.Protocol:
        if self.connections >= self.max_connections:
            return _Refuse(self.metrics)
        server = self.runner.server
        assert server is not None
        if self.front is not None:
            return _Guarded(self.front.protocol(lambda: request_handler(server)), self)
        return _Guarded(request_handler(server), self)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(self._factory, sock=self.sock, backlog=1024)
        else:
            self._server = await loop.create_server(self._factory, sock=self.sock, backlog=1024)

    def close(self) -> None:
        """Stop accepting; connections already open are drained by the runner's cleanup."""
        if self._server is not None:
            self._server.close()


@web.middleware
async def seen_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every request that reached the application lifts its connection's header timeout."""
    request.app[SEEN].add(id(request.protocol))
    response: web.StreamResponse = await handler(request)
    return response


def with_header_timeout(app: web.Application) -> web.Application:
    app[SEEN] = set()
    app.middlewares.insert(0, seen_middleware)
    return app


def tcp_socket(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket; ``what`` names the listener in the error. Raises ListenError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise ListenError(f"{what} {shown}: cannot listen: {exc.strerror or exc}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock
