"""A local Azure (Entra token endpoint and Key Vault, both over TLS) with secrets in Airflow's layout."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers.azure import AzureServers
from tests.servers.cloud import TestCA
from tests.support.leakcheck import plant

PASSWORD = "p@ss/w:rd#-azure-9f3e"
VARIABLE = "azure-variable-value-47d2"
CONFIG_VALUE = "azure-config-value-e81b"
PLANTED = (PASSWORD, VARIABLE, CONFIG_VALUE, "azure-denied-value-5a5a", "azure-disabled-value-3c3c")


@pytest.fixture(scope="session")
def azure_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("azure-ca"))


@pytest.fixture(scope="session")
def azure_servers(azure_ca: TestCA) -> Iterator[AzureServers]:
    servers = AzureServers(azure_ca)
    cloud = servers.cloud
    cloud.add("airflow-connections-pg-uri", "postgres://u:p%40ss%2Fw%3Ard%23-azure-9f3e@db.azure:5432/airflow")
    cloud.add(
        "airflow-connections-pg-json",
        json.dumps({"conn_type": "postgres", "host": "db.azure", "login": "u", "password": PASSWORD, "port": 5432}),
    )
    cloud.add("airflow-variables-my-var", VARIABLE)
    cloud.add("airflow-config-sql-alchemy-conn", CONFIG_VALUE)
    cloud.add("airflow-variables-denied", "azure-denied-value-5a5a")
    cloud.denied.add("airflow-variables-denied")
    cloud.add("airflow-variables-disabled", "azure-disabled-value-3c3c", enabled=False)
    cloud.add("airflow-variables-expired", "expired-but-readable", expires=time.time() - 3600)
    yield servers
    servers.stop()


@pytest.fixture
def azure(azure_servers: AzureServers) -> AzureServers:
    cloud = azure_servers.cloud
    with cloud.lock:
        cloud.calls.clear()
        cloud.refused.clear()
        cloud.faults.clear()
        cloud.token_faults.clear()
        cloud.token_lifetime = 3599.0
        cloud.challenge_tenant = None
    return azure_servers


def azure_env(servers: AzureServers, tmp_path: Path, token: str | None = None) -> dict[str, str]:
    """The pod's environment as the AKS webhook sets it, with the projected token written to a file."""
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(token if token is not None else servers.cloud.federated_token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_"))}
    env.update(servers.env(str(token_file)))
    return env


def azure_backend(servers: AzureServers, ca: TestCA, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "akv",
        "type": "azure_key_vault",
        "vault_url": servers.key_vault.url,
        "ca_cert": str(ca.ca_path),
        "verify_challenge_resource": False,  # the local vault is 127.0.0.1, not *.vault.azure.net
        "timeout": 5,
        "retries": 2,
        **overrides,
    }


plant("azure", *PLANTED)
