"""An asyncio load generator for the broker's unix socket: keep-alive HTTP/1.1 clients and a request mix."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # connection-level failures, by exception name
    non_json_errors: int = 0

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else 0.0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def client(
    socket_path: str,
    next_request: Callable[[int], tuple[str, bytes]],
    until: float,
    tally: Tally,
    stop_on_refused: bool = False,
) -> None:
    """One client: requests back to back on a kept-alive connection (reconnects when the server closes)."""
    n = 0
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while time.monotonic() < until:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_unix_connection(socket_path)
                except (ConnectionRefusedError, FileNotFoundError) as exc:
                    tally.errors[f"connect:{type(exc).__name__}"] += 1
                    if stop_on_refused:
                        return
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            label, raw = next_request(n)
            n += 1
            started = time.perf_counter()
            try:
                writer.write(raw)
                await writer.drain()
                status, body, close = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                tally.errors[type(exc).__name__] += 1
                writer.close()
                writer = None
                if stop_on_refused:
                    return
                continue
            tally.latencies.append(time.perf_counter() - started)
            tally.statuses[(label, status)] += 1
            if status >= 400 and not body.startswith(b"{"):
                tally.non_json_errors += 1
            if close:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: broker\r\n\r\n".encode()
