"""A minimal Kubernetes TokenReview endpoint on loopback, as Vault's kubernetes auth method calls it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class TokenReviewServer:
    """Accepts the tokens in ``valid`` (token -> service account "ns:name"); counts reviews."""

    def __init__(self) -> None:
        self.valid: dict[str, str] = {}
        self.reviews = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self.send_response(404)
                    self.end_headers()
                    return
                outer.reviews += 1
                token = body.get("spec", {}).get("token", "")
                account = outer.valid.get(token)
                status: dict[str, Any] = {"authenticated": False}
                if account:
                    ns, name = account.split(":")
                    status = {
                        "authenticated": True,
                        "audiences": body.get("spec", {}).get("audiences") or [],
                        "user": {
                            "username": f"system:serviceaccount:{ns}:{name}",
                            "uid": f"uid-{name}",
                            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
                        },
                    }
                answer = json.dumps(
                    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}
                ).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> TokenReviewServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
