"""Pod identity verification against a local Kubernetes API: what is accepted, what is refused, and that a
verdict is reused until the token expires, bound to the pod it names."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.backends.base import BackendContext, BackendUnavailable, Unauthorized
from broker.clock import SystemClock
from broker.metrics import Metrics
from broker.node.config import NodeConfig
from broker.node.verify import TokenVerifier
from tests.integration.node.conftest import NODE, Cluster
from tests.servers.tokenreview import KubernetesAPI, Pod


@pytest.fixture
async def verifier(cluster: Cluster) -> AsyncIterator[TokenVerifier]:
    config = NodeConfig.model_validate(
        cluster.node_section([{"namespace": "airflow", "service_account": "worker", "backends": ["v"]}])
    )
    executor = ThreadPoolExecutor(max_workers=2)
    ctx = BackendContext(executor=executor, clock=SystemClock(), metrics=Metrics())
    v = TokenVerifier(config, ctx, NODE)
    try:
        yield v
    finally:
        await v.aclose()
        executor.shutdown()


def _forged(api: KubernetesAPI, pod: Pod) -> str:
    return api.token(pod, key=rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _deleted(api: KubernetesAPI, pod: Pod) -> str:
    gone = api.add_pod(pod.namespace, pod.service_account, node=NODE)
    token = api.token(gone)
    api.delete_pod(gone)
    return token


REFUSED: dict[str, Callable[[KubernetesAPI, Pod], str | None]] = {
    "missing": lambda api, pod: None,
    "garbage": lambda api, pod: "Bearer not-a-jwt",
    "not_bearer": lambda api, pod: "Basic " + api.token(pod),
    "forged": lambda api, pod: "Bearer " + _forged(api, pod),
    "expired": lambda api, pod: "Bearer " + api.token(pod, ttl=600, issued_ago=601),
    "wrong_audience": lambda api, pod: "Bearer " + api.token(pod, audience="vault"),
    "api_audience": lambda api, pod: "Bearer " + api.token(pod, audience="https://kubernetes.default.svc"),
    "deleted_pod": lambda api, pod: "Bearer " + _deleted(api, pod),
    "unbound": lambda api, pod: "Bearer " + api.token(pod, bound=False),
    "other_node": lambda api, pod: (
        "Bearer " + api.token(api.add_pod(pod.namespace, pod.service_account, node="node-b"))
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_tokens(cluster: Cluster, verifier: TokenVerifier, case: str) -> None:
    pod = cluster.api.add_pod("airflow", "worker", node=NODE)
    header = REFUSED[case](cluster.api, pod)
    with pytest.raises(Unauthorized) as caught:
        await verifier.verify(header)
    assert len(verifier) == 0  # a refusal is never remembered as a verdict
    if header:
        assert header.split(" ", 1)[1] not in caught.value.message


async def test_accepted_token_names_the_pod_and_is_reviewed_once(cluster: Cluster, verifier: TokenVerifier) -> None:
    pod = cluster.api.add_pod("airflow", "worker", node=NODE)
    token = cluster.api.token(pod)
    before = cluster.api.reviews
    identities = await asyncio.gather(*(verifier.verify(f"Bearer {token}") for _ in range(20)))
    assert {i.pod_uid for i in identities} == {pod.uid}
    assert identities[0].key == ("airflow", "worker")
    assert identities[0].pod_name == pod.name
    assert cluster.api.reviews - before == 1  # 20 concurrent requests, one review
    await verifier.verify(f"Bearer {token}")
    assert cluster.api.reviews - before == 1  # the verdict is reused
    other = cluster.api.token(cluster.api.add_pod("airflow", "worker", node=NODE))
    assert (await verifier.verify(f"Bearer {other}")).pod_uid != pod.uid  # bound to the pod, not the account
    assert cluster.api.reviews - before == 2


async def test_verdict_ends_at_token_expiry(cluster: Cluster, verifier: TokenVerifier) -> None:
    pod = cluster.api.add_pod("airflow", "worker", node=NODE)
    token = cluster.api.token(pod, ttl=2)
    await verifier.verify(f"Bearer {token}")
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # poll until the token's exp has passed, then it must be refused without a review
        try:
            await verifier.verify(f"Bearer {token}")
        except Unauthorized as exc:
            assert "expired" in exc.message
            break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)
    assert verifier.forget_expired() == 1


async def test_same_node_off_accepts_other_nodes_but_not_unbound(cluster: Cluster) -> None:
    config = NodeConfig.model_validate(
        cluster.node_section(
            [{"namespace": "airflow", "service_account": "worker", "backends": ["v"]}], same_node=False
        )
    )
    with ThreadPoolExecutor(max_workers=1) as executor:
        v = TokenVerifier(config, BackendContext(executor=executor, clock=SystemClock(), metrics=Metrics()), None)
        pod = cluster.api.add_pod("airflow", "worker", node="node-b")
        assert (await v.verify("Bearer " + cluster.api.token(pod))).pod_uid == pod.uid
        with pytest.raises(Unauthorized, match="not bound to a pod"):  # still required without same_node
            await v.verify("Bearer " + cluster.api.token(pod, bound=False))
        await v.aclose()


async def test_api_outage_is_unavailable_not_unauthorized(cluster: Cluster, verifier: TokenVerifier) -> None:
    pod = cluster.api.add_pod("airflow", "worker", node=NODE)
    cluster.api.refuse_reviews = True
    try:
        with pytest.raises(BackendUnavailable):
            await verifier.verify("Bearer " + cluster.api.token(pod))
    finally:
        cluster.api.refuse_reviews = False


async def test_broker_credentials_refused_is_unavailable(cluster: Cluster, tmp_path: object) -> None:
    from pathlib import Path

    bad = Path(str(tmp_path)) / "token"
    bad.write_text("not-a-valid-token")
    section = cluster.node_section([{"namespace": "airflow", "service_account": "worker", "backends": ["v"]}])
    section["kubernetes"] = {**section["kubernetes"], "token_path": str(bad)}  # type: ignore[dict-item]
    with ThreadPoolExecutor(max_workers=1) as executor:
        v = TokenVerifier(
            NodeConfig.model_validate(section),
            BackendContext(executor=executor, clock=SystemClock(), metrics=Metrics()),
            NODE,
        )
        pod = cluster.api.add_pod("airflow", "worker", node=NODE)
        with pytest.raises(BackendUnavailable, match="own credentials"):
            await v.verify("Bearer " + cluster.api.token(pod))
        await v.aclose()
