"""BrokerSecretsBackend against a scripted broker, with the import shapes of Airflow 2.10 and 3.3 faked.

The real Airflow 2.10, 3.1 and 3.3 run these paths in tests/e2e (a 403 in the server and task contexts
there; 3.1, which has no ``AirflowSecretsBackendAccessDenied``, only there) and tests/parity.
"""

from __future__ import annotations

import importlib
import socket
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FORBIDDEN = b'{"error":"forbidden","message":"the store refused the identity"}'


class Scripted:
    """A unix-socket 'broker' that records request heads and answers each with the next scripted reply."""

    def __init__(self, path: str, replies: list[tuple[int, bytes]]) -> None:
        self.path = path
        self.replies = list(replies)
        self.requests: list[str] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(path)
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            buf = b""
            while self.replies:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append(head.split(b"\r\n", 1)[0].decode())
                status, body = self.replies.pop(0)
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))

    def close(self) -> None:
        self.thread.join(5)
        self.server.close()


def fake_airflow(monkeypatch: pytest.MonkeyPatch, denied_in: str | None) -> type[Exception] | None:
    """Install a minimal ``airflow`` package shaped like one version; the class it denies with, if any."""

    class BaseSecretsBackend:
        def __init__(self, **_: Any) -> None:
            pass

    modules = {name: types.ModuleType(name) for name in ("airflow", "airflow.secrets", "airflow.exceptions")}
    modules["airflow.secrets"].BaseSecretsBackend = BaseSecretsBackend  # type: ignore[attr-defined]
    denied: type[Exception] | None = None
    if denied_in is not None:
        denied = type("AirflowSecretsBackendAccessDenied", (PermissionError,), {})
        modules.setdefault(denied_in, types.ModuleType(denied_in))
        setattr(modules[denied_in], "AirflowSecretsBackendAccessDenied", denied)
    if denied_in != "airflow.sdk.exceptions":
        modules.setdefault("airflow.sdk.exceptions", types.ModuleType("airflow.sdk.exceptions"))  # 3.1: no class
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "broker.airflow", raising=False)
    return denied


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "b.sock")


@pytest.mark.parametrize(
    ("version", "denied_in"),
    [("2.10 (none)", None), ("3.3", "airflow.sdk.exceptions")],
)
def test_403_is_airflows_access_denied_where_it_has_one(
    monkeypatch: pytest.MonkeyPatch, sock: str, version: str, denied_in: str | None
) -> None:
    denied = fake_airflow(monkeypatch, denied_in)
    if version.startswith("2.10"):
        monkeypatch.delitem(sys.modules, "airflow.sdk.exceptions", raising=False)
        monkeypatch.setitem(sys.modules, "airflow.sdk", None)  # 2.10 has no task SDK: importing it fails
    backend_module = importlib.import_module("broker.airflow")
    assert backend_module.access_denied_class() is denied
    server = Scripted(sock, [(403, FORBIDDEN), (403, FORBIDDEN)])
    try:
        backend = backend_module.BrokerSecretsBackend(socket_path=sock, timeout="2")
        expected = denied if denied is not None else backend_module.BrokerAccessDeniedError
        with pytest.raises(expected):  # 3.3 stops its search on it; 2.10 logs it and goes on
            backend.get_conn_value("db")
        with pytest.raises(expected):
            backend.get_variable("v", team_name="t1")
    finally:
        server.close()


def test_team_and_nested_ids_reach_the_broker_and_the_provider_string_is_handed_over(
    monkeypatch: pytest.MonkeyPatch, sock: str
) -> None:
    fake_airflow(monkeypatch, "airflow.sdk.exceptions")
    backend_module = importlib.import_module("broker.airflow")
    uri = "postgres://u:p%40ss@h:5432/db?ssl=true&timeout=5"
    found = b'{"value":"{\\"conn_type\\":\\"postgres\\"}","backend":"b","version":null,"provider_value":"%s"}' % (
        uri.encode()
    )
    server = Scripted(sock, [(200, found), (200, found), (200, b'{"value":"x","backend":"b","version":null}')] * 1)
    try:
        provider = backend_module.BrokerSecretsBackend(socket_path=sock)
        assert provider.get_conn_value("team/db", team_name="team a") == uri
        normalised = backend_module.BrokerSecretsBackend(socket_path=sock, connection_format="json")
        assert normalised.get_conn_value("db") == '{"conn_type":"postgres"}'
        assert provider.get_variable("v") == "x"
    finally:
        server.close()
    assert server.requests == [
        "GET /v1/connections/team/db?team=team%20a HTTP/1.1",
        "GET /v1/connections/db HTTP/1.1",
        "GET /v1/variables/v HTTP/1.1",
    ]


def test_an_unknown_connection_format_falls_back_to_the_provider_form(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_airflow(monkeypatch, None)
    backend_module = importlib.import_module("broker.airflow")
    assert backend_module.BrokerSecretsBackend(connection_format="yaml").connection_format == "provider"
    assert backend_module.BrokerSecretsBackend(connection_format=" json ").connection_format == "json"
