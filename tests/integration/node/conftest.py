"""A local Kubernetes API (pods, signed projected tokens, TokenReview) and an OpenBao whose kubernetes auth
reviews tokens against it, for the node-mode tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers.openbao import OpenBao
from tests.servers.tokenreview import KubernetesAPI
from tests.support.leakcheck import plant

NODE = "node-a"


@dataclass
class Cluster:
    api: KubernetesAPI
    reviewer_token: Path  # the broker's own service-account token (API audience)

    def node_section(self, identities: list[dict[str, object]], **overrides: object) -> dict[str, object]:
        return {
            "audience": "broker",
            "kubernetes": {"url": self.api.url, "token_path": str(self.reviewer_token), "ca_cert": None},
            "identities": identities,
            **overrides,
        }


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    api = KubernetesAPI().start()
    broker_pod = api.add_pod("broker", "credential-broker", node=NODE)
    path = tmp_path_factory.mktemp("kube") / "token"
    path.write_text(api.token(broker_pod, audience="https://kubernetes.default.svc", ttl=86_400))
    try:
        yield Cluster(api, path)
    finally:
        api.stop()


# ---------------------------------------------------------------------------------------------- OpenBao

TEAM_A = "team-a-value-3f9c"
TEAM_B = "team-b-value-7d21"
TEAM_A_CONN = "team-a-conn-password-1c8e"


def _policy(team: str) -> str:
    return f'path "secret/data/{team}/*" {{ capabilities = ["read"] }}\n'


@dataclass
class NodeVault:
    bao: OpenBao
    cluster: Cluster

    def broker_config(self, tmp_path: Path, **node: object) -> dict[str, object]:
        """A node-mode config: team-a and team-b mapped (team-b's connections pointed at team-a's path on
        purpose: its own Vault login must still be refused there)."""
        identities = [
            {
                "namespace": "airflow",
                "service_account": "team-a",
                "backends": ["vault"],
                "overrides": {
                    "vault": {
                        "auth": {"role": "team-a"},
                        "variables_path": "team-a/variables",
                        "connections_path": "team-a/connections",
                    }
                },
            },
            {
                "namespace": "airflow",
                "service_account": "team-b",
                "backends": ["vault"],
                "overrides": {
                    "vault": {
                        "auth": {"role": "team-b"},
                        "variables_path": "team-b/variables",
                        "connections_path": "team-a/connections",
                    }
                },
            },
        ]
        return {
            "listen": {"socket": str(tmp_path / "node.sock"), "socket_mode": "0666"},
            "node": self.cluster.node_section(identities, **node),
            "backends": [
                {
                    "name": "vault",
                    "type": "vault",
                    "url": self.bao.url,
                    "auth": {"method": "kubernetes", "role": "unused"},
                    "mount_point": "secret",
                    "timeout": 3,
                    "retries": 1,
                }
            ],
        }


@pytest.fixture(scope="session")
def node_vault(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeVault]:
    from tests.integration.vault.conftest import self_signed_ca_pem

    bao = OpenBao(tmp_path_factory.mktemp("node-openbao") / "server").start()
    try:
        c = bao.client()
        for team in ("team-a", "team-b"):
            c.sys.create_or_update_policy(team, _policy(team))
        bao.kv2_put("team-a/variables/shared", {"value": TEAM_A})
        bao.kv2_put("team-b/variables/shared", {"value": TEAM_B})
        bao.kv2_put("team-a/connections/db", {"conn_type": "postgres", "host": "db", "password": TEAM_A_CONN})
        c.sys.enable_auth_method("kubernetes")
        c.write(
            "auth/kubernetes/config",
            kubernetes_host=cluster.api.url,
            disable_local_ca_jwt=True,
            kubernetes_ca_cert=self_signed_ca_pem(),
        )
        for team in ("team-a", "team-b"):
            c.write(
                f"auth/kubernetes/role/{team}",
                bound_service_account_names=[team],
                bound_service_account_namespaces=["airflow"],
                audience="broker",
                token_policies=[team],
                token_ttl="120s",
            )
        yield NodeVault(bao, cluster)
    finally:
        bao.stop()


plant("node-vault", TEAM_A, TEAM_B, TEAM_A_CONN)
