"""The metrics listener (TCP, reachable by the cluster's scraper) serves no secret and no secret name: after
lookups of found, missing and hostile names over the socket, nothing it answers on any path or method (bodies
and headers of /metrics, /healthz, /readyz, refused paths) carries one of them, and the secrets API is not there."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.leakcheck import plant

pytestmark = pytest.mark.integration

CONN_ID = "conn-name-7c1f0a"
VARIABLE = "var-name-b9e2d4"
MISSING = "absent-name-41aa93"
HOSTILE = "evil-name-5d03%2F..%2Fpasswd"
VALUES = ("metrics-listener-password-93b1", "metrics-listener-variable-e07c")
plant("metrics-listener", *VALUES)
NAMES = (CONN_ID, VARIABLE, MISSING, "evil-name-5d03")


def exchange(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, "\n".join(f"{k}: {v}" for k, v in resp.getheaders()) + "\n" + resp.read().decode()
    finally:
        conn.close()


def test_metrics_listener_serves_no_secret_and_no_secret_name(broker_factory: Any, tmp_path: Path) -> None:
    files = tmp_path / "secrets"
    files.mkdir()
    connection = {"conn_type": "postgres", "host": "db", "login": "airflow", "password": VALUES[0]}
    (files / "connections.json").write_text(json.dumps({CONN_ID: connection}))
    (files / "variables.json").write_text(json.dumps({VARIABLE: VALUES[1]}))
    broker = broker_factory(
        {
            "prefetch": {"connections": [CONN_ID]},
            "backends": [
                {
                    "name": "files",
                    "type": "file",
                    "connections_file_path": str(files / "connections.json"),
                    "variables_file_path": str(files / "variables.json"),
                }
            ],
        }
    )
    assert broker.get("connection", CONN_ID)[0] == 200
    assert broker.get("variable", VARIABLE)[1]["value"] == VALUES[1]
    assert broker.get("variable", MISSING)[0] == 404
    assert broker.request("GET", f"/v1/variables/{HOSTILE}")[0] in (400, 404)

    port = broker.metrics_port
    answers = []
    for method, path in [
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("HEAD", "/metrics"),
        ("POST", "/metrics"),
        ("GET", f"/v1/connections/{CONN_ID}"),
        ("GET", f"/v1/variables/{VARIABLE}"),
        ("GET", f"/metrics/../v1/variables/{VARIABLE}"),
        ("GET", f"/{VARIABLE}"),
        ("GET", "/openapi.json"),
    ]:
        status, text = exchange(port, method, path)
        answers.append((method, path, status, text))
    status, text = exchange(
        port, "POST", "/v1/cache/invalidate", b'{"kind": "variable", "name": "%s"}' % VARIABLE.encode()
    )
    answers.append(("POST", "/v1/cache/invalidate", status, text))

    by_path = {(m, p): s for m, p, s, _ in answers}
    assert by_path[("GET", "/metrics")] == 200 and by_path[("GET", "/healthz")] == 200
    assert by_path[("GET", "/readyz")] == 200
    assert by_path[("POST", "/metrics")] == 405
    for method, path, status, _ in answers:
        if path.startswith(("/v1", f"/{VARIABLE}", "/metrics/..", "/openapi")):
            assert status == 404, (method, path, status)
    scraped = next(text for m, p, _, text in answers if (m, p) == ("GET", "/metrics"))
    assert "broker_requests" in scraped and 'backend="files"' in scraped
    for method, path, _, text in answers:
        for secret in (*VALUES, *NAMES):
            assert secret not in text, f"{method} {path.split('/')[1]}: a secret or secret name in the answer"
