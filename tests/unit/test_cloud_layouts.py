"""GCP and Azure layouts as Airflow's backends build names and challenge parsing (no I/O; the shared status map
and Retry-After are tests/unit/backends/test_rest.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker.backends import REGISTRY, load_type
from broker.backends.azure_key_vault import parse_challenge
from broker.backends.base import (
    AccessDenied,
    BackendContext,
    BackendError,
    ConfigurationError,
    Kind,
)
from broker.clock import FakeClock
from broker.config import validate_config
from broker.metrics import Metrics


def backend(config: dict[str, Any]) -> Any:
    cls = load_type(config["type"])
    ctx = BackendContext(ThreadPoolExecutor(1), FakeClock(), Metrics())
    return cls(cls.config_model.model_validate(config), ctx)


GCP = {"name": "g", "type": "gcp_secret_manager", "project_id": "airflow-prod"}
AZURE = {"name": "a", "type": "azure_key_vault", "vault_url": "https://my-vault.vault.azure.net/"}


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "path"),
    [
        ({}, Kind.CONNECTION, "postgres_default", "airflow-connections-postgres_default"),
        ({}, Kind.VARIABLE, "my_var", "airflow-variables-my_var"),
        ({}, Kind.CONFIG, "sql_alchemy_conn", "airflow-config-sql_alchemy_conn"),
        ({"sep": "_", "variables_prefix": "team"}, Kind.VARIABLE, "x", "team_x"),
        ({"variables_prefix": ""}, Kind.VARIABLE, "x", "-x"),  # Airflow's build_path keeps the separator
        ({"variables_prefix": None}, Kind.VARIABLE, "x", None),
        ({}, Kind.VARIABLE, "dotted.name", None),  # not a valid secret id: not looked up here
        ({}, Kind.VARIABLE, "a" * 240, None),  # over 255 characters with the prefix
    ],
)
def test_gcp_layout(overrides: dict[str, Any], kind: Kind, name: str, path: str | None) -> None:
    assert backend({**GCP, **overrides}).locate(kind, name) == path


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "path"),
    [
        ({}, Kind.CONNECTION, "aws_default", "airflow-connections-aws-default"),
        ({}, Kind.VARIABLE, "my_var", "airflow-variables-my-var"),
        ({}, Kind.CONFIG, "sql_alchemy_conn", "airflow-config-sql-alchemy-conn"),
        ({"connections_prefix": "airflow-connections-"}, Kind.CONNECTION, "x", "airflow-connections-x"),  # rstrip(sep)
        ({"connections_prefix": ""}, Kind.CONNECTION, "my_conn", "my-conn"),  # empty prefix: the id alone
        ({"connections_prefix": "team_a"}, Kind.CONNECTION, "c", "team-a-c"),  # underscores in the prefix too
        ({"connections_prefix": None}, Kind.CONNECTION, "x", None),
        ({}, Kind.VARIABLE, "dotted.name", None),  # Key Vault names hold letters, digits and '-' only
        ({}, Kind.VARIABLE, "a" * 120, None),  # over 127 characters
    ],
)
def test_azure_layout(overrides: dict[str, Any], kind: Kind, name: str, path: str | None) -> None:
    assert backend({**AZURE, **overrides}).locate(kind, name) == path


def test_challenge_parsing() -> None:
    header = 'Bearer authorization="https://login.windows.net/tenant-1", resource="https://vault.azure.net"'
    assert parse_challenge(header) == {
        "authorization": "https://login.windows.net/tenant-1",
        "resource": "https://vault.azure.net",
    }
    assert parse_challenge('Basic realm="x"') == {}
    kv = backend(AZURE)
    kv._accept_challenge(header, "t")
    assert (kv.identity.scope, kv.identity.challenge_tenant) == ("https://vault.azure.net/.default", "tenant-1")
    with pytest.raises(AccessDenied, match="outside the vault's domain"):
        kv._accept_challenge(header.replace("vault.azure.net", "evil.example"), "t")
    with pytest.raises(BackendError, match="without a usable Bearer challenge"):
        kv._accept_challenge('Bearer resource="https://vault.azure.net"', "t")


def test_gcp_crc32c_checked() -> None:
    import base64

    import google_crc32c

    data = {"name": "projects/1/secrets/s/versions/4", "payload": {"data": base64.b64encode(b"v").decode()}}
    good = {**data, "payload": {**data["payload"], "dataCrc32c": str(google_crc32c.value(b"v"))}}
    bad = {**data, "payload": {**data["payload"], "dataCrc32c": str(google_crc32c.value(b"v") ^ 1)}}
    cls = load_type("gcp_secret_manager")
    assert cls._decode(good, "w").version == "4"
    with pytest.raises(BackendError, match="CRC32C mismatch"):
        cls._decode(bad, "w")


def test_a_type_missing_from_the_build_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "gcp_secret_manager", "broker.backends.not_in_this_build")
    with pytest.raises(ConfigurationError) as info:
        validate_config({"backends": [{"name": "g", "type": "gcp_secret_manager"}]})
    assert "backends[0].type: backend type 'gcp_secret_manager' is not part of this build" in info.value.errors
