"""A client for the broker's secrets API using only the standard library.

Used by ``broker get`` and by the Airflow backend, which runs in processes that fork: a kept-alive
connection belongs to the process (and thread) that opened it and is never reused across ``fork()``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_SOCKET = "/run/broker/broker.sock"
KINDS = {"connection": "connections", "variable": "variables", "config": "config"}


class BrokerClientError(Exception):
    """The broker could not answer. ``code`` is the broker's error code or a local one."""

    def __init__(self, message: str, code: str = "error", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class BrokerUnavailableError(BrokerClientError):
    """Unreachable, timed out, overloaded, or its backends failed (5xx/429)."""


class BrokerAccessDeniedError(BrokerClientError):
    """The broker's backend refused access (403)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


_local = threading.local()


def _pool() -> dict[tuple[Any, ...], http.client.HTTPConnection]:
    # Connections are kept per thread and per process: after fork() the child starts with none.
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _local.pid = pid
        _local.conns = {}
    conns: dict[tuple[Any, ...], http.client.HTTPConnection] = _local.conns
    return conns


class BrokerClient:
    """Reads connections, variables and config values from the broker.

    ``socket_path`` for the unix socket, or ``url`` (http://127.0.0.1:PORT) with ``token``. No I/O happens
    until the first request.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if url:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError("url must look like http://127.0.0.1:PORT")
            self._tcp: tuple[str, int] | None = (parts.hostname, parts.port or 80)
            self.target = url
        else:
            self._tcp = None
            self.target = socket_path or DEFAULT_SOCKET
        self._token = token
        self.timeout = float(timeout)
        self._key = (self.target, self.timeout)

    def _connection(self) -> http.client.HTTPConnection:
        pool = _pool()
        conn = pool.get(self._key)
        if conn is None:
            if self._tcp is not None:
                conn = http.client.HTTPConnection(self._tcp[0], self._tcp[1], timeout=self.timeout)
            else:
                conn = _UnixConnection(self.target, self.timeout)
            pool[self._key] = conn
        return conn

    def _drop(self) -> None:
        conn = _pool().pop(self._key, None)
        if conn is not None:
            conn.close()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """One request, retried once when a kept-alive connection turns out closed.

        Raises BrokerUnavailableError when the broker cannot be reached or does not answer in time.
        """
        headers = {"Accept": "application/json"}
        if self._token:
            headers["X-Broker-Token"] = self._token
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                status = response.status
                if response.will_close:
                    self._drop()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                if reused and attempt == 1:
                    continue
                raise BrokerUnavailableError(
                    f"broker at {self.target} closed the connection: {exc}", "unreachable"
                ) from None
            except TimeoutError:
                self._drop()
                raise BrokerUnavailableError(
                    f"broker at {self.target} did not answer within {self.timeout:g}s", "timeout"
                ) from None
            except OSError as exc:
                self._drop()
                reason = exc.strerror or type(exc).__name__
                raise BrokerUnavailableError(
                    f"broker at {self.target} is unreachable: {reason}", "unreachable"
                ) from None
            except http.client.HTTPException as exc:
                self._drop()
                raise BrokerUnavailableError(
                    f"broker at {self.target} answered garbage: {type(exc).__name__}", "protocol"
                ) from None
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                data = {}
            return status, data if isinstance(data, dict) else {}
        raise AssertionError("unreachable")

    def get(self, kind: str, name: str) -> str | None:
        """The value, or None when no backend has it.

        Raises BrokerAccessDeniedError (403), BrokerUnavailableError (unreachable, 429, 5xx),
        BrokerClientError (anything else, e.g. a rejected name).
        """
        collection = KINDS[kind]
        status, data = self.request("GET", f"/v1/{collection}/{quote(name, safe='')}")
        if status == 200 and isinstance(data.get("value"), str):
            value: str = data["value"]
            return value
        code = str(data.get("error", "error"))
        message = f"broker at {self.target}: {status} {code}: {data.get('message', '')}".rstrip(": ")
        if status == 404 and code == "not_found":
            return None
        if status == 403:
            raise BrokerAccessDeniedError(message, code, status)
        if status >= 500 or status == 429:
            raise BrokerUnavailableError(message, code, status)
        raise BrokerClientError(message, code, status)

    def invalidate(self, kind: str | None = None, name: str | None = None) -> None:
        """Drop cached entries (all when no kind is given). Raises BrokerClientError."""
        body: dict[str, str] = {}
        if kind:
            body["kind"] = kind
        if name:
            body["name"] = name
        status, data = self.request("POST", "/v1/cache/invalidate", json.dumps(body).encode())
        if status != 204:
            raise BrokerClientError(
                f"broker at {self.target}: {status} {data.get('error', '')}", str(data.get("error")), status
            )
