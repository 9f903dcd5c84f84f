"""The listener around aiohttp's handler, in-process on a unix socket: the connection cap and the header
timeout."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from broker.config import validate_config
from broker.server import bind_unix_socket, build_api_app
from broker.server.listener import Listener
from broker.state import BrokerState


@pytest.fixture
async def listener() -> AsyncIterator[tuple[Listener, str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    path = work / "s.sock"
    config = validate_config({"listen": {"socket": str(path)}, "backends": [{"name": "env", "type": "env"}]})
    state = BrokerState(config)
    runner = web.AppRunner(build_api_app(state), handle_signals=False, access_log=None)
    await runner.setup()
    lis = Listener(runner, bind_unix_socket(path, 0o600), max_connections=2, header_timeout=0.2, metrics=state.metrics)
    await lis.start()
    try:
        yield lis, str(path), state
    finally:
        lis.close()
        await runner.cleanup()
        state.executor.shutdown(wait=False)
        shutil.rmtree(work, ignore_errors=True)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(-1), 10)


async def test_past_the_cap_a_503_whose_length_is_its_body(listener: tuple[Listener, str, Any]) -> None:
    lis, path, state = listener
    held = [await asyncio.open_unix_connection(path) for _ in range(2)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while lis.connections < 2:
        assert loop.time() < deadline, "connections not counted"
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_unix_connection(path)
    raw = await read_all(reader)  # the broker closes it
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert int(headers["Content-Length"]) == len(body)  # a client reading by length would wait for a byte
    assert json.loads(body)["error"] == "overloaded" and headers["Retry-After"] == "1"
    assert state.metrics.rejected.labels("connection_cap")._value.get() == 1
    for _, w in held:
        w.close()
        await w.wait_closed()


async def test_a_head_never_finished_is_closed(listener: tuple[Listener, str, Any]) -> None:
    _, path, state = listener
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"GET /v1/variables/k HTTP/1.1\r\nHost: x\r\n")
    assert await read_all(reader) == b""  # closed by the broker, not by us
    writer.close()
    assert state.metrics.rejected.labels("header_timeout")._value.get() == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/variables/k HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"secretish" * 1000 + b"\r\n\r\n",
        b"GARBAGE secretish\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01secretish\r\n\r\n",
        b"GET /v1/variables/k HTTP/1.1\r\nHost: x\r\nContent-Length: x-secretish\r\n\r\n",
    ],
    ids=["long header", "not a method", "tls hello", "bad length"],
)
async def test_unparseable_requests_get_json_that_quotes_nothing(
    listener: tuple[Listener, str, Any], raw: bytes
) -> None:
    _, path, _ = listener
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(raw)
    answer = await read_all(reader)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400" and b"Content-Type: application/json" in head
    assert json.loads(body)["error"] == "bad_request" and b"secretish" not in answer
