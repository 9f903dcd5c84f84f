"""The audit trail of reads: one JSON line per secret lookup, on a stream of its own.

Never a value: a line says when, which request, what was asked for (kind, name or a keyed hash of it, team),
what answered (backend, outcome, cache state) and who asked (the peer's uid, gid and pid from
``SO_PEERCRED``; on the TCP listener the token's fingerprint; in node mode the verified pod), plus the
Airflow context the calling process asserts about itself (dag_id, task_id, run_id, try_number, map_index),
kept apart under ``asserted`` because nothing checks it.

Cost on the request path is one bounded ``list.append`` of a tuple; every 20 ms the batch is formatted
(from memoised fragments) and handed to a writer thread, so a slow or full disk, or a closed stderr, never
blocks the event loop or fails a lookup.
Lines that cannot be queued or written are counted (``broker_audit_dropped_total``) and, when configured,
make ``/readyz`` say so.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import json
import os
import queue
import threading
import time  # strftime/gmtime only: the clock comes from broker.clock
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.backends.base import ConfigurationError
from broker.clock import Clock, SystemClock

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
FLUSH_INTERVAL = 0.02  # seconds a recorded line waits at most before it is formatted and handed on


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
    verified: Mapping[str, str] | tuple[tuple[str, str], ...] | None = None  # namespace, service account, pod

    def as_json(self) -> dict[str, Any]:
        if self.listener == "tcp":
            return {"listener": "tcp", "token": self.token}
        return {"listener": self.listener, "uid": self.uid, "gid": self.gid, "pid": self.pid}


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


_js = json.JSONEncoder(separators=(",", ":")).encode
_RID_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def name_hmac(key: bytes, name: str) -> str:
    """The keyed hash logged instead of a name: ``hmac-sha256:<hex>`` of the name's UTF-8 bytes."""
    return "hmac-sha256:" + hmac.new(key, name.encode(), hashlib.sha256).hexdigest()


_Record = tuple[float, "str | bytes", str, str, "str | None", "str | None", str, "str | None", "Caller | None", "Any"]


class AuditLog:
    """The audit stream: ``record`` from the event loop, a writer thread for the output."""

    def __init__(self, config: AuditConfig, metrics: Metrics, clock: Clock | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self._wall = self.clock.wall  # bound once: called per recorded line
        self.key = read_hmac_key(config.name_hmac_key_file) if config.name_hmac_key_file else None
        self._pending: list[_Record] = []  # recorded, not formatted yet (event loop only)
        self._backlog = 0  # lines formatted and handed to the writer, not written yet
        self._backlog_lock = threading.Lock()
        self._max = config.queue_size
        self._outbox: queue.SimpleQueue[tuple[bytes, int] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._checked = 0.0
        self._checked_every = 1.0  # seconds between checks that the file was not rotated away
        self.streams = {"stderr": 2, "stdout": 1}
        self._second = -1
        self._stamp = b""
        self._memo: dict[Any, bytes] = {}
        self._callers: dict[int, tuple[Caller | None, str]] = {}
        self.failing: str | None = None  # the last write's error, while writes fail

    # ------------------------------------------------------------------------------------------ event loop

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
        if len(self._pending) + self._backlog >= self._max:
            self.metrics.audit_dropped.labels("queue_full").inc()
            return
        self._pending.append((self._wall(), request_id, kind, name, team, backend, outcome, cache, caller, asserted))
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Format what was recorded (one batch, on the loop: no lock and no thread switch per line) and hand
        the bytes to the writer thread."""
        self._flush_handle = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            data = b"".join([self._line(r) for r in batch])
        except Exception:  # noqa: BLE001 - a formatting bug must not stop the trail or fail a lookup
            self.metrics.audit_dropped.labels("format_error").inc(len(batch))
            return
        with self._backlog_lock:
            self._backlog += len(batch)
        self._outbox.put((data, len(batch)))

    def not_ready_reason(self) -> str | None:
        if self.config.readiness and self.failing is not None:
            return f"audit stream cannot be written ({self.failing})"
        return None

    def start(self) -> None:
        """Start the writer; call from the event loop the lookups run on."""
        self._loop = asyncio.get_running_loop()
        if self._pending:
            self._flush_handle = self._loop.call_later(FLUSH_INTERVAL, self.flush)
        self._thread = threading.Thread(target=self._run, name="broker-audit", daemon=True)
        self._thread.start()

    async def aclose(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bound for the last writes
        """Write everything recorded so far (within ``timeout``), then stop the writer."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush()
        self._outbox.put(None)
        if self._thread is not None:
            thread = self._thread
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
        if self._fd is not None and self.config.output not in self.streams:
            os.close(self._fd)
        self._fd = None

    # ------------------------------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            data, lines = item
            try:
                self._write(data, lines)
            finally:
                with self._backlog_lock:
                    self._backlog -= lines

    def _line(self, r: _Record) -> bytes:
        """One JSON line, assembled from fragments memoised per second, per name and per caller: the writer
        shares the machine's cores with the event loop, so it does as little per line as it can."""
        at, rid, kind, name, team, backend, outcome, cache, caller, asserted = r
        second = int(at)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime('{"time":"%Y-%m-%dT%H:%M:%S', time.gmtime(second)).encode()
        memo = self._memo
        if len(memo) > 65_536 or len(self._callers) > 65_536:
            memo.clear()
            self._callers.clear()
        # Callers are keyed by identity (hashing a dataclass costs more than the rest of the line); the memo
        # keeps each caller alive, so its id cannot be reused by another while its entries exist.
        known_caller = self._callers.get(id(caller))
        if known_caller is None or known_caller[0] is not caller:
            verified = dict(caller.verified) if caller is not None and caller.verified else None
            fragment = f'"caller":{_js(caller.as_json() if caller is not None else None)},"verified":{_js(verified)}'
            known_caller = self._callers[id(caller)] = (caller, fragment)
        pairs = (tuple(asserted.items() if isinstance(asserted, Mapping) else asserted)) if asserted else None
        key = (kind, name, team, backend, outcome, cache, id(caller), pairs)
        body = memo.get(key)
        if body is None:
            shown = f'"name_hmac":"{name_hmac(self.key, name)}"' if self.key is not None else f'"name":{_js(name)}'
            claimed = _js({field: asserted_value(value) for field, value in pairs}) if pairs else "null"
            body = memo[key] = (
                f'"kind":{_js(kind)},{shown},"team":{_js(team)},"backend":{_js(backend)},"outcome":{_js(outcome)},'
                f'"cache":{_js(cache)},{known_caller[1]},"asserted":{claimed}}}\n'
            ).encode()
        # Request ids are ours (hex) or a client's checked at the edge against [A-Za-z0-9._-]: no escaping.
        request = rid if isinstance(rid, bytes) else rid.encode("utf-8", "replace")
        if not _RID_SAFE.issuperset(request):
            request = _js(request.decode("utf-8", "replace"))[1:-1].encode()
        return b'%s.%03dZ","type":"audit","request_id":"%s",%s' % (self._stamp, int(at % 1 * 1000), request, body)

    def _open(self) -> int:
        output = self.config.output
        stream = self.streams.get(output) if isinstance(output, str) else None
        if stream is not None:
            return stream
        now = self.clock.now()
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
