"""Real Airflow, a real broker daemon and real stores (files, OpenBao, moto), wired as the README says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.e2e.venvs import AIRFLOW_31, AIRFLOW_VERSIONS, ensure_airflow
from tests.servers.openbao import OpenBao
from tests.support.broker_process import BrokerProcess
from tests.support.leakcheck import plant

PASSWORD = "p@ss/w:rd#"
EXTRA = {"sslmode": "require", "options": {"connect_timeout": 5, "keepalives": [1, 2]}}
PLAIN = "e2e-plain-variable-2f8c"
JSON_VAR = {"team": "data", "limits": {"cpu": 2}}
VAULT_VAR = "e2e-vault-variable-9a1b"
AWS_VAR = "e2e-aws-variable-77c3"
# The pod's Vault policy refuses these two ids (OpenBao answers 403, so the broker does); Airflow's
# environment holds a fallback for each, which only versions without an authoritative deny reach.
DENIED = "e2e_denied"
DENIED_ENV_VAR = "e2e-denied-environment-fallback"
DENIED_ENV_HOST = "env-denied.example"
DENIED_VALUE = "never-served-c41d"  # what the store holds under the denied ids: no process may ever see it
URI_EXTRAS = "postgres://uri-user:uri%2Fpw@uri-db:5432/app?ssl=true&timeout=5"
VAULT_POLICY = """
path "secret/data/*" { capabilities = ["read"] }
path "secret/data/connections/e2e_denied" { capabilities = ["deny"] }
path "secret/data/variables/e2e_denied" { capabilities = ["deny"] }
"""

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    broker: BrokerProcess
    home: Path
    fernet_key: str


def airflow_env(version_major: str, home: Path, socket_path: str) -> dict[str, str]:
    """Exactly the settings docs/airflow.md tells users to make, plus a throwaway AIRFLOW_HOME."""
    kwargs = json.dumps({"socket_path": socket_path, "timeout": 5})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "VIRTUAL_ENV"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__SECRETS__BACKEND": "broker.airflow.BrokerSecretsBackend",
            "AIRFLOW__SECRETS__BACKEND_KWARGS": kwargs,
            "AIRFLOW__CORE__FERNET_KEY_SECRET": "fernet_key",
            "AIRFLOW_CONN_ENV_ONLY": "http://env-user:env-pass@env.example:8080",
            "AIRFLOW_VAR_ENV_ONLY": "from-airflow-environment",
            "AIRFLOW_CONN_E2E_DENIED": f"http://env-user:env-pass@{DENIED_ENV_HOST}:8080",
            "AIRFLOW_VAR_E2E_DENIED": DENIED_ENV_VAR,
            "PYTHONWARNINGS": "ignore",
        }
    )
    if version_major == "3":
        env["AIRFLOW__WORKERS__SECRETS_BACKEND"] = "broker.airflow.BrokerSecretsBackend"
        env["AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"] = kwargs
    return env


def run_airflow(
    python: Path, env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    airflow = python.parent / "airflow"
    return subprocess.run(
        [str(airflow), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=env["AIRFLOW_HOME"]
    )


# The server context (CLI, scheduler, API server): Airflow's ORM Connection and Variable, searching the
# backends of [secrets] and then the environment and metastore; and BrokerSecretsBackend asked directly,
# to see what it raises for a 403 on this Airflow. Secrets are printed as digests only.
SERVER_LOOKUPS = """
import hashlib, json, airflow
from airflow.models import Connection, Variable
from broker.airflow import BrokerSecretsBackend, access_denied_class

def digest(value):
    return hashlib.sha256(value.encode()).hexdigest()

def outcome(read):
    try:
        return read()
    except Exception as exc:
        return {"raised": type(exc).__name__}

pg = Connection.get_connection_from_secrets("e2e_pg")
uri = Connection.get_connection_from_secrets("e2e_uri_extras")
backend = BrokerSecretsBackend(socket_path=SOCKET, timeout="3")
denied = access_denied_class()
result = {
    "airflow": airflow.__version__,
    "pg": [pg.host, pg.port, digest(pg.password), pg.extra_dejson],
    "uri": [uri.host, digest(uri.password), uri.extra_dejson],
    "plain": digest(Variable.get("e2e_plain")),
    "vault": Variable.get("e2e_vault"),
    "denied_variable": outcome(lambda: Variable.get("e2e_denied")),
    "denied_host": outcome(lambda: Connection.get_connection_from_secrets("e2e_denied").host),
    "access_denied_class": denied and f"{denied.__module__}.{denied.__name__}",
    "backend_raises": [
        outcome(lambda: backend.get_conn_value("e2e_denied")),
        outcome(lambda: backend.get_variable("e2e_denied", team_name="team_a")),
    ],
}
print(json.dumps(result))
"""


def server_lookups(python: Path, env: dict[str, str], socket_path: str) -> tuple[dict[str, Any], str]:
    """SERVER_LOOKUPS' result in a fresh process of this venv, and everything that process printed."""
    code = f"SOCKET = {socket_path!r}\n{SERVER_LOOKUPS}"
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=180, env=env, cwd=env["AIRFLOW_HOME"]
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout + result.stderr


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("e2e-stores")
    bao = OpenBao(work / "bao").start()
    bao.kv2_put("variables/e2e_vault", {"value": VAULT_VAR})
    bao.kv2_put("connections/e2e_vault_conn", {"conn_uri": "mysql://vault-user:vault%40pw@vault-db:3306/app"})
    bao.kv2_put("connections/e2e_uri_extras", {"conn_uri": URI_EXTRAS})
    for kind in ("connections", "variables"):
        bao.kv2_put(f"{kind}/{DENIED}", {"value": DENIED_VALUE, "conn_uri": f"http://never:{DENIED_VALUE}@vault"})
    root = bao.client()
    root.sys.create_or_update_policy("e2e-airflow", VAULT_POLICY)
    pod_token = root.auth.token.create(policies=["e2e-airflow"], ttl="12h")["auth"]["client_token"]
    root.adapter.close()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    boto3.client(
        "secretsmanager",
        region_name="us-east-1",
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_secret(Name="airflow/variables/e2e_aws", SecretString=AWS_VAR)
    token = work / "bao.token"
    token.write_text(pod_token)  # the pod's identity: reads Airflow's layout, refused the denied ids
    try:
        yield {"bao": bao, "moto_url": moto_url, "token": token}
    finally:
        moto.stop()
        bao.stop()


def broker_config(files: Path, stores: dict[str, Any]) -> dict[str, Any]:
    return {
        "cache": {"ttl": 300},
        "audit": {"enabled": True, "output": str(files.parent / "audit.jsonl")},
        "backends": [
            {
                "name": "vault",
                "type": "vault",
                "url": stores["bao"].url,
                "auth": {"method": "token", "token_file": str(stores["token"])},
            },
            {
                "name": "aws",
                "type": "aws_secrets_manager",
                "region_name": "us-east-1",
                "endpoint_url": stores["moto_url"],
                "connections_prefix": None,
                "config_prefix": None,
            },
            {
                "name": "files",
                "type": "file",
                "connections_file_path": str(files / "connections.json"),
                "variables_file_path": str(files / "variables.json"),
                "config_file_path": str(files / "config.env"),
            },
        ],
    }


@contextmanager
def airflow_stack(
    version: str, major: str, tmp_path_factory: pytest.TempPathFactory, stores: dict[str, Any]
) -> Iterator[tuple[Path, Stack]]:
    """Airflow ``version``'s venv, a broker over the stores and files, and a migrated AIRFLOW_HOME."""
    python = ensure_airflow(version)
    work = tmp_path_factory.mktemp(f"airflow{version}")
    files = work / "secrets"
    files.mkdir()
    from cryptography.fernet import Fernet

    fernet_key = Fernet.generate_key().decode()
    (files / "connections.json").write_text(
        json.dumps(
            {
                "e2e_pg": {
                    "conn_type": "postgres",
                    "host": "pg.example",
                    "login": "airflow",
                    "password": PASSWORD,
                    "port": 5432,
                    "schema": "analytics",
                    "extra": EXTRA,
                }
            }
        )
    )
    (files / "variables.json").write_text(json.dumps({"e2e_plain": PLAIN, "e2e_json": JSON_VAR}))
    (files / "config.env").write_text(f"fernet_key={fernet_key}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
    )
    broker = BrokerProcess(broker_config(files, stores), work / "broker", env=env)
    (work / "broker").mkdir()
    broker.start()
    try:
        home = work / "home"
        (home / "dags").mkdir(parents=True)
        shutil.copy(Path(__file__).parent / "dags" / "broker_e2e.py", home / "dags")
        started = time.monotonic()
        migrated = run_airflow(python, airflow_env(major, home, broker.socket_path), "db", "migrate")
        assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-3000:]
        print(f"airflow {version}: db migrate took {time.monotonic() - started:.1f}s")
        yield python, Stack(broker, home, fernet_key)
    finally:
        broker.stop()


@pytest.fixture(scope="session", params=sorted(AIRFLOW_VERSIONS))
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, stores: dict[str, Any]
) -> Iterator[tuple[str, Path, Stack]]:
    major = request.param
    with airflow_stack(AIRFLOW_VERSIONS[major], major, tmp_path_factory, stores) as (python, st):
        yield major, python, st


@pytest.fixture(scope="session")
def stack31(tmp_path_factory: pytest.TempPathFactory, stores: dict[str, Any]) -> Iterator[tuple[Path, Stack]]:
    """Airflow 3.1 (no ``AirflowSecretsBackendAccessDenied``), set up as the README says for Airflow 3."""
    with airflow_stack(AIRFLOW_31, "3", tmp_path_factory, stores) as (python, st):
        yield python, st


plant("e2e", PASSWORD, DENIED_VALUE)
