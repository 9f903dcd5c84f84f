"""What the local cloud servers share: a test CA (trustme), threaded HTTP(S) servers on loopback, bearer tokens.

``TestCA`` writes its certificate and a bundle (the system bundle plus the test CA, for libraries that read
``SSL_CERT_FILE``) into a directory; ``LoopbackServer`` runs a ``BaseHTTPRequestHandler`` on 127.0.0.1 with
TLS when given a context (the handshake happens in the request's thread, so a stalled client blocks nobody);
``TokenBook`` issues opaque bearer tokens with a lifetime and claims, and says why one is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import trustme

from tests.servers.httpd import LoopbackHTTPServer


class TestCA:
    """A local certificate authority and a server certificate for 127.0.0.1 / localhost / ::1."""

    __test__ = False

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost", "::1")
        self.ca_path = directory / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        system = Path(os.environ.get("SSL_CERT_FILE") or ssl.get_default_verify_paths().openssl_cafile or "")
        system_pem = system.read_bytes() if system.is_file() else b""
        self.bundle_path = directory / "bundle.pem"
        self.bundle_path.write_bytes(system_pem + b"\n" + self.ca.cert_pem.bytes())

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.cert.configure_cert(ctx)
        return ctx


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (HTTPS when ``tls`` is given), stopped by ``stop()``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> None:
        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port = int(self.httpd.server_address[1])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, JSON helpers, no stderr logging."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the body waits for the client's delayed
    # ACK of the headers, about 40 ms on a new connection here.
    disable_nagle_algorithm = True

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_body(status, raw, "application/json; charset=utf-8", headers)

    def send_body(self, status: int, raw: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(raw)

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def bearer(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def log_message(self, *args: Any) -> None:
        return


@dataclass
class Grant:
    claims: dict[str, Any]
    expires_at: float  # time.time()
    revoked: bool = False


@dataclass
class TokenBook:
    """Opaque bearer tokens: issued with a lifetime and claims; looked up with the reason for a refusal."""

    issued: dict[str, Grant] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, lifetime: float, **claims: Any) -> str:
        token = "tok-" + secrets.token_urlsafe(24)
        with self.lock:
            self.issued[token] = Grant(claims, time.time() + lifetime)
        return token

    def check(self, token: str | None) -> tuple[Grant | None, str]:
        """(grant, "") for a live token, else (None, reason)."""
        if not token:
            return None, "missing"
        with self.lock:
            grant = self.issued.get(token)
        if grant is None:
            return None, "unknown"
        if grant.revoked:
            return None, "revoked"
        if grant.expires_at <= time.time():
            return None, "expired"
        return grant, ""

    def expire_all(self) -> None:
        """Every token issued so far is past its lifetime from now on (refused as expired, as the service does)."""
        with self.lock:
            for grant in self.issued.values():
                grant.expires_at = min(grant.expires_at, time.time() - 1)

    def revoke_all(self) -> None:
        with self.lock:
            for grant in self.issued.values():
                grant.revoked = True
