"""A loopback HTTP(S) reverse proxy that injects faults between the broker and a real test backend.

Modes: ``pass`` (forward), ``refuse`` (the listening socket is closed: connections are refused), ``reset``
(the connection is aborted as soon as a request arrives), ``stall`` (the request is held, never answered,
until the mode changes), ``hold`` (the request reaches the upstream, whose answer is held back until the mode
changes: the store has done the work, a lease it granted exists, and the caller is still waiting), ``cut`` (the
upstream answer is sent with its full ``Content-Length`` but only half
its body, then the connection is closed), ``error`` (a 503 from the proxy), ``throttle`` (the store's own
throttling answer, given by the caller), ``deny`` and ``expired`` (the store's own answers to a caller
without the permission, and to a caller whose credential has expired, when the caller gives them), and three
200 answers that are not the store's: ``garbage`` (an HTML
page), ``oversize`` (a JSON body over the broker's bound) and ``shape`` (a JSON object whose fields carry each
store's names with the wrong types). ``set(mode, times=N)`` applies a fault to the next N requests only,
then forwards again. It listens with TLS when given a server context and reaches a TLS
upstream with a client context, so it sits in front of any of the test stores. It runs its own event loop in
a thread; counters say how many requests arrived and how many reached the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
MODES = (
    "pass",
    "refuse",
    "reset",
    "stall",
    "hold",
    "cut",
    "error",
    "throttle",
    "deny",
    "expired",
    "garbage",
    "oversize",
    "shape",
)
GARBAGE = b"<html><head><title>Sign in</title></head><body>Please sign in to continue.</body></html>"
OVERSIZE = b'{"data": {"data": {"value": "' + b"x" * (2 << 20) + b'"}}}'
# Vault (data), GCP (payload), Azure (value), Secrets Manager (ARN, SecretString), SSM (Parameter): all mistyped.
SHAPE = b'{"data": ["value"], "payload": "data", "value": 7, "ARN": 1, "SecretString": 7, "Parameter": "Value"}'


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        listen_tls: ssl.SSLContext | None = None,
        upstream_tls: ssl.SSLContext | None = None,
        throttle: tuple[int, dict[str, str], bytes] = (429, {"Retry-After": "1"}, b'{"error": "throttled"}'),
        deny: tuple[int, dict[str, str], bytes] | None = None,
        expired: tuple[int, dict[str, str], bytes] | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.listen_tls = listen_tls
        self.upstream_tls = upstream_tls
        self.answers = {"throttle": throttle, "deny": deny, "expired": expired}
        self.mode = "pass"
        self.left: int | None = None  # requests the current fault still applies to (None: until changed)
        self.requests = 0
        self.forwarded = 0
        self.by_mode: Counter[str] = Counter()
        self.port = 0
        self.url = ""
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------------------------------ control

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> FaultProxy:
        self._thread.start()
        self._run(self._start())
        scheme = "https" if self.listen_tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        return self

    def set(self, mode: str, times: int | None = None) -> None:
        """Switch the fault (for the next ``times`` requests only, when given); leaving ``stall`` or ``hold``
        releases held requests, ``refuse`` closes/reopens the listener."""
        assert mode in MODES, mode
        assert mode in ("pass", "throttle", "deny", "expired", "error", "garbage", "oversize", "shape") or (
            times is None
        ), f"{mode} cannot be counted"
        assert mode not in self.answers or self.answers[mode] is not None, f"no {mode} answer for this store"
        self._run(self._set(mode, times))

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.requests, self.forwarded

    def stop(self) -> None:
        try:
            self._run(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    # ------------------------------------------------------------------------------------------ loop side

    async def _start(self) -> None:
        self._release = asyncio.Event()
        connector = aiohttp.TCPConnector(ssl=self.upstream_tls if self.upstream_tls else False)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False)
        app = web.Application(client_max_size=8 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.listen_tls, reuse_address=True)
        await self._site.start()
        if not self.port:
            server: Any = self._site._server  # the bound port of a site started on port 0
            self.port = int(server.sockets[0].getsockname()[1])

    async def _set(self, mode: str, times: int | None = None) -> None:
        previous, self.mode = self.mode, mode
        self.left = times
        if previous in ("stall", "hold") and self._release is not None:
            self._release.set()
            self._release = asyncio.Event()
        if mode == "refuse" and previous != "refuse" and self._site is not None:
            await self._site.stop()
            self._site = None
            # kept-alive connections would still get through: close them too
            server: Any = self._runner.server if self._runner is not None else None
            for handler in list(getattr(server, "connections", [])):
                transport = handler.transport
                if transport is not None:
                    transport.close()
        if mode != "refuse" and previous == "refuse":
            await self._listen()

    async def _stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        mode = self.mode
        if self.left is not None:  # a counted fault: this request uses one, the last one restores "pass"
            self.left -= 1
            if self.left <= 0:
                self.mode, self.left = "pass", None
        with self._lock:
            self.requests += 1
            self.by_mode[mode] += 1
        body = await request.read()
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=499)
        if mode == "stall":
            release = self._release
            assert release is not None
            try:
                await asyncio.wait_for(release.wait(), 120)
            except TimeoutError:
                pass
            if request.transport is not None:  # gone already when the client gave up
                request.transport.close()
            return web.Response(status=499)
        if mode == "error":
            return web.json_response({"error": "injected by the fault proxy"}, status=503)
        if mode == "garbage":
            return web.Response(status=200, body=GARBAGE, content_type="text/html")
        if mode == "oversize":
            return web.Response(status=200, body=OVERSIZE, content_type="application/json")
        if mode == "shape":
            return web.Response(status=200, body=SHAPE, content_type="application/json")
        answer = self.answers.get(mode)
        if answer is not None:
            status, headers, payload = answer
            return web.Response(status=status, headers=headers, body=payload, content_type=None)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            data = await upstream.read()
            status = upstream.status
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        with self._lock:
            self.forwarded += 1
        if mode == "hold":
            release = self._release
            assert release is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 120)
        if mode == "cut":
            response = web.StreamResponse(status=status, headers=out_headers)
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: max(1, len(data) // 2)])
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(status=status, headers=out_headers, body=data)
