"""AWS Secrets Manager and SSM through the real daemon, boto3's real credential chain, and moto."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.integration.aws.conftest import (
    CONFIG_VALUE,
    PASSWORD,
    SSM_SECRET,
    VARIABLE,
    base_env,
    sm_backend,
    ssm_backend,
    static_env,
)
from tests.servers.aws_proxy import AwsProxy
from tests.support.broker_process import wait_for

GET = "secretsmanager.GetSecretValue"


def test_secrets_manager_layout(broker_factory: Any, proxy: AwsProxy) -> None:
    broker = broker_factory({"backends": [sm_backend()]}, env=static_env(proxy))
    uri = json.loads(broker.get("connection", "pg_uri")[1]["value"])
    assert uri["password"] == PASSWORD and uri["host"] == "db.aws"
    fields = json.loads(broker.get("connection", "pg_json")[1]["value"])
    assert fields == {
        "conn_type": "postgres",
        "host": "db.aws",
        "login": "u",
        "password": PASSWORD,
        "port": 5432,
        "schema": "airflow",
        "extra": {"sslmode": "require"},
    }
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert broker.get("variable", "binary")[1]["value"] == "binary-variable"
    assert broker.get("config", "sql_alchemy_conn")[1]["value"] == CONFIG_VALUE
    assert broker.get("variable", "missing")[0] == 404
    assert broker.get("variable", "plain")[1]["cache"] == "hit"
    assert proxy.calls[GET] == 6
    assert all(PASSWORD not in text for text in (broker.logs(), broker.metrics()))


def test_ssm_layout_with_secure_strings(broker_factory: Any, proxy: AwsProxy) -> None:
    broker = broker_factory(
        {"backends": [ssm_backend(connections_prefix="airflow/connections/")]}, env=static_env(proxy)
    )
    assert json.loads(broker.get("connection", "ssm_conn")[1]["value"])["conn_type"] == "mysql"
    assert json.loads(broker.get("connection", "ssm_json")[1]["value"]) == {
        "conn_type": "http",
        "host": "api.aws",
        "password": PASSWORD,
        "extra": {"timeout": 5},
    }
    assert broker.get("variable", "ssm_var")[1]["value"] == SSM_SECRET
    assert broker.get("config", "ssm_cfg")[1]["value"] == "ssm-config"
    assert broker.get("variable", "nope")[0] == 404
    assert proxy.calls["AmazonSSM.GetParameter"] == 5


def test_lookup_patterns_and_null_prefixes_make_no_call(broker_factory: Any, proxy: AwsProxy) -> None:
    backend = sm_backend(connections_lookup_pattern="^pg_", variables_prefix=None)
    broker = broker_factory({"backends": [backend]}, env=static_env(proxy))
    assert broker.get("connection", "pg_uri")[0] == 200
    assert broker.get("connection", "other_conn")[0] == 404
    assert broker.get("variable", "plain")[0] == 404
    assert proxy.calls[GET] == 1


def test_throttling_retries_then_stale_then_recovery(broker_factory: Any, proxy: AwsProxy) -> None:
    broker = broker_factory(
        {"cache": {"ttl": 1, "max_stale": 60, "refresh_ahead": 0}, "backends": [sm_backend()]}, env=static_env(proxy)
    )
    proxy.throttle[GET] = 2
    status, body = broker.get("variable", "plain")
    assert (status, body["value"]) == (200, VARIABLE)
    assert proxy.calls[GET] == 3  # two throttled, one served: retried inside the budget
    assert broker.metric("broker_backend_calls_total", backend="sm", operation="fetch", outcome="throttled") == 2
    proxy.throttle[GET] = 10_000
    wait_for(lambda: broker.get("variable", "plain")[1].get("cache") == "stale", timeout=10, what="stale serving")
    results = [broker.get("variable", "plain") for _ in range(50)]
    assert all(s == 200 and b["value"] == VARIABLE for s, b in results)
    proxy.throttle[GET] = 0
    wait_for(
        lambda: broker.get("variable", "plain")[1].get("cache") in ("hit", "refreshed", "miss"),
        timeout=45,
        interval=0.5,
        what="recovery",
    )


async def _herd(socket_path: str, n: int) -> list[int]:
    async def one() -> int:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        writer.write(b"GET /v1/config/sql_alchemy_conn HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
        return int(data.split(b" ", 2)[1])

    return await asyncio.gather(*(one() for _ in range(n)))


def test_thousand_concurrent_misses_make_one_aws_call(broker_factory: Any, proxy: AwsProxy) -> None:
    broker = broker_factory(
        {"listen": {"max_connections": 2000, "max_concurrency": 2000}, "backends": [sm_backend()]},
        env=static_env(proxy),
    )
    proxy.delay[GET] = 1.0  # keep the one call in flight while every client arrives
    statuses = asyncio.run(_herd(broker.socket_path, 1000))
    assert statuses == [200] * 1000
    assert proxy.calls[GET] == 1
    assert broker.metric("broker_backend_calls_total", backend="sm", operation="fetch") == 1


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("DecryptionFailure", 502, "backend_error"),
        ("InternalServiceError", 503, "backend_unavailable"),
    ],
)
def test_errors_are_never_not_found(broker_factory: Any, proxy: AwsProxy, code: str, status: int, error: str) -> None:
    proxy.error_for_id["airflow/variables/plain"] = (500 if code == "InternalServiceError" else 400, code)
    broker = broker_factory(
        {"backends": [sm_backend(retries=1), {"name": "env", "type": "env"}]},
        env={**static_env(proxy), "AIRFLOW_VAR_PLAIN": "must-not-fall-through"},
    )
    got, body = broker.get("variable", "plain")
    assert (got, body["error"]) == (status, error)


def test_rotation_seen_after_ttl_or_invalidation_never_before(broker_factory: Any, proxy: AwsProxy) -> None:
    broker = broker_factory(
        {"cache": {"ttl": 3, "refresh_ahead": 0}, "backends": [sm_backend()]}, env=static_env(proxy)
    )
    assert broker.get("variable", "rotating")[1]["value"] == "version-one"
    proxy.sm.put_secret_value(SecretId="airflow/variables/rotating", SecretString="version-two")  # type: ignore[attr-defined]
    assert broker.get("variable", "rotating")[1]["value"] == "version-one"  # cached: not before TTL
    wait_for(lambda: broker.get("variable", "rotating")[1]["value"] == "version-two", timeout=10, what="TTL")
    proxy.sm.put_secret_value(SecretId="airflow/variables/rotating", SecretString="version-three")  # type: ignore[attr-defined]
    assert broker.invalidate("variable", "rotating") == 204
    assert broker.get("variable", "rotating")[1]["value"] == "version-three"


def test_irsa_web_identity_end_to_end(broker_factory: Any, proxy: AwsProxy, tmp_path: Path) -> None:
    token = tmp_path / "web-identity-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.projected-service-account-token.sig")
    env = base_env(
        {
            "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/airflow-broker",
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
            "AWS_ROLE_SESSION_NAME": "broker-test",
            "AWS_ENDPOINT_URL": proxy.url,
        }
    )
    broker = broker_factory({"backends": [sm_backend()]}, env=env)
    for name in ("plain", "binary"):
        assert broker.get("variable", name)[0] == 200
    assert proxy.calls["sts.AssumeRoleWithWebIdentity"] == 1
    signed = [h for action, h in proxy.auth_headers if action == GET]
    assert signed and all("Credential=ASIA" in h for h in signed)  # the assumed role's temporary keys
    assert broker.metric("broker_identity_expiry_seconds", backend="sm") > 0


def test_eks_pod_identity_through_local_agent(broker_factory: Any, proxy: AwsProxy, pod_identity: Any) -> None:
    agent, token_file = pod_identity
    env = base_env(
        {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": agent.url,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
            "AWS_ENDPOINT_URL": proxy.url,
        }
    )
    broker = broker_factory({"backends": [sm_backend()]}, env=env)
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert agent.requests >= 1 and agent.refused == 0
    assert all("Credential=ASIAPODIDENTITYKEY01" in h for a, h in proxy.auth_headers if a == GET)
    for secret in ("pod-identity-secret", "pod-identity-session-token", "pod-identity-projected-token", VARIABLE):
        assert secret not in broker.logs() and secret not in broker.metrics()


def test_assume_role_chaining_and_check(broker_factory: Any, proxy: AwsProxy, tmp_path: Path) -> None:
    backend = sm_backend(
        role_arn="arn:aws:iam::123456789012:role/cross-account-reader",
        external_id="ext-123",
        role_session_name="airflow-broker",
    )
    broker = broker_factory({"backends": [backend]}, env=static_env(proxy))
    assert broker.get("variable", "plain")[0] == 200
    assert proxy.calls["sts.AssumeRole"] == 1
    assert all("Credential=ASIA" in h for a, h in proxy.auth_headers if a == GET)
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backends": [backend]}))
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=static_env(proxy),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "arn:aws:sts::123456789012:assumed-role/cross-account-reader/airflow-broker" in result.stdout


def test_unreachable_endpoint_is_unavailable_not_found(broker_factory: Any, proxy: AwsProxy) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    broker = broker_factory(
        {"backends": [sm_backend(endpoint_url=dead, retries=0, timeout=2)]}, env=static_env(proxy), start=False
    )
    broker.start(wait_ready=False)
    wait_for(lambda: broker.readyz_status() is not None, what="listening")
    status, body = broker.get("variable", "plain")
    assert status in (503, 504) and body["error"] != "not_found"
