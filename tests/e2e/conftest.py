"""Real Airflow, a real broker daemon and real stores (files, OpenBao, moto), wired as the README says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.e2e.venvs import AIRFLOW_VERSIONS, ensure_airflow
from tests.servers.openbao import ROOT_TOKEN, OpenBao
from tests.support.broker_process import BrokerProcess
from tests.support.leakcheck import plant

PASSWORD = "p@ss/w:rd#"
EXTRA = {"sslmode": "require", "options": {"connect_timeout": 5, "keepalives": [1, 2]}}
PLAIN = "e2e-plain-variable-2f8c"
JSON_VAR = {"team": "data", "limits": {"cpu": 2}}
VAULT_VAR = "e2e-vault-variable-9a1b"
AWS_VAR = "e2e-aws-variable-77c3"

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


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("e2e-stores")
    bao = OpenBao(work / "bao").start()
    bao.kv2_put("variables/e2e_vault", {"value": VAULT_VAR})
    bao.kv2_put("connections/e2e_vault_conn", {"conn_uri": "mysql://vault-user:vault%40pw@vault-db:3306/app"})
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
    token.write_text(ROOT_TOKEN)
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


@pytest.fixture(scope="session", params=sorted(AIRFLOW_VERSIONS))
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, stores: dict[str, Any]
) -> Iterator[tuple[str, Path, Stack]]:
    major = request.param
    python = ensure_airflow(AIRFLOW_VERSIONS[major])
    work = tmp_path_factory.mktemp(f"airflow{major}")
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
    home = work / "home"
    (home / "dags").mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "dags" / "broker_e2e.py", home / "dags")
    started = time.monotonic()
    migrated = run_airflow(python, airflow_env(major, home, broker.socket_path), "db", "migrate")
    assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-3000:]
    print(f"airflow {AIRFLOW_VERSIONS[major]}: db migrate took {time.monotonic() - started:.1f}s")
    try:
        yield major, python, Stack(broker, home, fernet_key)
    finally:
        broker.stop()


plant("e2e", PASSWORD)
