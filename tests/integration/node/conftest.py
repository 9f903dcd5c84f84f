"""A local Kubernetes API (pods, signed projected tokens, TokenReview) for the node-mode tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers.tokenreview import KubernetesAPI

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
