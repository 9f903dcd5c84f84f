"""Vault's IAM auth method with the pod's AWS identity: an IRSA web identity (answered by moto) exchanged for a
Vault token, with no Kubernetes API access.

OpenBao does not ship the AWS auth method in its built-in catalog, so Vault's side of the login is played by
a loopback stand-in that does what Vault documents: decode the signed sts:GetCallerIdentity request, replay it
to STS (moto), check the caller's ARN against the role's bound principal, and answer with a real token minted
by OpenBao. Every other request is proxied to the real OpenBao.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from moto.server import ThreadedMotoServer

from tests.integration.vault.conftest import VARIABLE, VaultEnv
from tests.servers.httpd import LoopbackHTTPServer
from tests.support.broker_process import wait_for

BOUND_ROLE = "arn:aws:iam::123456789012:role/airflow-broker"


class VaultAwsLogin:
    def __init__(self, bao_url: str, sts_url: str, root_client: Any) -> None:
        self.bao = urlsplit(bao_url)
        self.sts = urlsplit(sts_url)
        self.root = root_client
        self.logins: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(outer.bao.hostname, outer.bao.port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(method, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                self._reply(resp.status, resp.read(), resp.getheader("Content-Type") or "application/json")
                conn.close()

            def do_GET(self) -> None:
                self._forward("GET")

            def do_PUT(self) -> None:
                self._forward("PUT")

            def do_POST(self) -> None:
                if self.path != "/v1/auth/aws/login":
                    self._forward("POST")
                    return
                login = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                arn = outer.caller_arn(login)
                outer.logins.append(arn or "")
                canonical = re.sub(
                    r"^arn:aws:sts::(\d+):assumed-role/([^/]+)/.*$", r"arn:aws:iam::\1:role/\2", arn or ""
                )
                if login.get("role") != "airflow" or canonical != BOUND_ROLE:
                    self._reply(403, b'{"errors": ["permission denied"]}')
                    return
                token = outer.root.auth.token.create(policies=["airflow-read"], ttl="60s")["auth"]
                self._reply(
                    200,
                    json.dumps(
                        {"auth": {"client_token": token["client_token"], "lease_duration": 60, "renewable": True}}
                    ).encode(),
                )

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def caller_arn(self, login: dict[str, Any]) -> str | None:
        """Replay the signed request to STS, as Vault does, and read the caller's ARN from the answer."""
        if login.get("iam_http_request_method") != "POST":
            return None
        url = urlsplit(base64.b64decode(login["iam_request_url"]).decode())
        body = base64.b64decode(login["iam_request_body"])
        headers = {k: v[0] for k, v in json.loads(base64.b64decode(login["iam_request_headers"])).items()}
        if "Authorization" not in headers or "AWS4-HMAC-SHA256" not in headers["Authorization"]:
            return None
        conn = http.client.HTTPConnection(self.sts.hostname, self.sts.port, timeout=10)
        conn.request("POST", url.path or "/", body=body, headers=headers)
        answer = conn.getresponse().read().decode()
        conn.close()
        found = re.search(r"<Arn>([^<]+)</Arn>", answer)
        return found.group(1) if found else None

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def aws_vault(vault_env: VaultEnv) -> Iterator[tuple[VaultAwsLogin, str]]:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    sts_url = f"http://{host}:{port}"
    standin = VaultAwsLogin(vault_env.bao.url, sts_url, vault_env.bao.client())
    yield standin, sts_url
    standin.stop()
    moto.stop()


def irsa_env(sts_url: str, token_file: Path, role_arn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "AWS_ROLE_ARN": role_arn,
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file),
            "AWS_ENDPOINT_URL": sts_url,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }
    )
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.projected-token.sig")
    return env


def aws_backend(vault_env: VaultEnv, standin: VaultAwsLogin, sts_url: str) -> dict[str, Any]:
    backend = vault_env.backend("aws", auth={"role": "airflow", "aws_sts_url": sts_url + "/"})
    backend["url"] = standin.url
    return backend


def test_irsa_identity_exchanged_for_a_vault_token(
    broker_factory: Any, vault_env: VaultEnv, aws_vault: tuple[VaultAwsLogin, str], tmp_path: Path
) -> None:
    standin, sts_url = aws_vault
    env = irsa_env(sts_url, tmp_path / "web-identity", BOUND_ROLE)
    broker = broker_factory({"backends": [aws_backend(vault_env, standin, sts_url)]}, env=env)
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert broker.metric("broker_logins_total", backend="vault", outcome="ok") == 1
    assert standin.logins[-1].startswith("arn:aws:sts::123456789012:assumed-role/airflow-broker/")


def test_another_identity_is_refused_as_403(
    broker_factory: Any, vault_env: VaultEnv, aws_vault: tuple[VaultAwsLogin, str], tmp_path: Path
) -> None:
    standin, sts_url = aws_vault
    env = irsa_env(sts_url, tmp_path / "web-identity", "arn:aws:iam::123456789012:role/someone-else")
    broker = broker_factory({"backends": [aws_backend(vault_env, standin, sts_url)]}, env=env, start=False)
    broker.start(wait_ready=False)
    wait_for(lambda: broker.readyz_status() == 503, what="not ready")
    status, body = broker.get("variable", "plain")
    assert (status, body["error"]) == (403, "forbidden")
    assert "assumed-role/someone-else" in standin.logins[-1]
