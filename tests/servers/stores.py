"""Every networked backend type behind its own fault proxy: OpenBao (KV v2, and KV v1 on a server of its own),
moto (Secrets Manager and SSM), the local GCP Secret Manager and Azure Key Vault. A ``Harness`` says how to
point a broker at its proxy, which keys are planted, how to plant more in the store's own layout, and what
the store's own throttling (and, for AWS, denial and expired-token) answers look like.

The servers are session-wide (``tests/conftest.py`` registers these fixtures): the fault, garbage, traversal
and acceptance suites share one set."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.servers.azure import AzureServers
from tests.servers.cloud import TestCA
from tests.servers.fault_proxy import FaultProxy
from tests.servers.gcp import GcpServers
from tests.servers.moto import MotoServer
from tests.servers.openbao import ROOT_TOKEN, OpenBao
from tests.support.leakcheck import plant

OUTSIDE = "outside-every-prefix-value-9c2f"  # planted in each store outside the variables layout
KEYS = 12  # uncached keys planted per store
REGION = "eu-west-1"
AWS_JSON = {"Content-Type": "application/x-amz-json-1.1"}
AWS_THROTTLE = (400, AWS_JSON, b'{"__type": "ThrottlingException", "message": "Rate exceeded"}')
AWS_DENY = (
    400,
    AWS_JSON,
    b'{"__type": "AccessDeniedException", "message": "User is not authorized to perform this action"}',
)
AWS_EXPIRED = (
    400,
    AWS_JSON,
    b'{"__type": "ExpiredTokenException", "message": "The security token included in the request is expired"}',
)
KIND_PATH = {"connection": "connections", "variable": "variables", "config": "config"}


NESTED = "team/nested"  # a nested id, planted where the store's provider finds one (Vault, SM, SSM)


def value_of(store: str, key: str) -> str:
    return f"fault-{store}-{key}-value-7e1d"


@dataclass
class Harness:
    name: str
    proxy: FaultProxy
    backend: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # variable names planted in the store
    admin: Any = None  # the store's own handle (OpenBao, boto3 clients, GcpServers, AzureServers)
    put: Callable[[str, str, str], None] | None = None  # plant (kind, Airflow id, value) in the default layout

    def config(self, **overrides: Any) -> dict[str, Any]:
        return {**self.backend, **overrides}


def _seed(cloud: Any, store: str) -> None:
    """The acceptance keys as variables, and the secrets outside Airflow's layout that must never be read."""
    for key in _keys():
        cloud.add(f"airflow-variables-{key}", value_of(store, key))
    for name in ("outside", "airflow-variables", "airflow-config-outside"):
        cloud.add(name, OUTSIDE)


def _tls_proxy(upstream: str, fault_ca: Any, throttle_body: bytes) -> FaultProxy:
    """A started fault proxy that ends and re-opens TLS with the test CA; throttled, it answers 429 with
    ``Retry-After: 1`` and ``throttle_body``."""
    return FaultProxy(
        upstream,
        listen_tls=fault_ca.server_context(),
        upstream_tls=_client_tls(fault_ca),
        throttle=(429, {"Retry-After": "1"}, throttle_body),
    ).start()


def _client_tls(ca: TestCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.ca_path))


def _keys() -> list[str]:
    return ["cached", *(f"k{i}" for i in range(KEYS))]


@pytest.fixture(scope="session")
def fault_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("fault-ca"))


@pytest.fixture(scope="session")
def harnesses(tmp_path_factory: pytest.TempPathFactory, fault_ca: TestCA) -> Iterator[dict[str, Harness]]:
    work = tmp_path_factory.mktemp("faults")
    stops: list[Any] = []
    out: dict[str, Harness] = {}
    try:
        # Vault / OpenBao: KV v2, token auth (the token file holds the dev root token)
        bao = OpenBao(work).start()
        stops.append(bao.stop)
        for key in _keys():
            bao.kv2_put(f"variables/{key}", {"value": value_of("vault", key)})
        for path in ("outside", "variables", "config/outside"):
            bao.kv2_put(path, {"value": OUTSIDE})
        bao.kv2_put(f"variables/{NESTED}", {"value": value_of("vault", NESTED)})
        token_file = work / "vault.token"
        token_file.write_text(ROOT_TOKEN)
        proxy = FaultProxy(bao.url, throttle=(429, {}, b'{"errors": ["rate limit quota exceeded"]}')).start()
        stops.append(proxy.stop)
        out["vault"] = Harness(
            "vault",
            proxy,
            {
                "name": "vault",
                "type": "vault",
                "url": proxy.url,
                "auth": {"method": "token", "token_file": str(token_file)},
            },
            keys=_keys(),
            admin=bao,
            put=lambda kind, name, value: bao.kv2_put(f"{KIND_PATH[kind]}/{name}", _vault_data(kind, value)),
        )

        # AWS: one moto server, a proxy per service so each backend has its own faults
        moto = MotoServer().start()
        stops.append(moto.stop)
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": REGION}
        sm = boto3.client("secretsmanager", endpoint_url=moto.url, **creds)
        ssm = boto3.client("ssm", endpoint_url=moto.url, **creds)
        for key in _keys():
            sm.create_secret(Name=f"airflow/variables/{key}", SecretString=value_of("sm", key))
            ssm.put_parameter(Name=f"/airflow/variables/{key}", Value=value_of("ssm", key), Type="SecureString")
        sm.create_secret(Name=f"airflow/variables/{NESTED}", SecretString=value_of("sm", NESTED))
        ssm.put_parameter(Name=f"/airflow/variables/{NESTED}", Value=value_of("ssm", NESTED), Type="SecureString")
        for name in ("outside", "airflow/outside", "airflow/variables"):
            sm.create_secret(Name=name, SecretString=OUTSIDE)
            ssm.put_parameter(Name=f"/{name}", Value=OUTSIDE, Type="SecureString")
        aws_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        aws_env |= {
            "AWS_ACCESS_KEY_ID": "AKIAFAULTTESTKEY0000",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }
        puts = {
            "sm": lambda kind, name, value: _ignore(
                sm.create_secret(Name=f"airflow/{KIND_PATH[kind]}/{name}", SecretString=value)
            ),
            "ssm": lambda kind, name, value: _ignore(
                ssm.put_parameter(Name=f"/airflow/{KIND_PATH[kind]}/{name}", Value=value, Type="SecureString")
            ),
        }
        for store, type_ in (("sm", "aws_secrets_manager"), ("ssm", "aws_ssm")):
            proxy = FaultProxy(moto.url, throttle=AWS_THROTTLE, deny=AWS_DENY, expired=AWS_EXPIRED).start()
            stops.append(proxy.stop)
            backend = {"name": store, "type": type_, "region_name": REGION, "endpoint_url": proxy.url}
            admin = {"sm": sm, "ssm": ssm, "moto": moto}
            out[store] = Harness(store, proxy, backend, env=aws_env, keys=_keys(), admin=admin, put=puts[store])

        # GCP: Secret Manager over TLS; the proxy terminates and re-opens TLS with the test CA
        gcp = GcpServers(fault_ca)
        stops.append(gcp.stop)
        _seed(gcp.cloud, "gcp")
        proxy = _tls_proxy(
            gcp.secret_manager.url,
            fault_ca,
            b'{"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}}',
        )
        stops.append(proxy.stop)
        gcp_env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_"))}
        gcp_env |= gcp.env() | {"CLOUDSDK_CONFIG": str(work / "gcloud")}
        backend = {
            "name": "gcp",
            "type": "gcp_secret_manager",
            "endpoint_url": proxy.url,
            "ca_cert": str(fault_ca.ca_path),
        }
        out["gcp"] = Harness(
            "gcp",
            proxy,
            backend,
            env=gcp_env,
            keys=_keys(),
            admin=gcp,
            put=lambda kind, name, value: _ignore(gcp.cloud.add(f"airflow-{KIND_PATH[kind]}-{name}", value)),
        )

        # Azure: Key Vault over TLS behind the proxy; Entra reached directly
        azure = AzureServers(fault_ca)
        stops.append(azure.stop)
        _seed(azure.cloud, "azure")  # keys have no "_"
        proxy = _tls_proxy(
            azure.key_vault.url, fault_ca, b'{"error": {"code": "Throttled", "message": "Too many requests"}}'
        )
        stops.append(proxy.stop)
        token_file = work / "azure-token"
        token_file.write_text(azure.cloud.federated_token)
        azure_env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
        azure_env |= azure.env(str(token_file))
        backend = {
            "name": "akv",
            "type": "azure_key_vault",
            "vault_url": proxy.url,
            "ca_cert": str(fault_ca.ca_path),
            "verify_challenge_resource": False,
        }
        out["azure"] = Harness(
            "azure",
            proxy,
            backend,
            env=azure_env,
            keys=_keys(),
            admin=azure,
            # Key Vault names allow no '_': the broker asks for them with '-', as the provider does
            put=lambda kind, name, value: azure.cloud.add(f"airflow-{KIND_PATH[kind]}-{name}".replace("_", "-"), value),
        )
        yield out
    finally:
        for stop in reversed(stops):
            stop()


@pytest.fixture(scope="session")
def kv1_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """OpenBao with a KV v1 mount in Airflow's layout, behind its own fault proxy."""
    work = tmp_path_factory.mktemp("faults-kv1")
    bao = OpenBao(work).start()
    proxy: FaultProxy | None = None
    try:
        client = bao.client()
        client.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
        for key in _keys():
            client.secrets.kv.v1.create_or_update_secret(
                path=f"variables/{key}", mount_point="kv1", secret={"value": value_of("vault-kv1", key)}
            )
        token_file = work / "vault.token"
        token_file.write_text(ROOT_TOKEN)
        proxy = FaultProxy(bao.url, throttle=(429, {}, b'{"errors": ["rate limit quota exceeded"]}')).start()
        backend = {
            "name": "vault-kv1",
            "type": "vault",
            "url": proxy.url,
            "mount_point": "kv1",
            "kv_engine_version": 1,
            "auth": {"method": "token", "token_file": str(token_file)},
        }

        def put(kind: str, name: str, value: str) -> None:
            client.secrets.kv.v1.create_or_update_secret(
                path=f"{KIND_PATH[kind]}/{name}", mount_point="kv1", secret=_vault_data(kind, value)
            )

        yield Harness("vault-kv1", proxy, backend, keys=_keys(), admin=bao, put=put)
    finally:
        if proxy is not None:
            proxy.stop()
        bao.stop()


def _ignore(_: object) -> None:
    return None


def _vault_data(kind: str, value: str) -> dict[str, str]:
    """A secret's data in Airflow's VaultBackend layout: connections under ``conn_uri``, the rest ``value``."""
    return {"conn_uri": value} if kind == "connection" else {"value": value}


def planted_values() -> list[str]:
    return [value_of(store, key) for store in ("vault", "vault-kv1", "sm", "ssm", "gcp", "azure") for key in _keys()]


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


plant("faults", *planted_values())
plant("traversal", OUTSIDE)
