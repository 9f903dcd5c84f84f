"""A local Google Cloud (metadata server, OAuth endpoints, Secret Manager over TLS) with secrets in Airflow's layout.

The broker under test always runs as a subprocess: google-auth reads ``GCE_METADATA_HOST`` once, at import,
so only a process started with the environment set talks to the local metadata server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers.cloud import TestCA
from tests.servers.gcp import GcpServers
from tests.support.leakcheck import plant

PASSWORD = "p@ss/w:rd#-gcp-5d21"
VARIABLE = "gcp-variable-value-8e3a"
CONFIG_VALUE = "gcp-config-value-2b7c"
PLANTED = (PASSWORD, VARIABLE, CONFIG_VALUE, "gcp-corrupt-value-71aa", "gcp-denied-value-0c4e")


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def gcp_servers(test_ca: TestCA) -> Iterator[GcpServers]:
    servers = GcpServers(test_ca)
    cloud = servers.cloud
    cloud.add("airflow-connections-pg_uri", "postgres://u:p%40ss%2Fw%3Ard%23-gcp-5d21@db.gcp:5432/airflow")
    cloud.add(
        "airflow-connections-pg_json",
        json.dumps(
            {
                "conn_type": "postgres",
                "host": "db.gcp",
                "login": "u",
                "password": PASSWORD,
                "port": 5432,
                "schema": "airflow",
                "extra": {"sslmode": "require", "options": {"nested": [1, 2]}},
            }
        ),
    )
    cloud.add("airflow-variables-plain", VARIABLE)
    cloud.add("airflow-config-sql_alchemy_conn", CONFIG_VALUE)
    cloud.add("airflow-variables-rotating", "version-one")
    cloud.add("airflow-variables-rotating", "version-two")
    cloud.add("airflow-variables-corrupt", "gcp-corrupt-value-71aa")
    cloud.corrupt.add("airflow-variables-corrupt")
    cloud.add("airflow-variables-denied", "gcp-denied-value-0c4e")
    cloud.denied.add("airflow-variables-denied")
    cloud.add("airflow-variables-disabled", "old")
    cloud.secrets["airflow-variables-disabled"][0].state = "DISABLED"
    cloud.add("airflow-variables-binary", b"\xff\xfe not text")
    yield servers
    servers.stop()


@pytest.fixture
def gcp(gcp_servers: GcpServers) -> GcpServers:
    cloud = gcp_servers.cloud
    with cloud.lock:
        cloud.calls.clear()
        cloud.refused.clear()
        cloud.faults.clear()
        cloud.token_faults.clear()
        cloud.token_lifetime = 3600.0
    return gcp_servers


def gcp_env(servers: GcpServers, tmp_path: Path, metadata: bool = True) -> dict[str, str]:
    """A pod's environment: nothing from the runner's Google settings; the metadata server is the local one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_"))}
    env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud")  # no developer ADC file from a home directory
    if metadata:
        env.update(servers.env())
    else:
        env["NO_GCE_CHECK"] = "true"
    return env


def gcp_backend(servers: GcpServers, ca: TestCA, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "gcp",
        "type": "gcp_secret_manager",
        "endpoint_url": servers.secret_manager.url,
        "ca_cert": str(ca.ca_path),
        "timeout": 5,
        "retries": 2,
        **overrides,
    }


plant("gcp", *PLANTED)
