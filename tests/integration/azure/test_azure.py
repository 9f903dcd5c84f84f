"""Azure Key Vault through Azure Workload Identity (azure-identity's real federated-credential flow) against
the local Entra and Key Vault in ``tests/servers/azure.py``, with the broker as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.azure.conftest import CONFIG_VALUE, PASSWORD, PLANTED, VARIABLE, azure_backend, azure_env
from tests.servers.azure import AzureServers
from tests.servers.cloud import TestCA
from tests.support.broker_process import wait_for

pytestmark = pytest.mark.integration


def no_secret_in(text: str) -> None:
    for value in PLANTED:
        assert value not in text


def test_challenge_then_workload_identity_token_serves_every_kind(
    broker_factory: Any, azure: AzureServers, azure_ca: TestCA, tmp_path: Path
) -> None:
    """One unauthenticated request gets the challenge, one federated token exchange serves every read, and
    ids are converted as Airflow does (``pg_uri`` is ``airflow-connections-pg-uri``)."""
    env = azure_env(azure, tmp_path)
    broker = broker_factory({"backends": [azure_backend(azure, azure_ca)]}, env=env)
    status, body = broker.get("connection", "pg_uri")
    assert status == 200, body
    uri = json.loads(body["value"])
    assert (uri["host"], uri["port"], uri["password"]) == ("db.azure", 5432, PASSWORD)
    assert json.loads(broker.get("connection", "pg_json")[1]["value"])["password"] == PASSWORD
    assert broker.get("variable", "my_var")[1]["value"] == VARIABLE
    assert broker.get("config", "sql_alchemy_conn")[1]["value"] == CONFIG_VALUE
    cloud = azure.cloud
    assert cloud.calls["entra:token"] == 1
    assert cloud.refused == {"token-missing": 1}  # the challenge request, and nothing else refused
    assert cloud.calls["get:airflow-connections-pg-uri"] == 1
    assert broker.metric("broker_logins_total", backend="akv", outcome="ok") == 1
    assert broker.metric("broker_identity_expiry_seconds", backend="akv") > 3000
    no_secret_in(broker.logs() + broker.metrics())
    assert cloud.federated_token not in broker.logs()

    out = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--config", str(broker.config_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"client_id={cloud.client_id}" in out.stdout and f"tenant={cloud.tenant_id}" in out.stdout


def test_denied_disabled_and_expired(
    broker_factory: Any, azure: AzureServers, azure_ca: TestCA, tmp_path: Path
) -> None:
    """Key Vault's own reasons reach the message: an identity without access gets 403 naming the RBAC refusal,
    a disabled secret 403 (never not-found); an expired secret is served, as Key Vault serves it, unless
    ``expired_secrets: refuse``. (Not found and what every store shares: tests/acceptance.)"""
    broker = broker_factory({"backends": [azure_backend(azure, azure_ca)]}, env=azure_env(azure, tmp_path))
    status, body = broker.get("variable", "denied")
    assert (status, body["error"]) == (403, "forbidden") and "ForbiddenByRbac" in body["message"]
    status, body = broker.get("variable", "disabled")
    assert (status, body["error"]) == (403, "forbidden") and "disabled" in body["message"]
    assert broker.get("variable", "expired")[1]["value"] == "expired-but-readable"
    assert "outside its exp/nbf window" in broker.logs()
    no_secret_in(broker.logs())

    strict = broker_factory(
        {"backends": [azure_backend(azure, azure_ca, expired_secrets="refuse")]}, env=azure_env(azure, tmp_path)
    )
    status, body = strict.get("variable", "expired")
    assert (status, body["error"]) == (403, "forbidden")


def test_throttling_and_server_errors_are_retried_and_never_not_found(
    broker_factory: Any, azure: AzureServers, azure_ca: TestCA, tmp_path: Path
) -> None:
    broker = broker_factory({"backends": [azure_backend(azure, azure_ca)]}, env=azure_env(azure, tmp_path))
    azure.cloud.faults[:] = [(429, "1"), (503, None)]
    started = time.monotonic()
    assert broker.get("variable", "my_var")[1]["value"] == VARIABLE
    assert time.monotonic() - started >= 0.9  # Retry-After honoured
    assert azure.cloud.calls["get:airflow-variables-my-var"] == 3
    assert broker.metric("broker_backend_calls_total", backend="akv", outcome="throttled") == 1
    azure.cloud.faults[:] = [(500, None)] * 3
    status, body = broker.get("config", "sql_alchemy_conn")
    assert (status, body["error"]) == (503, "backend_unavailable")
    assert broker.get("config", "sql_alchemy_conn")[1]["value"] == CONFIG_VALUE


def test_token_expiry_refresh_and_revocation(
    broker_factory: Any, azure: AzureServers, azure_ca: TestCA, tmp_path: Path
) -> None:
    """Short-lived Entra tokens are replaced before they expire; a revoked token meets a new challenge and
    one fresh token exchange, and the read still succeeds."""
    azure.cloud.token_lifetime = 6.0
    broker = broker_factory(
        {"cache": {"ttl": 1, "refresh_ahead": 0}, "backends": [azure_backend(azure, azure_ca)]},
        env=azure_env(azure, tmp_path),
    )
    deadline = time.monotonic() + 14
    reads = 0
    while time.monotonic() < deadline:
        status, body = broker.get("variable", "my_var")
        assert status == 200 and body["value"] == VARIABLE
        reads += 1
        time.sleep(0.25)
    assert azure.cloud.calls["entra:token"] >= 3
    assert azure.cloud.refused["token-expired"] == 0
    before = azure.cloud.calls["entra:token"]
    azure.cloud.tokens.revoke_all()
    assert broker.invalidate("variable", "my_var") == 204
    assert broker.get("variable", "my_var")[1]["value"] == VARIABLE
    assert azure.cloud.refused["token-revoked"] >= 1
    assert azure.cloud.calls["entra:token"] == before + 1
    assert reads > 20


def test_untrusted_federated_token_is_forbidden_and_not_ready(
    broker_factory: Any, azure: AzureServers, azure_ca: TestCA, tmp_path: Path
) -> None:
    broker = broker_factory(
        {"backends": [azure_backend(azure, azure_ca)]},
        env=azure_env(azure, tmp_path, token="a-token-entra-does-not-trust"),
        start=False,
    )
    broker.start(wait_ready=False)
    wait_for(lambda: broker.readyz_status() == 503, timeout=20, what="/readyz 503 without a token")
    status, body = broker.get("variable", "my_var")
    assert (status, body["error"]) == (403, "forbidden")
    assert azure.cloud.refused["invalid_client"] >= 1
    assert "a-token-entra-does-not-trust" not in broker.logs()


def test_challenge_for_a_foreign_resource_is_refused_before_any_token(
    broker_factory: Any, azure: AzureServers, azure_ca: TestCA, tmp_path: Path
) -> None:
    """With the default resource check, a vault whose challenge names a resource outside its own domain
    gets no token at all (a spoofed endpoint cannot collect one)."""
    backend = azure_backend(azure, azure_ca, verify_challenge_resource=True)
    broker = broker_factory({"backends": [backend]}, env=azure_env(azure, tmp_path), start=False)
    broker.start(wait_ready=False)
    wait_for(lambda: broker.readyz_status() == 503, timeout=20, what="/readyz 503")
    status, body = broker.get("variable", "my_var")
    assert (status, body["error"]) == (403, "forbidden") and "outside the vault's domain" in body["message"]
    assert azure.cloud.calls["entra:token"] == 0


def test_challenge_for_another_tenant_is_refused(
    broker_factory: Any, azure: AzureServers, azure_ca: TestCA, tmp_path: Path
) -> None:
    azure.cloud.challenge_tenant = "11111111-2222-4333-8444-555555555555"
    broker = broker_factory({"backends": [azure_backend(azure, azure_ca)]}, env=azure_env(azure, tmp_path), start=False)
    broker.start(wait_ready=False)
    wait_for(lambda: broker.readyz_status() == 503, timeout=20, what="/readyz 503")
    status, body = broker.get("variable", "my_var")
    assert status == 403 and body["error"] == "forbidden"
    assert azure.cloud.calls["entra:token"] == 0


def test_managed_identity_endpoint(broker_factory: Any, azure: AzureServers, azure_ca: TestCA, tmp_path: Path) -> None:
    """``credential: managed_identity`` through the platform's identity endpoint (IDENTITY_ENDPOINT/HEADER)."""
    env = {k: v for k, v in azure_env(azure, tmp_path).items() if not k.startswith("AZURE_")}
    env["IDENTITY_ENDPOINT"] = f"{azure.entra.url}/msi/token"
    env["IDENTITY_HEADER"] = azure.cloud.identity_header
    broker = broker_factory({"backends": [azure_backend(azure, azure_ca, credential="managed_identity")]}, env=env)
    assert broker.get("variable", "my_var")[1]["value"] == VARIABLE
    assert azure.cloud.calls["msi:token"] == 1 and azure.cloud.calls["entra:token"] == 0
    assert not any(k in azure.cloud.refused for k in ("invalid_request", "invalid_resource"))
