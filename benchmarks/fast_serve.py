"""``broker serve`` with the fast front of ``broker.server.fast`` wired in, for side-by-side figures.

Benchmark-only wiring: the API listeners' protocol factory returns the fast protocol (wrapping
aiohttp's request handler) instead of the handler itself; the metrics listener is unchanged.
Usage: python benchmarks/fast_serve.py serve --config PATH
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio

from aiohttp import web

import broker.app
from broker.cli import main
from broker.server import STATE
from broker.server.fast import FastFront
from broker.server.listener import Listener, _Guarded

TOKENS: dict[int, bytes | None] = {}
_build_api_app = broker.app.build_api_app


def build_api_app(state: Any, *, tcp_token: bytes | None = None) -> web.Application:
    app = _build_api_app(state, tcp_token=tcp_token)
    TOKENS[id(app)] = tcp_token
    return app


def factory(self: Listener) -> asyncio.Protocol:
    app = self.runner.app
    server = self.runner.server
    assert server is not None
    if id(app) not in TOKENS:  # the metrics listener
        return _ORIGINAL(self)
    front = getattr(self, "_fast_front", None)
    if front is None:
        front = FastFront(app[STATE], tcp_token=TOKENS[id(app)], seen=self.seen)
        self._fast_front = front  # type: ignore[attr-defined]
    if self.connections >= self.max_connections:
        return _ORIGINAL(self)
    return _Guarded(front.protocol(server), self)


_ORIGINAL = Listener._factory
broker.app.build_api_app = build_api_app  # type: ignore[assignment]
Listener._factory = factory  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
