"""The stdlib client's HTTP/1.1 reading, against scripted answers on a socket pair."""

from __future__ import annotations

import socket
import threading

import pytest

from broker.client import BrokerClient, BrokerUnavailableError, _Connection, _ProtocolError


def answer(raw: bytes, request: bytes = b"GET / HTTP/1.1\r\n\r\n") -> tuple[int, bytes, bool]:
    a, b = socket.socketpair()
    try:
        b.sendall(raw)
        b.shutdown(socket.SHUT_WR)
        return _Connection(a).exchange(request)
    finally:
        a.close()
        b.close()


def test_content_length_and_keep_alive() -> None:
    assert answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") == (200, b"{}", True)
    assert answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")[2] is False
    assert answer(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")[2] is False


def test_chunked_and_no_body_statuses() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    assert answer(raw)[1] == b"abcde"
    assert answer(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, b"", True)


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(_ProtocolError):
        answer(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_keep_alive_connection_is_reused_and_retried_once_when_closed(tmp_path: object) -> None:
    path = str(tmp_path) + "/s.sock"  # type: ignore[operator]
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    accepted: list[int] = []

    def serve() -> None:
        for round_ in range(2):
            conn, _ = server.accept()
            accepted.append(round_)
            for _ in range(2 if round_ == 0 else 1):
                conn.recv(4096)
                conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"value":"v"}')
            conn.close()  # idle keep-alive connection closed by the server

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = BrokerClient(socket_path=path, timeout=5)
    assert [client.get("variable", "k") for _ in range(3)] == ["v", "v", "v"]
    thread.join(5)
    server.close()
    assert accepted == [0, 1]  # two requests on the first connection, one retry on a fresh one


def test_timeout_is_unavailable(tmp_path: object) -> None:
    path = str(tmp_path) + "/t.sock"  # type: ignore[operator]
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    try:
        with pytest.raises(BrokerUnavailableError, match="did not answer"):
            BrokerClient(socket_path=path, timeout=0.2).get("variable", "k")
    finally:
        server.close()


def test_the_task_context_airflow_sets_is_sent_as_headers_and_unsafe_values_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker.client import airflow_context, context_head

    for var in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_TASK_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TRY_NUMBER"):
        monkeypatch.delenv(var, raising=False)
    assert airflow_context() == {}  # outside a task: nothing asserted
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "etl")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "load")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-12-02T00:00:00+00:00")
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", "1")
    assert context_head(airflow_context()) == (
        "X-Airflow-Dag-Id: etl\r\nX-Airflow-Task-Id: load\r\n"
        "X-Airflow-Run-Id: manual__2026-12-02T00:00:00+00:00\r\nX-Airflow-Try-Number: 1\r\n"
    )
    # a value that could split the request or is absurdly long is left out, not sent
    assert context_head({"X-Airflow-Dag-Id": "a\r\nX-Broker-Token: t", "X-Airflow-Task-Id": "x" * 300}) == ""


def test_the_context_is_read_at_every_request(tmp_path: object) -> None:
    path = str(tmp_path) + "/c.sock"  # type: ignore[operator]
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        for _ in range(2):
            seen.append(conn.recv(4096))
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"value":"v"}')
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    task = {"X-Airflow-Task-Id": "first"}
    client = BrokerClient(socket_path=path, timeout=5, context=lambda: task)
    client.get("variable", "k")
    task["X-Airflow-Task-Id"] = "second"
    client.get("variable", "k")
    thread.join(5)
    server.close()
    assert b"X-Airflow-Task-Id: first\r\n" in seen[0] and b"X-Airflow-Task-Id: second\r\n" in seen[1]
