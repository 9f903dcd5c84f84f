"""Provider layouts against a real OpenBao: path lists tried in order, nested ids, and multi-team paths."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.vault.conftest import VARIABLE, VaultEnv

pytestmark = pytest.mark.integration


def value(broker: Any, path: str) -> tuple[int, Any]:
    status, body, _ = broker.request("GET", path)
    return status, body.get("value", body.get("error"))


def test_path_lists_and_nested_ids(broker_factory: Any, vault_env: VaultEnv) -> None:
    backend = vault_env.backend("approle", variables_path=["variables/extra", "variables"])
    broker = broker_factory({"backends": [backend]})
    assert value(broker, "/v1/variables/only_extra") == (200, "from-the-first-path")
    assert value(broker, "/v1/variables/plain") == (200, VARIABLE)  # second path, after a 404 on the first
    assert value(broker, "/v1/variables/team1/db") == (200, "nested-value")
    assert value(broker, "/v1/variables/team1%2Fdb")[0] == 400  # an encoded separator is refused
    assert value(broker, "/v1/variables/team1/../plain")[0] == 400


def test_team_scoped_paths(broker_factory: Any, vault_env: VaultEnv) -> None:
    broker = broker_factory({"multi_team": True, "backends": [vault_env.backend("approle")]})
    assert value(broker, "/v1/variables/scoped?team=alpha") == (200, "alpha-scoped")
    assert value(broker, "/v1/variables/scoped?team=beta") == (200, "beta-scoped")  # its own cache entry
    assert value(broker, "/v1/variables/plain?team=alpha")[0] == 404  # a team reads its own path only
    assert value(broker, "/v1/variables/plain") == (200, VARIABLE)
    calls = broker.metric("broker_backend_calls_total", operation="fetch")
    # with no team, a '/' in the key could reach a team's namespace: not looked up at all
    assert value(broker, "/v1/variables/alpha/scoped")[0] == 404
    assert broker.metric("broker_backend_calls_total", operation="fetch") == calls
    assert value(broker, "/v1/variables/plain?team=x")[0] == 400  # not an Airflow team name
