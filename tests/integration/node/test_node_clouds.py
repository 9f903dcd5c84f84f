"""Node mode against the local Google Cloud and Azure, each asked with the calling pod's own token:

- GCP: workload identity federation (STS token exchange with the pod's projected token as the subject
  token), then impersonation of the identity's service account (team-a) or the federated principal itself
  (team-b); Secret Manager's IAM lets each read only its own secrets.
- Azure: workload identity (the pod's token as the client assertion, the identity's client id); Entra's
  federated identity credential binds each app to one service account; Key Vault RBAC per app.

Two service accounts, the same Airflow name: each gets its own value; a refused token costs no store call and
no token exchange; what the broker cannot verify (whom a pool principal may impersonate, which app a service
account may act as) the identity provider refuses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.node.conftest import NODE, Cluster
from tests.servers.azure import AzureServers, Federation
from tests.servers.cloud import TestCA
from tests.servers.gcp import GcpServers, Provider
from tests.servers.tokenreview import KubernetesAPI, Pod
from tests.support.broker_process import BrokerProcess
from tests.support.leakcheck import plant

TEAM_A, TEAM_B = "cloud-team-a-value-51c2", "cloud-team-b-value-93de"
POOL = "projects/123456789012/locations/global/workloadIdentityPools/k8s"
PROVIDER = f"//iam.googleapis.com/{POOL}/providers/node"
SA_A = "team-a@airflow-prod.iam.gserviceaccount.com"
APP = {"team-a": "aaaaaaaa-0000-4000-8000-00000000000a", "team-b": "bbbbbbbb-0000-4000-8000-00000000000b"}
plant("node-clouds", TEAM_A, TEAM_B)


def subject(team: str) -> str:
    return f"system:serviceaccount:airflow:{team}"


@dataclass
class Cloud:
    """One cloud wired for node mode: how to build the broker, and its counters."""

    name: str
    backend: dict[str, Any]
    overrides: dict[str, dict[str, Any]]  # per team
    env: dict[str, str]
    store_calls: Callable[[], int]
    exchanges: Callable[[], int]  # token exchanges at the identity provider

    def config(self, cluster: Cluster, tmp_path: Path, **team_overrides: dict[str, Any]) -> dict[str, Any]:
        identities = [
            {
                "namespace": "airflow",
                "service_account": team,
                "backends": [self.name],
                "overrides": {self.name: {**self.overrides[team], **team_overrides.get(team, {})}},
            }
            for team in ("team-a", "team-b")
        ]
        return {
            "listen": {"socket": str(tmp_path / "node.sock"), "socket_mode": "0666"},
            "node": cluster.node_section(identities),
            "backends": [self.backend],
        }


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("node-ca"))


@pytest.fixture(scope="module")
def gcp_servers(test_ca: TestCA, cluster: Cluster) -> Iterator[GcpServers]:
    servers = GcpServers(test_ca)
    cloud = servers.cloud
    provider = Provider(cluster.api.key.public_key(), allowed_audience="broker")
    cloud.providers[PROVIDER] = provider
    cloud.impersonation[SA_A] = {provider.principal(PROVIDER, subject("team-a"))}
    cloud.access[SA_A] = "team-a-"
    cloud.access[provider.principal(PROVIDER, subject("team-b"))] = "team-b-"
    cloud.add("team-a-variables-shared", TEAM_A)
    cloud.add("team-b-variables-shared", TEAM_B)
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def azure_servers(test_ca: TestCA, cluster: Cluster) -> Iterator[AzureServers]:
    servers = AzureServers(test_ca)
    cloud = servers.cloud
    for team, client_id in APP.items():
        cloud.federations[client_id] = Federation(
            cluster.api.key.public_key(), cluster.api.issuer, subject(team), audience="broker"
        )
        cloud.access[client_id] = f"{team}-"
    cloud.add("team-a-variables-shared", TEAM_A)
    cloud.add("team-b-variables-shared", TEAM_B)
    yield servers
    servers.stop()


def _gcp(servers: GcpServers, ca: TestCA) -> Cloud:
    federation = {"audience": PROVIDER, "token_url": f"{servers.metadata.url}/v1/token"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_"))}
    env["NO_GCE_CHECK"] = "true"  # no metadata server: the node's own identity must never be used
    return Cloud(
        name="gcp",
        backend={
            "name": "gcp",
            "type": "gcp_secret_manager",
            "project_id": "airflow-prod",
            "endpoint_url": servers.secret_manager.url,
            "ca_cert": str(ca.ca_path),
            "timeout": 5,
            "retries": 1,
        },
        overrides={
            "team-a": {
                "variables_prefix": "team-a-variables",
                "federation": {**federation, "service_account": SA_A, "iam_endpoint": servers.metadata.url},
            },
            "team-b": {"variables_prefix": "team-b-variables", "federation": federation},
        },
        env=env,
        store_calls=lambda: servers.cloud.count("access:"),
        exchanges=lambda: servers.cloud.count("sts:"),
    )


def _azure(servers: AzureServers, ca: TestCA) -> Cloud:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_"))}
    env |= {"AZURE_AUTHORITY_HOST": servers.entra.url, "SSL_CERT_FILE": str(ca.bundle_path)}
    tenant = servers.cloud.tenant_id
    return Cloud(
        name="akv",
        backend={
            "name": "akv",
            "type": "azure_key_vault",
            "vault_url": servers.key_vault.url,
            "ca_cert": str(ca.ca_path),
            "verify_challenge_resource": False,  # the local vault is 127.0.0.1, not *.vault.azure.net
            "timeout": 5,
            "retries": 1,
        },
        overrides={
            team: {"variables_prefix": f"{team}-variables", "client_id": APP[team], "tenant_id": tenant} for team in APP
        },
        env=env,
        store_calls=lambda: (
            servers.cloud.calls["get:team-a-variables-shared"] + servers.cloud.calls["get:team-b-variables-shared"]
        ),
        exchanges=lambda: servers.cloud.calls["entra:token"],
    )


@pytest.fixture(params=["gcp", "azure"])
def cloud(request: pytest.FixtureRequest, test_ca: TestCA) -> Cloud:
    if request.param == "gcp":
        return _gcp(request.getfixturevalue("gcp_servers"), test_ca)
    return _azure(request.getfixturevalue("azure_servers"), test_ca)


def start(cloud: Cloud, cluster: Cluster, tmp_path: Path, **team_overrides: dict[str, Any]) -> BrokerProcess:
    config = cloud.config(cluster, tmp_path, **team_overrides)
    return BrokerProcess(config, tmp_path, env={**cloud.env, "NODE_NAME": NODE})


def ask(broker: BrokerProcess, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, data, _ = broker.request("GET", "/v1/variables/shared", headers=headers)
    return status, data


def value(broker: BrokerProcess, token: str) -> tuple[int, str | None]:
    status, data = ask(broker, token)
    return status, data.get("value")


def test_each_identity_gets_its_own_value(cloud: Cloud, cluster: Cluster, tmp_path: Path) -> None:
    api = cluster.api
    with start(cloud, cluster, tmp_path) as broker:
        a1, b1, a2 = (api.add_pod("airflow", sa, node=NODE) for sa in ("team-a", "team-b", "team-a"))
        calls = cloud.store_calls()
        assert value(broker, api.token(a1)) == (200, TEAM_A)
        assert value(broker, api.token(b1)) == (200, TEAM_B)
        assert value(broker, api.token(a2)) == (200, TEAM_A)  # team-a's partition, shared
        assert cloud.store_calls() - calls == 2
        assert broker.metric("broker_logins_total", backend=cloud.name, outcome="ok") == 2
        assert broker.metric("broker_node_identities") == 2


def _forged(api: KubernetesAPI, pod: Pod) -> str:
    return api.token(pod, key=rsa.generate_private_key(public_exponent=65537, key_size=2048))


REFUSED: dict[str, Callable[[KubernetesAPI, Pod], str | None]] = {
    "missing": lambda api, pod: None,
    "forged": _forged,
    "expired": lambda api, pod: api.token(pod, issued_ago=700),
    "wrong_audience": lambda api, pod: api.token(pod, audience="api://AzureADTokenExchange"),
    "other_node": lambda api, pod: api.token(api.add_pod("airflow", "team-a", node="node-b")),
}


def test_refused_tokens_cost_no_store_call_and_no_exchange(cloud: Cloud, cluster: Cluster, tmp_path: Path) -> None:
    api = cluster.api
    with start(cloud, cluster, tmp_path) as broker:
        calls, exchanges = cloud.store_calls(), cloud.exchanges()
        for case, make in REFUSED.items():
            status, data = ask(broker, make(api, api.add_pod("airflow", "team-a", node=NODE)))
            assert (status, data.get("error")) == (401, "unauthorized"), case
        assert (cloud.store_calls(), cloud.exchanges()) == (calls, exchanges)
        assert broker.metric("broker_logins_total", backend=cloud.name) == 0


def test_identity_provider_refuses_what_the_broker_cannot_check(cloud: Cloud, cluster: Cluster, tmp_path: Path) -> None:
    """team-b's config names team-a's cloud identity (a mistake, or a hostile config change): the pool will not
    let team-b's principal impersonate team-a's service account, Entra's federated credential of team-a's app
    names team-a's service account only. team-b gets 403 and never team-a's value."""
    if cloud.name == "gcp":
        wrong = {"federation": {**cloud.overrides["team-b"]["federation"], "service_account": SA_A}}
        wrong["federation"]["iam_endpoint"] = cloud.overrides["team-a"]["federation"]["iam_endpoint"]
    else:
        wrong = {"client_id": APP["team-a"], "variables_prefix": "team-a-variables"}
    api = cluster.api
    with start(cloud, cluster, tmp_path, **{"team-b": wrong}) as broker:
        status, data = ask(broker, api.token(api.add_pod("airflow", "team-b", node=NODE)))
        assert (status, data.get("error")) == (403, "forbidden")
        assert TEAM_A not in repr(data)
        assert value(broker, api.token(api.add_pod("airflow", "team-a", node=NODE))) == (200, TEAM_A)


def test_store_policy_applies_per_identity(cloud: Cloud, cluster: Cluster, tmp_path: Path) -> None:
    """team-b's layout points at team-a's secret: its own login is refused there by the store's IAM."""
    api = cluster.api
    with start(cloud, cluster, tmp_path, **{"team-b": {"variables_prefix": "team-a-variables"}}) as broker:
        status, data = ask(broker, api.token(api.add_pod("airflow", "team-b", node=NODE)))
        assert (status, data.get("error")) == (403, "forbidden")
        assert TEAM_A not in repr(data)
