"""The Vault backend through the real daemon against a real OpenBao server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.vault.conftest import CONFIG_VALUE, PASSWORD, VARIABLE, VaultEnv
from tests.servers.openbao import ROOT_TOKEN, OpenBao, approle_auth, live_tokens
from tests.support.broker_process import wait_for

EXPECTED_FIELDS = {
    "conn_type": "postgres",
    "host": "db.vault",
    "login": "u",
    "password": PASSWORD,
    "port": 5432,
    "extra": {"sslmode": "require", "nested": {"a": 1}},
}


@pytest.mark.parametrize("method", ["approle", "jwt", "kubernetes", "token"])
def test_kv2_reads_with_each_auth_method(broker_factory: Any, vault_env: VaultEnv, method: str) -> None:
    broker = broker_factory({"backends": [vault_env.backend(method)]})
    status, body = broker.get("connection", "pg_fields")
    assert status == 200 and json.loads(body["value"]) == EXPECTED_FIELDS and body["version"] == "1"
    uri = json.loads(broker.get("connection", "pg_uri")[1]["value"])
    assert uri["password"] == "p@ss/w:rd#" and uri["conn_type"] == "postgres" and uri["schema"] == "airflow"
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert broker.get("config", "sql_alchemy_conn")[1]["value"] == CONFIG_VALUE
    if method != "token":
        assert broker.metric("broker_logins_total", backend="vault", outcome="ok") == 1
    assert broker.metric("broker_identity_expiry_seconds", backend="vault") > 0
    for value in (PASSWORD, VARIABLE, CONFIG_VALUE):
        assert value not in broker.logs()


def test_check_logs_in_and_reads_nothing(vault_env: VaultEnv, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backends": [vault_env.backend("jwt")]}))
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    vault (vault): vault http://127.0.0.1" in result.stdout and "airflow-read" in result.stdout


def test_kv1_with_mount_from_the_id(broker_factory: Any, vault_env: VaultEnv) -> None:
    # mount_point null, as the provider reads it: the first segment of each id names the mount.
    backend = vault_env.backend(
        "approle",
        mount_point=None,
        kv_engine_version=1,
        connections_path="airflow/connections",
        variables_path="airflow/variables",
        config_path=None,
    )
    broker = broker_factory({"backends": [backend]})
    status, body, _ = broker.request("GET", "/v1/connections/kv1/v1conn")
    assert status == 200 and json.loads(body["value"])["conn_type"] == "mysql"
    assert broker.request("GET", "/v1/variables/kv1/v1var")[1]["value"] == "kv1-value"
    assert broker.get("variable", "v1var")[0] == 404  # no mount segment: not looked up
    assert broker.get("config", "sql_alchemy_conn")[0] == 404  # config kind turned off by a null path
    assert broker.metric("broker_backend_calls_total", operation="fetch") == 2


def test_token_renewal_then_relogin_at_max_ttl(broker_factory: Any, vault_env: VaultEnv) -> None:
    backend = vault_env.backend(
        "approle",
        auth=approle_auth(vault_env.files, "short"),
        token_min_ttl=0.5,
    )
    broker = broker_factory({"backends": [backend]})
    wait_for(
        lambda: broker.metric("broker_logins_total", backend="vault", outcome="renewed") >= 1,
        timeout=15,
        what="a token renewal",
    )
    wait_for(
        lambda: broker.metric("broker_logins_total", backend="vault", outcome="ok") >= 2,
        timeout=20,
        what="a re-login near max TTL",
    )
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert broker.readyz_status() == 200


def test_rotated_service_account_token_is_read_at_next_login(
    broker_factory: Any, vault_env: VaultEnv, tmp_path: Path
) -> None:
    token_a, token_b = vault_env.extra["k8s_a"], vault_env.k8s_token("b")
    token_file = tmp_path / "sa.token"
    token_file.write_text(token_a)
    backend = vault_env.backend("kubernetes", auth={"token_path": str(token_file)})
    broker = broker_factory({"backends": [backend]})
    assert broker.get("variable", "plain")[0] == 200
    # the kubelet rotates the projected token; the old one stops being valid
    vault_env.tokenreview.valid[token_b] = "airflow:airflow"
    token_file.write_text(token_b)
    vault_env.tokenreview.valid.pop(token_a)
    reviews_before = vault_env.tokenreview.reviews
    root = vault_env.bao.client()
    for accessor, token in live_tokens(root):
        if token.get("path", "").startswith("auth/kubernetes"):
            root.auth.token.revoke_accessor(accessor)
    broker.invalidate()
    assert broker.get("variable", "plain")[0] == 200
    assert vault_env.tokenreview.reviews == reviews_before + 1  # exactly one new login, with the new token
    vault_env.tokenreview.valid[token_a] = "airflow:airflow"  # restore for other tests


def test_vault_down_serves_stale_then_503_and_recovers(broker_factory: Any, tmp_path: Path) -> None:
    bao = OpenBao(tmp_path / "bao").start()
    try:
        bao.kv2_put("variables/cached", {"value": "cached-value"})
        token_file = tmp_path / "root.token"
        token_file.write_text(ROOT_TOKEN)
        backend = {
            "name": "vault",
            "type": "vault",
            "url": bao.url,
            "timeout": 1,
            "retries": 0,
            "auth": {"method": "token", "token_file": str(token_file)},
        }
        broker = broker_factory({"cache": {"ttl": 1, "max_stale": 6, "refresh_ahead": 0}, "backends": [backend]})
        assert broker.get("variable", "cached")[1]["cache"] == "miss"
        bao.stop()
        served = [broker.get("variable", "cached") for _ in range(20)]
        assert all(s == 200 and b["value"] == "cached-value" for s, b in served)
        wait_for(lambda: broker.get("variable", "cached")[1].get("cache") == "stale", timeout=5, what="stale")
        status, body = broker.get("variable", "never_cached")
        assert status in (503, 504) and body["error"] in ("backend_unavailable", "backend_timeout")
        wait_for(lambda: broker.get("variable", "cached")[0] in (503, 504), timeout=15, what="max_stale passed")
        # the store comes back (same address, fresh dev storage): the broker recovers by itself
        bao.start()
        bao.kv2_put("variables/cached", {"value": "cached-value"})
        wait_for(lambda: broker.get("variable", "cached")[0] == 200, timeout=30, interval=0.5, what="recovery")
    finally:
        bao.stop()
