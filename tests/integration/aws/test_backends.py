"""The AWS Backend classes on their own: real boto3 credential chain, moto behind the fault proxy.

One attempt per call (botocore's retries are off), the error map, versions, identity and shared refresh.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker.backends.aws_secrets_manager import SecretsManagerConfig
from broker.backends.base import (
    AccessDenied,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BrokerError,
    Kind,
    RateLimited,
    SecretNotFound,
)
from tests.integration.aws.conftest import PASSWORD, REGION, SSM_SECRET, VARIABLE, PodIdentityAgent
from tests.servers.aws_proxy import AwsProxy

GET = "secretsmanager.GetSecretValue"
PARAM = "AmazonSSM.GetParameter"
ROLE = "arn:aws:iam::123456789012:role/airflow-broker"


def sm(**overrides: Any) -> dict[str, Any]:
    return {"name": "sm", "type": "aws_secrets_manager", "region_name": REGION, "timeout": 5, **overrides}


def ssm(**overrides: Any) -> dict[str, Any]:
    return {"name": "ssm", "type": "aws_ssm", "region_name": REGION, "timeout": 5, **overrides}


def static(proxy: AwsProxy) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "AKIASTATICTESTKEY000",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": proxy.url,
    }


def irsa(proxy: AwsProxy, tmp_path: Path) -> dict[str, str]:
    token = tmp_path / "web-identity-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.projected-service-account-token.sig")
    return {"AWS_ROLE_ARN": ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ENDPOINT_URL": proxy.url}


def gauge(target: Any, name: str, **labels: str) -> float:
    value = target.ctx.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


# ------------------------------------------------------------------------------------------- layout

SM_LAYOUT = [
    ({}, Kind.CONNECTION, "pg", "airflow/connections/pg"),
    ({}, Kind.VARIABLE, "v", "airflow/variables/v"),
    ({}, Kind.CONFIG, "k", "airflow/config/k"),
    ({"connections_prefix": "team/conns///"}, Kind.CONNECTION, "pg", "team/conns/pg"),
    ({"connections_prefix": "", "sep": "/"}, Kind.CONNECTION, "pg", "pg"),
    ({"connections_prefix": "/"}, Kind.CONNECTION, "pg", "pg"),
    ({"variables_prefix": "airflow-variables--", "sep": "-"}, Kind.VARIABLE, "v", "airflow-variables-v"),
    ({"variables_prefix": "a/b", "sep": ""}, Kind.VARIABLE, "v", "a/bv"),
    ({"connections_prefix": None}, Kind.CONNECTION, "pg", None),
    ({"variables_lookup_pattern": "^team_"}, Kind.VARIABLE, "TEAM_x", "airflow/variables/TEAM_x"),
    ({"variables_lookup_pattern": "^team_"}, Kind.VARIABLE, "other_team_x", None),
    ({"config_lookup_pattern": ""}, Kind.CONFIG, "k", "airflow/config/k"),
]

SSM_LAYOUT = [
    ({}, Kind.CONNECTION, "pg", "/airflow/connections/pg"),
    ({}, Kind.VARIABLE, "v", "/airflow/variables/v"),
    ({}, Kind.CONFIG, "k", "/airflow/config/k"),
    ({"connections_prefix": "airflow/connections/"}, Kind.CONNECTION, "pg", "/airflow/connections/pg"),
    ({"connections_prefix": ""}, Kind.CONNECTION, "pg", "/pg"),
    ({"connections_prefix": "/"}, Kind.CONNECTION, "pg", "/pg"),
    ({"variables_prefix": None}, Kind.VARIABLE, "v", None),
    ({"connections_lookup_pattern": "pg"}, Kind.CONNECTION, "PG_main", "/airflow/connections/PG_main"),
    ({"connections_lookup_pattern": "pg"}, Kind.CONNECTION, "main_pg", None),
]


@pytest.mark.parametrize(("overrides", "kind", "name", "path"), SM_LAYOUT)
def test_secrets_manager_locate(make_backend: Any, overrides: dict[str, Any], kind: Kind, name: str, path: Any) -> None:
    assert make_backend(sm(**overrides)).locate(kind, name) == path


@pytest.mark.parametrize(("overrides", "kind", "name", "path"), SSM_LAYOUT)
def test_ssm_locate(make_backend: Any, overrides: dict[str, Any], kind: Kind, name: str, path: Any) -> None:
    assert make_backend(ssm(**overrides)).locate(kind, name) == path


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"version_stage": "AWSPREVIOUS", "version_id": "a" * 36}, "not both"),
        ({"connections_lookup_pattern": "("}, "regular expression"),
        ({"extra_conn_words": {"username": ["u"]}}, "unknown connection field"),
        ({"role_arn": "not-an-arn"}, "role_arn"),
        ({"profile_name": "default"}, "profile_name"),
    ],
)
def test_config_errors(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        SecretsManagerConfig.model_validate(sm(**overrides))
    assert fragment in str(info.value)


def test_sdk_not_imported_by_config_validation() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from broker.backends import load_type; "
        "load_type('aws_secrets_manager'); load_type('aws_ssm'); "
        "print(any(m.split('.')[0] in ('boto3', 'botocore') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------- values


async def test_values_connections_and_versions(make_backend: Any, proxy: AwsProxy, aws_env: Any) -> None:
    aws_env(static(proxy))
    backend = make_backend(sm())
    await backend.start()
    got = await backend.fetch(Kind.CONNECTION, "airflow/connections/pg_json")
    assert got.value == {
        "login": "u",
        "password": PASSWORD,
        "host": "db.aws",
        "port": 5432,
        "schema": "airflow",
        "conn_type": "postgres",
        "extra": {"sslmode": "require"},
    }
    uri = await backend.fetch(Kind.CONNECTION, "airflow/connections/pg_uri")
    assert isinstance(uri.value, str) and uri.value.startswith("postgres://")
    assert (await backend.fetch(Kind.VARIABLE, "airflow/variables/plain")).value == VARIABLE
    assert (await backend.fetch(Kind.VARIABLE, "airflow/variables/binary")).value == "binary-variable"
    assert (await backend.fetch(Kind.VARIABLE, "bare_id")).value == "empty-prefix-value"
    with pytest.raises(BackendError, match="not UTF-8") as info:
        await backend.fetch(Kind.VARIABLE, "airflow/variables/not_utf8")
    assert not isinstance(info.value, SecretNotFound)
    with pytest.raises(SecretNotFound):
        await backend.fetch(Kind.VARIABLE, "airflow/variables/missing")
    assert PASSWORD not in repr(got)


async def test_json_keys_standardised_like_airflow(make_backend: Any, proxy: AwsProxy, aws_env: Any) -> None:
    import json

    aws_env(static(proxy))
    proxy.sm.create_secret(  # type: ignore[attr-defined]
        Name="airflow/connections/aliases",
        SecretString=json.dumps({"user_name": "first", "login": "second", "server": "h", "db_user": "x", "x": 1}),
    )
    backend = make_backend(sm(extra_conn_words={"user": ["db_user"]}))
    got = (await backend.fetch(Kind.CONNECTION, "airflow/connections/aliases")).value
    # The secret's own key order decides among aliases; unknown keys are dropped, as in Airflow.
    assert got == {
        "login": "first",
        "password": None,
        "host": "h",
        "port": None,
        "schema": None,
        "conn_type": None,
        "extra": None,
    }


async def test_rotation_and_version_options(make_backend: Any, proxy: AwsProxy, aws_env: Any) -> None:
    aws_env(static(proxy))
    proxy.sm.create_secret(Name="airflow/variables/rot", SecretString="one")  # type: ignore[attr-defined]
    current = make_backend(sm())
    first = await current.fetch(Kind.VARIABLE, "airflow/variables/rot")
    put = proxy.sm.put_secret_value(SecretId="airflow/variables/rot", SecretString="two")  # type: ignore[attr-defined]
    second = await current.fetch(Kind.VARIABLE, "airflow/variables/rot")
    assert (first.value, second.value) == ("one", "two")
    assert second.version == put["VersionId"] != first.version
    previous = make_backend(sm(version_stage="AWSPREVIOUS"))
    assert (await previous.fetch(Kind.VARIABLE, "airflow/variables/rot")).value == "one"
    pinned = make_backend(sm(version_id=first.version))
    assert (await pinned.fetch(Kind.VARIABLE, "airflow/variables/rot")).value == "one"
    sent = [h for a, h in proxy.auth_headers if a == GET]
    assert len(sent) == 4


async def test_ssm_secure_string_and_not_found(make_backend: Any, proxy: AwsProxy, aws_env: Any) -> None:
    aws_env(static(proxy))
    backend = make_backend(ssm())
    got = await backend.fetch(Kind.VARIABLE, "/airflow/variables/ssm_var")
    assert (got.value, got.version) == (SSM_SECRET, "1")
    assert (await backend.fetch(Kind.VARIABLE, "/bare_param")).value == "bare-param-value"
    with pytest.raises(SecretNotFound):
        await backend.fetch(Kind.VARIABLE, "/airflow/variables/absent")
    with pytest.raises(SecretNotFound):
        await backend.fetch(Kind.VARIABLE, "/airflow/variables/ssm_var:99")  # ParameterVersionNotFound
    assert proxy.calls[PARAM] == 4


# ------------------------------------------------------------------------------------------- errors

ERRORS = [
    (400, "ThrottlingException", RateLimited),
    (400, "TooManyRequestsException", RateLimited),
    (400, "RequestLimitExceeded", RateLimited),
    (429, "", RateLimited),
    (500, "InternalServiceError", BackendUnavailable),
    (503, "ServiceUnavailable", BackendUnavailable),
    (502, "SomethingNew", BackendUnavailable),
    (400, "AccessDeniedException", AccessDenied),
    (400, "UnrecognizedClientException", AccessDenied),
    (403, "InvalidSignatureException", AccessDenied),
    (400, "ResourceNotFoundException", SecretNotFound),
    (400, "DecryptionFailure", BackendError),
    (400, "InvalidRequestException", BackendError),
    (400, "InvalidParameterException", BackendError),
    (404, "SomethingNew", BackendError),  # a 404 status alone never means "not found"
]


@pytest.mark.parametrize(("status", "code", "expected"), ERRORS)
async def test_error_map_one_attempt(
    make_backend: Any, proxy: AwsProxy, aws_env: Any, status: int, code: str, expected: type[BrokerError]
) -> None:
    aws_env(static(proxy))
    backend = make_backend(sm())
    proxy.queued[GET] = [(status, code)]
    with pytest.raises(BrokerError) as info:
        await backend.fetch(Kind.VARIABLE, "airflow/variables/plain")
    assert type(info.value) is expected
    assert proxy.calls[GET] == 1  # botocore made one attempt: the core's guard owns retries
    assert "airflow/variables/plain" in info.value.message and "sm" in info.value.message
    assert (await backend.fetch(Kind.VARIABLE, "airflow/variables/plain")).value == VARIABLE  # recovered


@pytest.mark.parametrize(
    ("code", "expected"), [("ParameterNotFound", SecretNotFound), ("AccessDeniedException", AccessDenied)]
)
async def test_ssm_error_map(
    make_backend: Any, proxy: AwsProxy, aws_env: Any, code: str, expected: type[BrokerError]
) -> None:
    aws_env(static(proxy))
    proxy.queued[PARAM] = [(400, code)]
    with pytest.raises(expected):
        await make_backend(ssm()).fetch(Kind.VARIABLE, "/airflow/variables/ssm_var")


async def test_read_timeout_is_backend_timeout(make_backend: Any, proxy: AwsProxy, aws_env: Any) -> None:
    aws_env(static(proxy))
    backend = make_backend(sm(timeout=0.5))
    await backend.start()
    proxy.delay[GET] = 2.0
    with pytest.raises(BackendTimeout):
        await backend.fetch(Kind.VARIABLE, "airflow/variables/plain")


async def test_unreachable_endpoint_is_unavailable(make_backend: Any, proxy: AwsProxy, aws_env: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    aws_env(static(proxy))
    backend = make_backend(sm(endpoint_url=dead, timeout=2))
    with pytest.raises(BackendUnavailable) as info:
        await backend.fetch(Kind.VARIABLE, "airflow/variables/plain")
    assert not isinstance(info.value, BackendTimeout)


async def test_no_credentials_is_access_denied(make_backend: Any, proxy: AwsProxy, aws_env: Any) -> None:
    aws_env({"AWS_ENDPOINT_URL": proxy.url})
    backend = make_backend(sm())
    with pytest.raises(AccessDenied, match="no usable credentials"):
        await backend.start()
    assert gauge(backend, "broker_logins_total", backend="sm", outcome="failed") == 1
    assert proxy.calls[GET] == 0


# ------------------------------------------------------------------------------------------- identity


async def test_irsa_web_identity_and_check(make_backend: Any, proxy: AwsProxy, aws_env: Any, tmp_path: Path) -> None:
    aws_env(irsa(proxy, tmp_path))
    backend = make_backend(sm())
    await backend.start()
    assert proxy.calls["sts.AssumeRoleWithWebIdentity"] == 1
    assert gauge(backend, "broker_identity_expiry_seconds", backend="sm") > 600
    assert gauge(backend, "broker_logins_total", backend="sm", outcome="ok") == 1
    results = await asyncio.gather(*(backend.fetch(Kind.VARIABLE, "airflow/variables/plain") for _ in range(20)))
    assert {r.value for r in results} == {VARIABLE}
    assert proxy.calls["sts.AssumeRoleWithWebIdentity"] == 1  # one login shared by every call
    assert all("Credential=ASIA" in h for a, h in proxy.auth_headers if a == GET)
    described = await backend.check()
    assert described.startswith("aws arn=arn:aws:sts::123456789012:assumed-role/airflow-broker/")
    assert described.endswith("account=123456789012")


async def test_expired_token_gets_one_fresh_login(
    make_backend: Any, proxy: AwsProxy, aws_env: Any, tmp_path: Path
) -> None:
    aws_env(irsa(proxy, tmp_path))
    backend = make_backend(sm())
    await backend.start()
    proxy.queued[GET] = [(400, "ExpiredTokenException")]
    assert (await backend.fetch(Kind.VARIABLE, "airflow/variables/plain")).value == VARIABLE
    assert proxy.calls["sts.AssumeRoleWithWebIdentity"] == 2
    assert proxy.calls[GET] == 2
    proxy.errors[GET] = (400, "ExpiredTokenException")
    with pytest.raises(AccessDenied, match="ExpiredTokenException"):
        await backend.fetch(Kind.VARIABLE, "airflow/variables/plain")
    assert proxy.calls["sts.AssumeRoleWithWebIdentity"] == 3  # one fresh login per failing call, not a loop
    assert proxy.calls[GET] == 4


async def test_assume_role_on_top_of_the_chain(make_backend: Any, proxy: AwsProxy, aws_env: Any) -> None:
    aws_env(static(proxy))
    target = "arn:aws:iam::123456789012:role/cross-account-reader"
    backend = make_backend(sm(role_arn=target, external_id="ext-123", role_session_name="broker-x"))
    results = await asyncio.gather(*(backend.fetch(Kind.VARIABLE, "airflow/variables/plain") for _ in range(30)))
    assert {r.value for r in results} == {VARIABLE}
    assert proxy.calls["sts.AssumeRole"] == 1  # built once, refreshed once, for 30 concurrent first calls
    assert next(h for a, h in proxy.auth_headers if a == "sts.AssumeRole").count("AKIASTATICTESTKEY000") == 1
    assert all("Credential=ASIA" in h for a, h in proxy.auth_headers if a == GET)
    assert await backend.check() == (
        "aws arn=arn:aws:sts::123456789012:assumed-role/cross-account-reader/broker-x account=123456789012"
    )
    proxy.errors["sts.AssumeRole"] = (403, "AccessDenied")
    denied = make_backend(sm(role_arn=target))
    with pytest.raises(AccessDenied):
        await denied.start()


async def test_pod_identity_shared_refresh(make_backend: Any, proxy: AwsProxy, aws_env: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("pod-identity-projected-token")
    # Credentials inside botocore's mandatory refresh window (10 minutes) are refreshed before use: the
    # first two answers last 5 minutes, so start() loads and refreshes once and the next call must refresh.
    agent = PodIdentityAgent("pod-identity-projected-token", lifetimes=[300, 300])
    try:
        aws_env(
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": agent.url,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
                "AWS_ENDPOINT_URL": proxy.url,
            }
        )
        backend = make_backend(sm())
        await backend.start()
        assert agent.requests == 2
        assert 0 < gauge(backend, "broker_identity_expiry_seconds", backend="sm") <= 300
        results = await asyncio.gather(*(backend.fetch(Kind.VARIABLE, "airflow/variables/plain") for _ in range(20)))
        assert {r.value for r in results} == {VARIABLE}
        assert (agent.requests, agent.refused) == (3, 0)  # one refresh shared by 20 concurrent calls
        assert gauge(backend, "broker_identity_expiry_seconds", backend="sm") > 3000
        assert gauge(backend, "broker_logins_total", backend="sm", outcome="ok") == 2

        agent.token = "another-token"  # the agent now refuses the pod's token
        refused = make_backend(sm())
        with pytest.raises(BackendUnavailable):
            await refused.start()
        assert agent.refused >= 1
    finally:
        agent.stop()
