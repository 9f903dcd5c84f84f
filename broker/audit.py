"""The audit trail of reads: one JSON line per secret lookup, on a stream of its own.

Never a value: a line says when, which request, what was asked for (kind, name or a keyed hash of it, team),
what answered (backend, outcome, cache state) and who asked (the peer's uid, gid and pid from
``SO_PEERCRED``; on the TCP listener the token's fingerprint; in node mode the verified pod), plus the
Airflow context the calling process asserts about itself (dag_id, task_id, run_id, try_number, map_index),
kept apart under ``asserted`` because nothing checks it.

Cost on the request path is one bounded ``deque.append`` of a tuple: a writer thread formats and writes
the lines, so a slow or full disk, or a closed stderr, never blocks the event loop or fails a lookup.
Lines that cannot be queued or written are counted (``broker_audit_dropped_total``) and, when configured,
make ``/readyz`` say so.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.backends.base import ConfigurationError

if TYPE_CHECKING:
    from broker.config import AuditConfig
    from broker.metrics import Metrics

# Header the client sends -> field under "asserted" (Airflow's own names for its task context).
ASSERTED_HEADERS = {
    "x-airflow-dag-id": "dag_id",
    "x-airflow-task-id": "task_id",
    "x-airflow-run-id": "run_id",
    "x-airflow-try-number": "try_number",
    "x-airflow-map-index": "map_index",
}
ASSERTED_HEADERS_BYTES = {k.encode(): v for k, v in ASSERTED_HEADERS.items()}
MAX_ASSERTED = 250  # characters kept of one asserted value
FLUSH_INTERVAL = 0.02  # seconds the writer sleeps when it has nothing to write
BATCH = 2048


def outcome_of(code: str) -> str:
    """The audit outcome for an answer: found, not_found, denied, or the error code."""
    return "denied" if code in ("forbidden", "unauthorized") else code


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asked. ``listener`` is ``unix`` or ``tcp``; ``verified`` is the pod identity node mode checked."""

    listener: str
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    token: str | None = None
    verified: Mapping[str, str] | None = None

    def as_json(self) -> dict[str, Any]:
        if self.listener == "tcp":
            return {"listener": "tcp", "token": self.token}
        return {"listener": self.listener, "uid": self.uid, "gid": self.gid, "pid": self.pid}


def unix_caller(sock: socket.socket | None) -> Caller:
    """The peer of a unix socket connection (uid/gid/pid None when the kernel would not say)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return Caller("unix")
    try:
        from broker.server import peer_credentials

        pid, uid, gid = peer_credentials(sock)
    except OSError:
        return Caller("unix")
    return Caller("unix", uid=uid, gid=gid, pid=pid)


def token_caller(token: bytes) -> Caller:
    """The TCP listener's caller: the token's fingerprint, never the token."""
    return Caller("tcp", token="sha256:" + hashlib.sha256(token).hexdigest()[:16])


def asserted_value(raw: str | bytes) -> str:
    """A client-asserted header value as it is logged: printable, bounded."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_ASSERTED])


def read_hmac_key(path: Path) -> bytes:
    """The key for hashing names. Raises ConfigurationError when unreadable or too short."""
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigurationError([f"audit.name_hmac_key_file: cannot read {path}: {exc.strerror}"]) from None
    if len(key) < 16:
        raise ConfigurationError([f"audit.name_hmac_key_file: key in {path} must be at least 16 bytes"])
    return key


def name_hmac(key: bytes, name: str) -> str:
    """The keyed hash logged instead of a name: ``hmac-sha256:<hex>`` of the name's UTF-8 bytes."""
    return "hmac-sha256:" + hmac.new(key, name.encode(), hashlib.sha256).hexdigest()


_Record = tuple[float, "str | bytes", str, str, "str | None", "str | None", str, "str | None", "Caller | None", "Any"]


class AuditLog:
    """The audit stream: ``record`` from the event loop, a writer thread for the output."""

    def __init__(self, config: AuditConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.key = read_hmac_key(config.name_hmac_key_file) if config.name_hmac_key_file else None
        self._queue: deque[_Record] = deque()
        self._max = config.queue_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._checked = 0.0
        self._checked_every = 1.0  # seconds between checks that the file was not rotated away
        self.streams = {"stderr": 2, "stdout": 1}
        self.failing: str | None = None  # the last write's error, while writes fail

    # ------------------------------------------------------------------------------------------ loop side

    def record(
        self,
        request_id: str | bytes,
        kind: str,
        name: str,
        outcome: str,
        *,
        backend: str | None = None,
        cache: str | None = None,
        team: str | None = None,
        caller: Caller | None = None,
        asserted: Any = None,
    ) -> None:
        """Queue one line. Never raises, never blocks: a full queue drops the line and counts it."""
        if len(self._queue) >= self._max:
            self.metrics.audit_dropped.labels("queue_full").inc()
            return
        self._queue.append((time.time(), request_id, kind, name, team, backend, outcome, cache, caller, asserted))

    def not_ready_reason(self) -> str | None:
        if self.config.readiness and self.failing is not None:
            return f"audit stream cannot be written ({self.failing})"
        return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="broker-audit", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within ``timeout``), then stop the writer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._fd is not None and self.config.output not in self.streams:
            os.close(self._fd)
        self._fd = None

    # ------------------------------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stop.is_set():
                    return
                self._stop.wait(FLUSH_INTERVAL)
                continue
            batch: list[_Record] = []
            while self._queue and len(batch) < BATCH:
                batch.append(self._queue.popleft())
            try:
                data = "".join(self._line(r) for r in batch).encode()
            except Exception:  # noqa: BLE001 - a formatting bug must not stop the trail
                self.metrics.audit_dropped.labels("format_error").inc(len(batch))
                continue
            self._write(data, len(batch))

    def _line(self, r: _Record) -> str:
        at, rid, kind, name, team, backend, outcome, cache, caller, asserted = r
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z",
            "type": "audit",
            "request_id": rid.decode("ascii", "replace") if isinstance(rid, bytes) else rid,
            "kind": kind,
        }
        if self.key is not None:
            line["name_hmac"] = name_hmac(self.key, name)
        else:
            line["name"] = name
        line["team"] = team
        line["backend"] = backend
        line["outcome"] = outcome
        line["cache"] = cache
        line["caller"] = caller.as_json() if caller is not None else None
        line["verified"] = dict(caller.verified) if caller is not None and caller.verified else None
        if asserted:
            pairs = asserted.items() if isinstance(asserted, Mapping) else asserted
            line["asserted"] = {field: asserted_value(value) for field, value in pairs}
        else:
            line["asserted"] = None
        return json.dumps(line, separators=(",", ":")) + "\n"

    def _open(self) -> int:
        output = self.config.output
        stream = self.streams.get(output)
        if stream is not None:
            return stream
        now = time.monotonic()
        if self._fd is not None and now - self._checked < self._checked_every:
            return self._fd
        self._checked = now
        try:
            st = os.stat(output)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            current = None
        if self._fd is not None and current == self._inode:
            return self._fd
        # First write, or the file was rotated away (renamed or removed): write to the new one.
        fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)
        return fd

    def _write(self, data: bytes, lines: int) -> None:
        try:
            fd = self._open()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, "OSError")
            if self.failing is None:
                self.metrics.audit_failing.set(1)
            self.failing = reason
            self.metrics.audit_dropped.labels(reason).inc(lines)
            return
        if self.failing is not None:
            self.failing = None
            self.metrics.audit_failing.set(0)
        self.metrics.audit_lines.inc(lines)
