"""moto behind a counting proxy, secrets planted in Airflow's default layouts, and identity helpers.

Daemon tests pass the AWS environment to the broker process; backend tests build Backend objects in
this process and set the same environment with ``aws_env`` (monkeypatch: undone after each test).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import boto3
import pytest

from broker.backends import load_type
from broker.backends.base import Backend, BackendContext
from broker.clock import SystemClock
from broker.metrics import Metrics
from tests.servers.aws_proxy import AwsProxy
from tests.servers.httpd import LoopbackHTTPServer
from tests.servers.moto import MotoServer
from tests.support.leakcheck import plant

REGION = "eu-west-1"
PASSWORD = "p@ss/w:rd#-aws-3b7f"
VARIABLE = "aws-variable-value-1c9e"
CONFIG_VALUE = "aws-config-value-6a0d"
SSM_SECRET = "ssm-secure-value-44f1"


@pytest.fixture(scope="session")
def moto_proxy() -> Iterator[AwsProxy]:
    server = MotoServer().start()
    proxy = AwsProxy(server.url).start()
    sm = boto3.client(
        "secretsmanager",
        region_name=REGION,
        endpoint_url=proxy.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    ssm = boto3.client(
        "ssm", region_name=REGION, endpoint_url=proxy.url, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    sm.create_secret(
        Name="airflow/connections/pg_uri", SecretString="postgres://u:p%40ss%2Fw%3Ard%23-aws-3b7f@db.aws:5432/airflow"
    )
    sm.create_secret(
        Name="airflow/connections/pg_json",
        SecretString=json.dumps(
            {
                "conn_type": "postgres",
                "host": "db.aws",
                "user": "u",
                "password": PASSWORD,
                "port": 5432,
                "database": "airflow",
                "extra": {"sslmode": "require"},
            }
        ),
    )
    sm.create_secret(Name="airflow/variables/plain", SecretString=VARIABLE)
    sm.create_secret(Name="airflow/variables/binary", SecretBinary=b"binary-variable")
    sm.create_secret(Name="airflow/variables/rotating", SecretString="version-one")
    sm.create_secret(Name="airflow/config/sql_alchemy_conn", SecretString=CONFIG_VALUE)
    sm.create_secret(Name="airflow/variables/not_utf8", SecretBinary=b"\xff\xfe\x00binary")
    sm.create_secret(Name="bare_id", SecretString="empty-prefix-value")
    ssm.put_parameter(Name="/airflow/connections/ssm_conn", Value="mysql://a:b@h:3306/s", Type="SecureString")
    ssm.put_parameter(Name="/airflow/variables/ssm_var", Value=SSM_SECRET, Type="SecureString")
    ssm.put_parameter(Name="/airflow/config/ssm_cfg", Value="ssm-config", Type="SecureString")
    ssm.put_parameter(
        Name="/airflow/connections/ssm_json",
        Value=json.dumps({"conn_type": "http", "host": "api.aws", "password": PASSWORD, "extra": {"timeout": 5}}),
        Type="SecureString",
    )
    ssm.put_parameter(Name="/bare_param", Value="bare-param-value", Type="String")
    # multi-team and nested ids, in the providers' layouts
    sm.create_secret(Name="airflow/variables/alpha--plain", SecretString="alpha-sm")
    sm.create_secret(Name="airflow/variables/team/sm_nested", SecretString="nested-sm")
    ssm.put_parameter(Name="/airflow/variables/alpha--ssm_var", Value="alpha-ssm", Type="SecureString")
    ssm.put_parameter(Name="/airflow/variables/team/ssm_nested", Value="nested-ssm", Type="String")
    proxy.sm = sm  # type: ignore[attr-defined]
    proxy.ssm = ssm  # type: ignore[attr-defined]
    try:
        yield proxy
    finally:
        proxy.stop()
        server.stop()


@pytest.fixture
def proxy(moto_proxy: AwsProxy) -> AwsProxy:
    moto_proxy.reset()
    return moto_proxy


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """The daemon's environment: nothing from the test runner's AWS settings, no metadata service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_DEFAULT_REGION": REGION,
        }
    )
    env.update(extra)
    return env


def static_env(proxy: AwsProxy) -> dict[str, str]:
    return base_env(
        {"AWS_ACCESS_KEY_ID": "AKIASTATICTESTKEY000", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": proxy.url}
    )


def sm_backend(**overrides: Any) -> dict[str, Any]:
    return {"name": "sm", "type": "aws_secrets_manager", "region_name": REGION, "timeout": 5, "retries": 3, **overrides}


def ssm_backend(**overrides: Any) -> dict[str, Any]:
    return {"name": "ssm", "type": "aws_ssm", "region_name": REGION, "timeout": 5, **overrides}


class PodIdentityAgent:
    """The EKS Pod Identity agent's credentials endpoint, on loopback: checks the Authorization header."""

    def __init__(self, token: str, lifetimes: list[float] | None = None) -> None:
        self.token = token
        self.lifetimes = list(lifetimes or [])  # seconds each answer's credentials last; then one hour
        self.requests = 0
        self.refused = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if self.headers.get("Authorization") != outer.token:
                    outer.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                lifetime = outer.lifetimes.pop(0) if outer.lifetimes else 3600.0
                body = json.dumps(
                    {
                        "AccessKeyId": "ASIAPODIDENTITYKEY01",
                        "SecretAccessKey": "pod-identity-secret",
                        "Token": "pod-identity-session-token",
                        "AccountId": "123456789012",
                        "Expiration": (datetime.now(UTC) + timedelta(seconds=lifetime)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/credentials"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def pod_identity(tmp_path: Path) -> Iterator[tuple[PodIdentityAgent, Path]]:
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("pod-identity-projected-token")
    agent = PodIdentityAgent("pod-identity-projected-token")
    yield agent, token_file
    agent.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Give this process the daemon's AWS environment (see ``base_env``) plus ``extra``."""

    def apply(extra: dict[str, str]) -> None:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        for key, value in base_env(extra).items():
            if key.startswith("AWS_"):
                monkeypatch.setenv(key, value)

    return apply


@pytest.fixture
def make_backend() -> Iterator[Any]:
    """Build Backend objects straight from a config mapping, with their own pool, clock and metrics."""
    pools: list[ThreadPoolExecutor] = []

    def make(config: dict[str, Any]) -> Backend:
        cls = load_type(config["type"])
        pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="aws-test")
        pools.append(pool)
        ctx = BackendContext(executor=pool, clock=SystemClock(), metrics=Metrics())
        return cls(cls.config_model.model_validate(config), ctx)

    yield make
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


plant("aws", PASSWORD, VARIABLE, CONFIG_VALUE, SSM_SECRET)
