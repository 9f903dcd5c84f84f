"""A client for the broker's secrets API using only the standard library.

Used by ``broker get`` and by the Airflow backend, which runs in processes that fork: a kept-alive
connection belongs to the process (and thread) that opened it and is never reused across ``fork()``.

It speaks the small subset of HTTP/1.1 the broker answers with (``Content-Length`` bodies, keep-alive)
over a plain socket: ``http.client`` costs more per lookup than the broker takes to answer a cached one.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_SOCKET = "/run/broker/broker.sock"
DEFAULT_POD_TOKEN = "/var/run/secrets/broker/token"  # noqa: S105 - a path: node mode's projected token volume
KINDS = {"connection": "connections", "variable": "variables", "config": "config"}
MAX_HEAD = 65_536
MAX_BODY = 16 * 1024 * 1024
# The Airflow task context the calling process asserts about itself, for the broker's audit trail:
# header -> the environment variable Airflow's task runner sets before it runs a task.
CONTEXT_HEADERS = {
    "X-Airflow-Dag-Id": "AIRFLOW_CTX_DAG_ID",
    "X-Airflow-Task-Id": "AIRFLOW_CTX_TASK_ID",
    "X-Airflow-Run-Id": "AIRFLOW_CTX_DAG_RUN_ID",
    "X-Airflow-Try-Number": "AIRFLOW_CTX_TRY_NUMBER",
}
MAX_CONTEXT_VALUE = 250


def airflow_context() -> dict[str, str]:
    """The task context Airflow put in this process's environment (empty outside a task)."""
    out = {}
    for header, var in CONTEXT_HEADERS.items():
        value = os.environ.get(var)
        if value:
            out[header] = value
    return out


def context_head(context: Mapping[str, str]) -> str:
    """Header lines for the asserted context; values that could not be a header line are left out."""
    lines = ""
    for header, value in context.items():
        if value and len(value) <= MAX_CONTEXT_VALUE and value.isprintable():
            lines += f"{header}: {value}\r\n"
    return lines


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


class _ProtocolError(Exception):
    """The answer was not the HTTP/1.1 the broker speaks."""


class _Connection:
    """One kept-alive socket and its read buffer."""

    __slots__ = ("__weakref__", "buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        _OPEN.add(self)

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65_536)
        if not chunk:
            raise ConnectionResetError("connection closed by the broker")
        self.buf += chunk

    def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request; (status, body, server keeps the connection)."""
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise _ProtocolError("response head too large")
            self._fill()
        head, self.buf = self.buf[:end], self.buf[end + 4 :]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _ProtocolError("not an HTTP/1.x status line")
        status = int(parts[1])
        length = None
        keep = parts[0] == b"HTTP/1.1"
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b"connection":
                keep = value != b"close" and (keep or value == b"keep-alive")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
        if status in (204, 304) or 100 <= status < 200:
            return status, b"", keep
        if chunked:
            return status, self._read_chunked(), keep
        if length is None:
            while True:  # no length: the body runs to the end of the connection
                try:
                    self._fill()
                except ConnectionResetError:
                    break
            body, self.buf = self.buf, b""
            return status, body, False
        if length > MAX_BODY:
            raise _ProtocolError("response body too large")
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body, keep

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            while (end := self.buf.find(b"\r\n")) < 0:
                self._fill()
            size = int(self.buf[:end].split(b";")[0], 16)
            self.buf = self.buf[end + 2 :]
            while len(self.buf) < size + 2:
                self._fill()
            body += self.buf[:size]
            self.buf = self.buf[size + 2 :]
            if size == 0:
                return body
            if len(body) > MAX_BODY:
                raise _ProtocolError("response body too large")


_local = threading.local()
_OPEN: weakref.WeakSet[_Connection] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Close kept-alive sockets at exit (pools are per thread, so no single owner would)."""
    for conn in list(_OPEN):
        conn.close()


def _pool() -> dict[tuple[Any, ...], _Connection]:
    # Connections are kept per thread and per process: after fork() the child starts with none.
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _local.pid = pid
        _local.conns = {}
    conns: dict[tuple[Any, ...], _Connection] = _local.conns
    return conns


class BrokerClient:
    """Reads connections, variables and config values from the broker.

    ``socket_path`` for the unix socket, or ``url`` (http://127.0.0.1:PORT) with ``token``. No I/O happens
    until the first request. ``pod_token_file`` (node mode): the pod's projected service-account token,
    re-read at every request (the kubelet rotates it) and sent as ``Authorization: Bearer``.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 5.0,
        context: Callable[[], Mapping[str, str]] | None = airflow_context,
        *,
        pod_token_file: str | None = None,
    ) -> None:
        if url:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError("url must look like http://127.0.0.1:PORT")
            self._tcp: tuple[str, int] | None = (parts.hostname, parts.port or 80)
            self.target = url
            host = parts.netloc
        else:
            self._tcp = None
            self.target = socket_path or DEFAULT_SOCKET
            host = "localhost"
        self._head = f"Host: {host}\r\nAccept: application/json\r\n"
        if token:
            if "\r" in token or "\n" in token:
                raise ValueError("token must be a single line")
            self._head += f"X-Broker-Token: {token}\r\n"
        self.timeout = float(timeout)
        self.pod_token_file = pod_token_file
        self._key = (self.target, self.timeout)
        self._context = context  # read at every request: a forked task runner sets it before each task

    def _pod_token(self) -> bytes:
        """The ``Authorization`` header line for node mode, or b"". Raises BrokerClientError when unreadable."""
        if self.pod_token_file is None:
            return b""
        try:
            with open(self.pod_token_file, "rb") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise BrokerClientError(f"cannot read pod token file {self.pod_token_file}: {exc.strerror}") from None
        if not token or b"\r" in token or b"\n" in token:
            raise BrokerClientError(f"pod token file {self.pod_token_file} does not hold one token")
        return b"Authorization: Bearer " + token + b"\r\n"

    def _connect(self) -> _Connection:
        if self._tcp is not None:
            sock = socket.create_connection(self._tcp, timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.target)
            except BaseException:
                sock.close()
                raise
        return _Connection(sock)

    def _drop(self) -> None:
        conn = _pool().pop(self._key, None)
        if conn is not None:
            conn.close()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """One request, retried once when a kept-alive connection turns out closed.

        Raises BrokerUnavailableError when the broker cannot be reached or does not answer in time.
        """
        head = self._head if self._context is None else self._head + context_head(self._context())
        raw = f"{method} {path} HTTP/1.1\r\n{head}".encode() + self._pod_token()
        if body is not None:
            raw += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        else:
            raw += b"\r\n"
        pool = _pool()
        for attempt in (1, 2):
            conn = pool.get(self._key)
            reused = conn is not None
            try:
                if conn is None:
                    conn = pool[self._key] = self._connect()
                status, payload, keep = conn.exchange(raw)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
                self._drop()
                if reused and attempt == 1:
                    continue  # the broker closed an idle kept-alive connection: one fresh try
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
            except (_ProtocolError, ValueError) as exc:
                self._drop()
                raise BrokerUnavailableError(f"broker at {self.target} answered garbage: {exc}", "protocol") from None
            if not keep:
                self._drop()
            try:
                data = json.loads(payload) if payload else {}
            except ValueError:
                data = {}
            return status, data if isinstance(data, dict) else {}
        raise AssertionError("unreachable")

    def get(self, kind: str, name: str, team: str | None = None, *, provider_form: bool = False) -> str | None:
        """The value, or None when no backend has it.

        ``team``: the Airflow team asking (multi-team), sent as the ``team`` query parameter. A ``/`` in
        ``name`` is sent as a path separator (nested ids); every other reserved character is escaped.
        ``provider_form``: for connections, the string the provider backend would hand Airflow
        (``provider_value``, when the broker sends one) instead of the broker's normalised JSON.

        Raises BrokerAccessDeniedError (403), BrokerUnavailableError (unreachable, 429, 5xx),
        BrokerClientError (anything else, e.g. a rejected name).
        """
        collection = KINDS[kind]
        path = f"/v1/{collection}/{quote(name, safe='/')}"
        if team is not None:
            path += f"?team={quote(team, safe='')}"
        status, data = self.request("GET", path)
        if status == 200 and isinstance(data.get("value"), str):
            provided = data.get("provider_value")
            value: str = provided if provider_form and isinstance(provided, str) else data["value"]
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
