"""Hostile requests against a live daemon: no 5xx, no crash, no value from outside the configured layout."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.broker_process import BrokerProcess
from tests.support.leakcheck import plant

INSIDE = "inside-value-6c1d"
OUTSIDE = "outside-value-never-served-0b3e"
plant("hostile", INSIDE, OUTSIDE)
PLANTED_ENV = {"AIRFLOW_VAR_INSIDE": INSIDE, "OUTSIDE_SECRET": OUTSIDE, "AIRFLOW_CONN_OUTSIDE": "x://outside"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    work = tmp_path_factory.mktemp("hostile")
    (work / "vars.json").write_text(json.dumps({"inside": INSIDE}))
    (work / "outside.json").write_text(json.dumps({"inside": OUTSIDE, "outside": OUTSIDE}))
    config = {
        "listen": {"header_timeout": 2},
        "backends": [
            {"name": "files", "type": "file", "variables_file_path": str(work / "vars.json")},
            {"name": "env", "type": "env", "connections_prefix": None, "config_prefix": None},
        ],
    }
    (work / "b").mkdir()
    proc = BrokerProcess(config, work / "b", env={**os.environ, **PLANTED_ENV}).start()
    yield proc
    assert proc.proc is not None and proc.proc.poll() is None, "the broker died under hostile input"
    proc.stop()
    assert OUTSIDE not in proc.logs()


def exchange(path: str, raw: bytes, half_close: bool = True) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(path)
        s.sendall(raw)
        if half_close:  # garbage may leave the server waiting for more: tell it there is none
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except (ConnectionResetError, BrokenPipeError):
        return b""  # the broker may close on garbage; what matters is no 5xx and that it stays up
    finally:
        s.close()


SEGMENT_ALPHABET = st.sampled_from(
    [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        "%2f",
        "%2F",
        "/",
        "\\",
        "%00",
        "%ff%fe",
        "%c0%af",
        "?",
        "#",
        ";",
        " ",
        "\t",
        "%0d%0a",
        "outside",
        "inside",
        "OUTSIDE_SECRET",
        "..%2fOUTSIDE_SECRET",
        "~",
        "%",
        "%%",
        "a" * 300,
    ]
)
NAME = st.lists(st.one_of(SEGMENT_ALPHABET, st.text(min_size=0, max_size=12)), min_size=1, max_size=6).map("".join)
METHOD = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"PUT",
        b"DELETE",
        b"HEAD",
        b"OPTIONS",
        b"TRACE",
        b"PATCH",
        b"CONNECT",
        b"get",
        b"G\x00T",
        b"BREW",
    ]
)
COLLECTION = st.sampled_from(["connections", "variables", "config", "cache", "", "v1", "secrets"])


def request_bytes(method: bytes, collection: str, name: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    path = f"/v1/{collection}/{name}".encode("utf-8", errors="surrogateescape")
    head = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    for key, value in headers:
        head += key + b": " + value + b"\r\n"
    if body:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


HEADER = st.tuples(
    st.sampled_from(
        [
            b"X-Broker-Token",
            b"X-Forwarded-For",
            b"X-Request-Id",
            b"Content-Type",
            b"Transfer-Encoding",
            b"Expect",
            b"X\x01Bad",
        ]
    ),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=METHOD, collection=COLLECTION, name=NAME, headers=st.lists(HEADER, max_size=3), body=st.binary(max_size=200)
)
def test_hostile_requests(
    broker: BrokerProcess, method: bytes, collection: str, name: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    answer = exchange(broker.socket_path, request_bytes(method, collection, name, headers, body))
    if not answer:
        return
    status_line = answer.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ")
    assert parts[0].startswith(b"HTTP/1."), status_line
    status = int(parts[1])
    assert status < 500, (status, answer[:300])
    assert OUTSIDE.encode() not in answer
    if status == 200:
        body_json: Any = json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1", 1)[0] or b"{}")
        assert body_json.get("value") in (INSIDE, None) or body_json.get("status")


def test_crafted_names_never_reach_outside(broker: BrokerProcess) -> None:
    for raw in (
        "..%2Foutside",
        "..%2F..%2Foutside.json",
        "%2e%2e%2FOUTSIDE_SECRET",
        "..%5COUTSIDE_SECRET",
        "inside%00",
        "inside%2F..%2F..%2Foutside",
    ):
        status, body, _ = broker.request("GET", f"/v1/variables/{raw}")
        assert status in (400, 404) and OUTSIDE not in json.dumps(body)
    assert broker.get("variable", "inside")[1]["value"] == INSIDE
    assert broker.get("variable", "outside_secret")[0] == 404  # AIRFLOW_VAR_OUTSIDE_SECRET, not OUTSIDE_SECRET
    assert broker.get("connection", "outside")[0] == 404  # connections are off for the env backend


def test_core_dumps_are_disabled(broker: BrokerProcess) -> None:
    assert broker.proc is not None
    limits = Path(f"/proc/{broker.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core


@pytest.mark.parametrize("path", [b"/v1/variables/inside", b"/nope", b"/", b"/healthz"])
def test_undecodable_expect_header_is_a_4xx(broker: BrokerProcess, path: bytes) -> None:
    raw = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: \xa1o\xaa\r\n\r\n"
    answer = exchange(broker.socket_path, raw, half_close=False)
    status = int(answer.split(b" ", 2)[1])
    assert 200 <= status < 500, answer[:200]
