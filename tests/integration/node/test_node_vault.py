"""Node mode against a real OpenBao whose kubernetes auth reviews tokens with the local Kubernetes API: each
service account gets its own login, cache and store permissions; refused tokens cost no store call; pods of
one identity share one login and one read; idle identities are logged out."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.backends.base import Kind
from broker.config import validate_config
from broker.state import BrokerState
from tests.integration.node.conftest import NODE, TEAM_A, TEAM_A_CONN, TEAM_B, NodeVault
from tests.servers.openbao import live_tokens
from tests.servers.tokenreview import KubernetesAPI, Pod
from tests.support.broker_process import BrokerProcess, wait_for


def _broker(node_vault: NodeVault, tmp_path: Path, **node: object) -> BrokerProcess:
    return BrokerProcess(node_vault.broker_config(tmp_path, **node), tmp_path, env={**os.environ, "NODE_NAME": NODE})


@pytest.fixture
def broker(node_vault: NodeVault, tmp_path: Path) -> Iterator[BrokerProcess]:
    with _broker(node_vault, tmp_path) as b:
        yield b


def ask(broker: BrokerProcess, token: str | None, kind: str, name: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    collection = {"variable": "variables", "connection": "connections"}[kind]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return broker.request("GET", f"/v1/{collection}/{name}", headers=headers)


def store_calls(broker: BrokerProcess) -> float:
    return broker.metric("broker_backend_calls_total", backend="vault")


def logins(broker: BrokerProcess) -> float:
    return broker.metric("broker_logins_total", backend="vault", outcome="ok")


def test_isolation_same_name(node_vault: NodeVault, broker: BrokerProcess) -> None:
    api = node_vault.cluster.api
    a1, b1, a2 = (api.add_pod("airflow", sa, node=NODE) for sa in ("team-a", "team-b", "team-a"))
    status, data, headers = ask(broker, api.token(a1), "variable", "shared")
    assert (status, data["value"], headers["X-Broker-Cache"]) == (200, TEAM_A, "miss")
    status, data, headers = ask(broker, api.token(b1), "variable", "shared")
    # the same name, another identity: its own value, read with its own login, never team-a's entry
    assert (status, data["value"], headers["X-Broker-Cache"]) == (200, TEAM_B, "miss")
    status, data, headers = ask(broker, api.token(a2), "variable", "shared")
    assert (status, data["value"], headers["X-Broker-Cache"]) == (200, TEAM_A, "hit")
    assert logins(broker) == 2
    assert broker.metric("broker_node_identities") == 2


def test_store_policy_applies_per_identity(node_vault: NodeVault, broker: BrokerProcess) -> None:
    api = node_vault.cluster.api
    b1, a1 = api.add_pod("airflow", "team-b", node=NODE), api.add_pod("airflow", "team-a", node=NODE)
    # team-b's layout points at team-a's path: its own Vault login is refused there, so it gets no value
    status, data, _ = ask(broker, api.token(b1), "connection", "db")
    assert (status, data["error"]) == (403, "forbidden")
    assert TEAM_A_CONN not in repr(data)
    status, data, _ = ask(broker, api.token(a1), "connection", "db")
    assert status == 200
    assert TEAM_A_CONN in data["value"]


def _forged(api: KubernetesAPI, pod: Pod) -> str:
    return api.token(pod, key=rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _deleted(api: KubernetesAPI, pod: Pod) -> str:
    token = api.token(pod)
    api.delete_pod(pod)
    return token


REFUSED: dict[str, Callable[[KubernetesAPI, Pod], str | None]] = {
    "missing": lambda api, pod: None,
    "forged": _forged,
    "expired": lambda api, pod: api.token(pod, issued_ago=700),
    "wrong_audience": lambda api, pod: api.token(pod, audience="vault"),
    "unbound": lambda api, pod: api.token(pod, bound=False),
    "other_node": lambda api, pod: api.token(api.add_pod("airflow", "team-a", node="node-b")),
    "deleted_pod": _deleted,
}


def test_refused_tokens_cost_no_store_call(node_vault: NodeVault, broker: BrokerProcess) -> None:
    api = node_vault.cluster.api
    warm = api.add_pod("airflow", "team-a", node=NODE)
    assert ask(broker, api.token(warm), "variable", "shared")[0] == 200  # team-a's value is cached now
    calls, before = store_calls(broker), logins(broker)
    for case, make in REFUSED.items():
        token = make(api, api.add_pod("airflow", "team-a", node=NODE))
        status, data, _ = ask(broker, token, "variable", "shared")
        assert (status, data.get("error")) == (401, "unauthorized"), case
        assert "value" not in data, case
        assert TEAM_A not in repr(data), case
    assert store_calls(broker) == calls  # not even a cache hit was served, and no store was asked
    assert logins(broker) == before
    assert broker.metric("broker_node_auth_total", outcome="unauthorized") == len(REFUSED)


def test_unmapped_service_account(node_vault: NodeVault, broker: BrokerProcess) -> None:
    api = node_vault.cluster.api
    pod = api.add_pod("airflow", "intruder", node=NODE)
    status, data, _ = ask(broker, api.token(pod), "variable", "shared")
    assert (status, data["error"]) == (403, "forbidden")
    assert store_calls(broker) == 0
    assert broker.metric("broker_node_identities") == 0


CLIENT = """
import sys
from broker.client import BrokerClient
print(BrokerClient(socket_path=sys.argv[1], pod_token_file=sys.argv[2]).get("variable", "shared"))
"""


def test_fifty_task_pods_share_one_login_and_one_read(
    node_vault: NodeVault, broker: BrokerProcess, tmp_path: Path
) -> None:
    api = node_vault.cluster.api
    for i in range(50):  # one after another, each a new client process with its own pod's token
        pod = api.add_pod("airflow", "team-a", name=f"task-{i}", node=NODE)
        token_file = tmp_path / f"token-{i}"
        token_file.write_text(api.token(pod))
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, broker.socket_path, str(token_file)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.strip() == TEAM_A
        api.delete_pod(pod)  # the task is done
    assert logins(broker) == 1
    assert broker.metric("broker_backend_calls_total", backend="vault", operation="fetch") == 1


async def test_fifty_sidecars_make_fifty_logins_and_reads(node_vault: NodeVault, tmp_path: Path) -> None:
    """The same 50 task pods with a sidecar each (no node mode): every sidecar starts cold."""
    api = node_vault.cluster.api
    total_logins = total_reads = 0.0
    for i in range(50):
        pod = api.add_pod("airflow", "team-a", name=f"sidecar-task-{i}", node=NODE)
        token_file = tmp_path / f"token-{i}"
        token_file.write_text(api.token(pod))
        config = validate_config(
            {
                "listen": {"socket": str(tmp_path / "unused.sock")},
                "backends": [
                    {
                        "name": "vault",
                        "type": "vault",
                        "url": node_vault.bao.url,
                        "auth": {"method": "kubernetes", "role": "team-a", "token_path": str(token_file)},
                        "mount_point": "secret",
                        "variables_path": "team-a/variables",
                    }
                ],
            }
        )
        state = BrokerState(config)
        try:
            for guard in state.guards:
                await guard.start()
            entry, _ = await state.cache.get(Kind.VARIABLE, "shared")
            assert entry.resolved is not None and entry.resolved.value == TEAM_A
        finally:
            await state.cache.aclose(revoke_leases=False)
            await asyncio.gather(*(g.backend.aclose() for g in state.guards))
            state.executor.shutdown()
        total_logins += state.metrics.logins.labels("vault", "ok")._value.get()
        total_reads += state.metrics.backend_calls.labels("vault", "fetch", "ok")._value.get()
    assert (total_logins, total_reads) == (50, 50)


def _team_tokens(node_vault: NodeVault, team: str) -> int:
    """Live Vault tokens carrying ``team``'s policy."""
    return sum(team in (token.get("policies") or []) for _, token in live_tokens(node_vault.bao.client()))


def test_idle_identity_is_logged_out_and_released(node_vault: NodeVault, tmp_path: Path) -> None:
    api = node_vault.cluster.api
    before = _team_tokens(node_vault, "team-b")
    with _broker(node_vault, tmp_path, idle_timeout="1s") as broker:
        pod = api.add_pod("airflow", "team-b", node=NODE)
        assert ask(broker, api.token(pod), "variable", "shared")[1]["value"] == TEAM_B
        assert _team_tokens(node_vault, "team-b") == before + 1
        wait_for(lambda: broker.metric("broker_node_identities_released_total") == 1, 15, what="idle release")
        assert broker.metric("broker_node_identities") == 0
        wait_for(lambda: _team_tokens(node_vault, "team-b") == before, 10, what="Vault token revoked")
        text = broker.metrics()
        assert "team-b" not in text and "airflow" not in text.replace("airflow-credential-broker", "")
        # back again: a fresh login and a fresh read, nothing served from the released cache
        status, data, headers = ask(broker, api.token(pod), "variable", "shared")
        assert (status, data["value"], headers["X-Broker-Cache"]) == (200, TEAM_B, "miss")
        assert logins(broker) == 2
