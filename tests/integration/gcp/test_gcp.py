"""GCP Secret Manager through GKE Workload Identity (the metadata server), key files and workload identity
federation, against the local Google Cloud in ``tests/servers/gcp.py``, with the broker as a subprocess."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.gcp.conftest import CONFIG_VALUE, PASSWORD, PLANTED, VARIABLE, gcp_backend, gcp_env
from tests.servers.cloud import TestCA
from tests.servers.gcp import CLOUD_PLATFORM, GcpServers
from tests.support.broker_process import wait_for

pytestmark = pytest.mark.integration
TOKEN = "metadata:instance/service-accounts/default/token"


def conn(broker: Any, name: str) -> dict[str, Any]:
    status, body = broker.get("connection", name)
    assert status == 200, body
    return json.loads(body["value"])


def no_secret_in(text: str) -> None:
    for value in PLANTED:
        assert value not in text


def test_workload_identity_reads_every_kind_with_one_token(
    broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path
) -> None:
    """GKE: the project comes from the metadata server, one token serves every read, every metadata request
    carries Metadata-Flavor, connections (URI and JSON), variables and config are served in Airflow's layout."""
    broker = broker_factory({"backends": [gcp_backend(gcp, test_ca)]}, env=gcp_env(gcp, tmp_path))
    uri = conn(broker, "pg_uri")
    assert (uri["conn_type"], uri["host"], uri["port"], uri["password"]) == ("postgres", "db.gcp", 5432, PASSWORD)
    js = conn(broker, "pg_json")
    assert js["password"] == PASSWORD and js["extra"] == {"sslmode": "require", "options": {"nested": [1, 2]}}
    status, body = broker.get("variable", "plain")
    assert (status, body["value"], body["backend"], body["cache"]) == (200, VARIABLE, "gcp", "miss")
    assert body["version"] == "1"
    assert broker.get("config", "sql_alchemy_conn")[1]["value"] == CONFIG_VALUE
    cloud = gcp.cloud
    assert cloud.calls[TOKEN] == 1
    assert cloud.calls["metadata:project/project-id"] >= 1
    assert cloud.refused["metadata-flavor"] == 0 and not any(k.startswith("token-") for k in cloud.refused)
    assert broker.metric("broker_logins_total", backend="gcp", outcome="ok") == 1
    assert broker.metric("broker_identity_expiry_seconds", backend="gcp") > 3000
    no_secret_in(broker.logs() + broker.metrics())

    out = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--config", str(broker.config_path)],
        env=gcp_env(gcp, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "service_account=airflow-broker@airflow-prod.iam.gserviceaccount.com" in out.stdout
    assert "project=airflow-prod" in out.stdout


def test_invalid_ids_fall_through_and_unusable_versions_are_errors(
    broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path
) -> None:
    """An id Secret Manager cannot hold is not looked up there and is served by the next backend; a disabled
    version and a payload that is not text are backend errors. (Not found, denied and the rest of what every
    store shares: tests/acceptance.)"""
    files = tmp_path / "files"
    files.mkdir()
    (files / "variables.json").write_text(json.dumps({"dotted.name": "from-files"}))
    broker = broker_factory(
        {
            "backends": [
                gcp_backend(gcp, test_ca),
                {"name": "files", "type": "file", "variables_file_path": str(files / "variables.json")},
            ],
        },
        env=gcp_env(gcp, tmp_path),
    )
    assert broker.get("variable", "dotted.name")[1]["value"] == "from-files"
    assert gcp.cloud.count("access:airflow-variables-dotted") == 0
    status, body = broker.get("variable", "disabled")
    assert (status, body["error"]) == (502, "backend_error") and "disabled" in body["message"]
    status, body = broker.get("variable", "binary")
    assert (status, body["error"]) == (502, "backend_error")


def test_throttling_and_server_errors_are_retried_and_never_not_found(
    broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path
) -> None:
    """429 (Retry-After honoured) and 503 are retried inside the budget; persistent 500s answer 503."""
    broker = broker_factory({"backends": [gcp_backend(gcp, test_ca)]}, env=gcp_env(gcp, tmp_path))
    gcp.cloud.faults[:] = [(429, "1"), (503, None)]
    started = time.monotonic()
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert time.monotonic() - started >= 0.9  # waited at least what Retry-After asked
    assert gcp.cloud.calls["access:airflow-variables-plain"] == 3
    assert broker.metric("broker_backend_calls_total", backend="gcp", outcome="throttled") == 1
    gcp.cloud.faults[:] = [(500, None)] * 3
    status, body = broker.get("config", "sql_alchemy_conn")
    assert status == 503 and body["error"] == "backend_unavailable"
    assert gcp.cloud.calls["access:airflow-config-sql_alchemy_conn"] == 3  # retries=2: three attempts
    assert broker.get("config", "sql_alchemy_conn")[1]["value"] == CONFIG_VALUE


def test_crc32c_mismatch_is_a_backend_error_and_nothing_is_served(
    broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path
) -> None:
    broker = broker_factory({"backends": [gcp_backend(gcp, test_ca)]}, env=gcp_env(gcp, tmp_path))
    status, body = broker.get("variable", "corrupt")
    assert (status, body["error"]) == (502, "backend_error") and "CRC32C" in body["message"]
    no_secret_in(json.dumps(body) + broker.logs())


def test_token_expiry_refresh_and_revocation(
    broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path
) -> None:
    """Short-lived tokens are refreshed ahead of expiry in the background (no read meets an expired token);
    a revoked token is answered 401 and replaced by one fresh token, and the read still succeeds."""
    gcp.cloud.token_lifetime = 6.0
    broker = broker_factory(
        {"cache": {"ttl": 1, "refresh_ahead": 0}, "backends": [gcp_backend(gcp, test_ca)]},
        env=gcp_env(gcp, tmp_path),
    )
    deadline = time.monotonic() + 14
    reads = 0
    while time.monotonic() < deadline:
        status, body = broker.get("variable", "plain")
        assert status == 200 and body["value"] == VARIABLE
        reads += 1
        time.sleep(0.25)
    assert gcp.cloud.calls[TOKEN] >= 3  # 6 s tokens over 14 s: refreshed, not waited out
    assert gcp.cloud.refused["token-expired"] == 0
    before = gcp.cloud.calls[TOKEN]
    gcp.cloud.tokens.revoke_all()
    assert broker.invalidate("variable", "plain") == 204
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert gcp.cloud.refused["token-revoked"] >= 1
    assert gcp.cloud.calls[TOKEN] >= before + 1
    assert reads > 20


def test_metadata_token_endpoint_down_fails_readiness_then_recovers(
    broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path
) -> None:
    """No token at start-up: /readyz is 503 and a read answers 5xx (never 404); the broker retries the login
    and becomes ready without a restart."""
    gcp.cloud.token_faults[:] = [500] * 12  # google-auth retries a few times inside one refresh
    broker = broker_factory({"backends": [gcp_backend(gcp, test_ca)]}, env=gcp_env(gcp, tmp_path), start=False)
    broker.start(wait_ready=False)
    wait_for(lambda: broker.readyz_status() == 503, timeout=20, what="/readyz 503 without a token")
    broker.wait_ready(timeout=60)
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    failed = broker.metric("broker_logins_total", backend="gcp", outcome="failed") + broker.metric(
        "broker_backend_calls_total", backend="gcp", operation="login", outcome="timeout"
    )
    assert failed >= 1
    assert gcp.cloud.calls[TOKEN] == 13 and not gcp.cloud.token_faults


def test_version_pin_and_explicit_project_number(
    broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path
) -> None:
    backend = gcp_backend(gcp, test_ca, project_id="123456789012", version="1")
    broker = broker_factory({"backends": [backend]}, env=gcp_env(gcp, tmp_path))
    status, body = broker.get("variable", "rotating")
    assert (status, body["value"]) == (200, "version-one")


def _key_file(gcp: GcpServers, tmp_path: Path, email: str) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    gcp.cloud.keys[email] = key.public_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = tmp_path / "sa-key.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "airflow-prod",
                "private_key_id": "0123456789abcdef",
                "private_key": pem,
                "client_email": email,
                "client_id": "109876543210987654321",
                "token_uri": f"{gcp.metadata.url}/token",
            }
        )
    )
    return path


def test_service_account_key_file(broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path) -> None:
    """A key file: the JWT-bearer grant is signed with the key (the server verifies it), the project comes
    from the file, and the metadata server is never asked."""
    email = "dev-reader@airflow-prod.iam.gserviceaccount.com"
    key_file = _key_file(gcp, tmp_path, email)
    backend = gcp_backend(gcp, test_ca, credentials_file=str(key_file))
    broker = broker_factory({"backends": [backend]}, env=gcp_env(gcp, tmp_path, metadata=False))
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert gcp.cloud.calls["oauth:jwt-bearer"] == 1 and gcp.cloud.refused["jwt-bearer"] == 0
    assert gcp.cloud.calls[TOKEN] == 0
    out = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--config", str(broker.config_path)],
        env=gcp_env(gcp, tmp_path, metadata=False),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and f"service_account={email}" in out.stdout, out.stdout + out.stderr
    assert "PRIVATE KEY" not in broker.logs() + out.stdout + out.stderr


def test_workload_identity_federation_file(
    broker_factory: Any, gcp: GcpServers, test_ca: TestCA, tmp_path: Path
) -> None:
    """An external_account file (a cluster outside Google): the projected token is exchanged at STS."""
    subject = tmp_path / "k8s-token"
    subject.write_text("projected-service-account-jwt-for-gcp")
    gcp.cloud.subject_tokens.add("projected-service-account-jwt-for-gcp")
    audience = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/k8s/providers/eks"
    config = tmp_path / "wif.json"
    config.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": audience,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": f"{gcp.metadata.url}/v1/token",
                "credential_source": {"file": str(subject)},
            }
        )
    )
    backend = gcp_backend(gcp, test_ca, credentials_file=str(config), project_id="airflow-prod")
    broker = broker_factory({"backends": [backend]}, env=gcp_env(gcp, tmp_path, metadata=False))
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert gcp.cloud.calls["sts:exchange"] == 1 and gcp.cloud.refused["sts"] == 0
    subject.write_text("a-token-the-pool-does-not-trust")
    gcp.cloud.tokens.revoke_all()
    broker.invalidate("variable", "plain")
    status, body = broker.get("variable", "plain")
    assert (status, body["error"]) == (403, "forbidden")
    assert gcp.cloud.refused["sts"] >= 1


def test_the_local_secret_manager_reads_percent_encoded_path_variables(gcp: GcpServers, test_ca: TestCA) -> None:
    """The local server's wire format, for clients that encode the path (Google's HTTP/JSON transcoding: a
    one-segment variable is percent-encoded, '-' included): the ids it reads are the decoded ones, so encoded
    valid names are served and an encoded '/' is an invalid id (400 INVALID_ARGUMENT), not another path."""
    token = gcp.cloud.tokens.issue(60, email=gcp.cloud.email, scopes=[CLOUD_PLATFORM])
    tls = ssl.create_default_context(cafile=str(test_ca.ca_path))
    base = f"{gcp.secret_manager.url}/v1/projects/airflow%2Dprod/secrets"

    def access(secret: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(f"{base}/{secret}/versions/latest:access")
        request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, context=tls, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = access("airflow%2Dvariables%2Dplain")
    assert status == 200 and base64.b64decode(body["payload"]["data"]).decode() == VARIABLE
    status, body = access("airflow-variables-team%2Fdb")
    assert (status, body["error"]["status"]) == (400, "INVALID_ARGUMENT")
