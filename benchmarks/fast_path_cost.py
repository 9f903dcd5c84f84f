"""Cost of one fast-path cache hit, in-process: a FastProtocol fed GETs over a transport that only counts
what is written, against a warm cache, 50 pipelined requests per read and one request per read (as wrk
and broker.client send them: the per-read work counts in full). No sockets, no client: the figure is the
broker's own work per hit (parsing, edge rules, the answer), and the minimum over many short repeats, so
another process sharing the cores moves it little.

Variants: the unix socket, the socket bound to a team (``listen.team``), and loopback TCP with its token.
Usage: python benchmarks/fast_path_cost.py [--repeats 60] [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from broker.backends.base import Kind
from broker.config import validate_config
from broker.server import EDGE, build_api_app
from broker.server.fast import FastFront
from broker.state import BrokerState

TOKEN = b"bench-token-" + b"x" * 24


class CountingTransport:
    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def variant(
    work: Path, name: str, listen: dict[str, Any], target: bytes, headers: bytes, args: argparse.Namespace
) -> str:
    (work / "v.json").write_text(json.dumps({"bench": "value-123"}))
    config = validate_config(
        {
            "multi_team": "team" in listen,
            "listen": {"socket": str(work / "s.sock"), **listen},
            "metrics": {"listen": None},
            "cache": {"ttl": 3600, "refresh_ahead": 0},
            "backends": [{"name": "f", "type": "file", "variables_file_path": str(work / "v.json")}],
        }
    )
    state = BrokerState(config)
    try:
        await state.cache.get(Kind.VARIABLE, "bench", listen.get("team"))
        token = TOKEN if "tcp" in listen else None
        front = FastFront(state, policy=build_api_app(state, tcp_token=token)[EDGE])
        proto = front.protocol(asyncio.Protocol)
        transport = CountingTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        one = b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n"
        figures = []
        for per_read in (50, 1):
            batch = one * per_read
            reads = args.requests // per_read
            best = float("inf")
            for _ in range(args.repeats):
                transport.writes = 0
                started = time.perf_counter()
                for _ in range(reads):
                    proto.data_received(batch)
                while proto.pending is not None or proto.buf:  # a miss goes through lookup(): count its cost too
                    await asyncio.sleep(0)
                best = min(best, (time.perf_counter() - started) / (reads * per_read))
            assert transport.writes == reads * per_read and proto.inner is None, "not all answered fast"
            figures.append(f"{best * 1e6:.2f} | {1 / best:,.0f}")
        return f"| {name} | {' | '.join(figures)} |"
    finally:
        state.executor.shutdown(wait=False)


async def main(args: argparse.Namespace) -> None:
    rows = []
    path = b"/v1/variables/bench"
    variants = [
        ("unix socket", {}, path, b""),
        ("unix socket, bound to a team", {"team": "alpha"}, path, b""),
        ("unix socket, ?team= of the bound team", {"team": "alpha"}, path + b"?team=alpha", b""),
        ("loopback TCP with token", {"tcp": "127.0.0.1:1", "token_file": "-"}, path, b"X-Broker-Token: %s\r\n" % TOKEN),
    ]
    for name, listen, target, headers in variants:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if "token_file" in listen:
                (work / "token").write_bytes(TOKEN)
            given = {**listen, "token_file": str(work / "token")} if "token_file" in listen else listen
            rows.append(await variant(work, name, given, target, headers, args))
    print(
        "| fast-path hit | us per hit, 50 per read (min) | hits/s of one core | us per hit, one per read (min) "
        "| hits/s of one core |\n|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--requests", type=int, default=20_000)
    asyncio.run(main(parser.parse_args()))
