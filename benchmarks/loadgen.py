"""A small HTTP/1.1 load generator for unix sockets (and TCP), plus a trivial server to check its ceiling.

wrk cannot talk to a unix socket, so the broker's own socket is measured with this. It keeps ``N``
connections alive, each with one request outstanding (like Airflow processes, which never pipeline),
and records every request's latency. It runs in its own process; ``trivial-server`` answers a canned
response with no work at all, so "loadgen against trivial-server" is the ceiling of this generator on
this machine, and a broker figure well below it is the broker's, not the generator's.

Modes (each prints one JSON object on stdout):
  run    --unix PATH | --tcp HOST:PORT  --path P [--header 'K: V'] -c N -d SECONDS [--warmup S]
  herd   --unix PATH --path P -n 1000            N connections opened first, then N requests at once
  fill   --unix PATH --pattern '/v1/variables/v{i}' --count N [-c 16]   warm N distinct keys
  trivial-server --unix PATH                     runs until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from typing import Any

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def _loop_runner() -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def build_request(path: str, headers: list[str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Client(asyncio.Protocol):
    """One keep-alive connection: send, wait for the whole response, record, send again."""

    def __init__(self, request: bytes | list[bytes], stats: Stats) -> None:
        self.requests = request if isinstance(request, list) else None
        self.request = request if isinstance(request, bytes) else b""
        self.stats = stats
        self.buf = b""
        self.sent_at = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.stopped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.stopped or self.transport is None:
            return
        if self.requests is not None:
            if not self.requests:
                self.transport.close()
                return
            self.request = self.requests.pop()
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[: end + 4]
            match = _CONTENT_LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            total = end + 4 + length
            if len(buf) < total:
                break
            self.stats.record(int(head[9:12]), time.perf_counter_ns() - self.sent_at)
            buf = buf[total:]
            self.send()
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopped and self.requests is None:
            self.stats.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class Stats:
    def __init__(self) -> None:
        self.recording = False
        self.latencies: list[int] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.first_done = 0
        self.last_done = 0

    def record(self, status: int, latency_ns: int) -> None:
        self.last_done = time.perf_counter_ns()
        if not self.recording:
            return
        self.latencies.append(latency_ns)
        self.statuses[status] = self.statuses.get(status, 0) + 1


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def summary(stats: Stats, seconds: float) -> dict[str, Any]:
    lat = sorted(stats.latencies)
    return {
        "requests": len(lat),
        "seconds": round(seconds, 3),
        "rps": round(len(lat) / seconds, 1) if seconds > 0 else 0.0,
        "p50_us": round(percentile(lat, 0.50) / 1000, 1),
        "p99_us": round(percentile(lat, 0.99) / 1000, 1),
        "max_us": round(lat[-1] / 1000, 1) if lat else None,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "errors": stats.errors,
    }


async def _connect(args: argparse.Namespace, factory: Any) -> Any:
    loop = asyncio.get_running_loop()
    if args.unix:
        _, proto = await loop.create_unix_connection(factory, args.unix)
    else:
        host, port = args.tcp.rsplit(":", 1)
        _, proto = await loop.create_connection(factory, host, int(port))
    return proto


async def run(args: argparse.Namespace) -> dict[str, Any]:
    request = build_request(args.path, args.header)
    stats = Stats()
    clients = [await _connect(args, lambda: Client(request, stats)) for _ in range(args.connections)]
    await asyncio.sleep(args.warmup)
    stats.recording = True
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    stats.recording = False
    elapsed = time.perf_counter() - started
    for client in clients:
        client.stopped = True
        if client.transport is not None:
            client.transport.close()
    await asyncio.gather(*(c.closed for c in clients))
    return summary(stats, elapsed)


async def herd(args: argparse.Namespace) -> dict[str, Any]:
    """N connections, then N requests written back to back; time from the first write to the last answer."""
    request = build_request(args.path, args.header)
    stats = Stats()
    stats.recording = True
    loop = asyncio.get_running_loop()
    clients: list[Client] = []

    class Once(Client):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def send(self) -> None:
            if self.sent_at == 0:
                self.sent_at = time.perf_counter_ns()
                assert self.transport is not None
                self.transport.write(self.request)
            elif self.transport is not None:
                self.stopped = True
                self.transport.close()

    for _ in range(args.n):
        if args.unix:
            _, proto = await loop.create_unix_connection(lambda: Once(request, stats), args.unix)
        else:
            host, port = args.tcp.rsplit(":", 1)
            _, proto = await loop.create_connection(lambda: Once(request, stats), host, int(port))
        clients.append(proto)
    started = time.perf_counter_ns()
    for client in clients:
        client.send()
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), timeout=60)
    out = summary(stats, (stats.last_done - started) / 1e9)
    out["all_served_ms"] = round((stats.last_done - started) / 1e6, 1)
    return out


async def fill(args: argparse.Namespace) -> dict[str, Any]:
    requests = [build_request(args.pattern.format(i=i), args.header) for i in range(args.count)]
    stats = Stats()
    stats.recording = True
    started = time.perf_counter()
    clients = [await _connect(args, lambda: Client(requests, stats)) for _ in range(args.connections)]
    await asyncio.gather(*(c.closed for c in clients))
    return summary(stats, time.perf_counter() - started)


_BODY = b'{"value":"postgres://u:p@h:5432/db","backend":"bench","version":null,"cache":"hit","age":0}'
_CANNED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)


class Trivial(asyncio.Protocol):
    """Answers every complete request head with the same bytes: no parsing beyond the blank line."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        count = buf.count(b"\r\n\r\n")
        if count:
            self.transport.write(_CANNED * count)
            buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
        self.buf = buf


async def trivial_server(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.unix:
        server = await loop.create_unix_server(Trivial, args.unix)
    else:
        host, port = args.tcp.rsplit(":", 1)
        server = await loop.create_server(Trivial, host, int(port))
    print(json.dumps({"listening": True}), flush=True)
    await stop.wait()
    server.close()
    if args.unix:
        os.unlink(args.unix)
    return {"stopped": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["run", "herd", "fill", "trivial-server"])
    parser.add_argument("--unix")
    parser.add_argument("--tcp")
    parser.add_argument("--path", default="/v1/connections/bench")
    parser.add_argument("--pattern", default="/v1/variables/v{i}")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("-c", "--connections", type=int, default=8)
    parser.add_argument("-d", "--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args(argv)
    if not (args.unix or args.tcp):
        parser.error("--unix or --tcp is required")
    modes = {"run": run, "herd": herd, "fill": fill, "trivial-server": trivial_server}
    result = _loop_runner()(modes[args.mode](args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
