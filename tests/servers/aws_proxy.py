"""A loopback reverse proxy in front of moto that counts AWS actions and injects faults.

Faults are set per action (``secretsmanager.GetSecretValue``, ``AmazonSSM.GetParameter``, ``sts.AssumeRole``):
throttle the next N calls, answer the next calls with queued error codes, answer a chosen error code for
every call (or for one secret id), or delay the answer. Every request is counted by action, with the
``Authorization`` header it carried (so tests can see which access key signed it).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.servers.httpd import LoopbackHTTPServer


class AwsProxy:
    """Forward to ``upstream`` unless a fault is set for the request's action."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.calls: Counter[str] = Counter()
        self.calls_by_id: Counter[str] = Counter()  # SecretId / parameter Name -> requests
        self.auth_headers: list[tuple[str, str]] = []
        self.throttle: dict[str, int] = {}
        self.errors: dict[str, tuple[int, str]] = {}  # action -> (status, error code), persistent
        self.error_for_id: dict[str, tuple[int, str]] = {}  # SecretId/Name -> (status, code)
        self.queued: dict[str, list[tuple[int, str]]] = {}  # action -> one-shot faults, in order
        self.delay: dict[str, float] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _action(self, body: bytes) -> tuple[str, str | None]:
                target = self.headers.get("X-Amz-Target")
                secret_id = None
                if target:
                    try:
                        payload = json.loads(body or b"{}")
                        secret_id = payload.get("SecretId") or payload.get("Name")
                    except ValueError:
                        pass
                    return target, secret_id
                form = parse_qs(body.decode(errors="replace"))
                return "sts." + (form.get("Action", ["?"])[0]), None

            def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _fault(self, status: int, code: str) -> None:
                body = json.dumps({"__type": code, "message": "injected by the test proxy"}).encode()
                if self.headers.get("X-Amz-Target"):
                    self._answer(status, body, [("Content-Type", "application/x-amz-json-1.1")])
                    return
                xml = (
                    f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>injected</Message>"
                    f"</Error><RequestId>x</RequestId></ErrorResponse>"
                ).encode()
                self._answer(status, xml, [("Content-Type", "text/xml")])

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action, secret_id = self._action(body)
                with outer.lock:
                    outer.calls[action] += 1
                    if secret_id:
                        outer.calls_by_id[secret_id] += 1
                    outer.auth_headers.append((action, self.headers.get("Authorization", "")))
                    throttled = outer.throttle.get(action, 0) > 0
                    if throttled:
                        outer.throttle[action] -= 1
                    fault = outer.error_for_id.get(secret_id or "") or outer.errors.get(action)
                    if not throttled and not fault and outer.queued.get(action):
                        fault = outer.queued[action].pop(0)
                    delay = outer.delay.get(action, 0.0)
                if delay:
                    time.sleep(delay)  # simulates a slow store: holds this request's thread only
                if throttled:
                    self._fault(400, "ThrottlingException")
                    return
                if fault:
                    self._fault(*fault)
                    return
                conn = http.client.HTTPConnection(*outer.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = f"{outer.upstream[0]}:{outer.upstream[1]}"
                    conn.request("POST", self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self._answer(resp.status, resp.read(), resp.getheaders())
                finally:
                    conn.close()

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> AwsProxy:
        self.thread.start()
        return self

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.calls_by_id.clear()
            self.auth_headers.clear()
            self.throttle.clear()
            self.errors.clear()
            self.error_for_id.clear()
            self.queued.clear()
            self.delay.clear()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
