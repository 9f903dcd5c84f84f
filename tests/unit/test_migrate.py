"""broker migrate: airflow.cfg shapes of each provider backend to a broker.yaml the broker's loader accepts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from broker.cli import main
from broker.config import validate_config
from broker.migrate import MigrateError, migrate

VAULT_CFG = """
[core]
multi_team = True

[secrets]
backend = airflow.providers.hashicorp.secrets.vault.VaultBackend
backend_kwargs = {"connections_path": ["connections/team1", "connections"], "variables_path": null,
    "mount_point": "airflow", "url": "http://127.0.0.1:8200", "auth_type": "kubernetes",
    "kubernetes_role": "airflow-workers", "token": "s.hunter2-not-copied"}
"""

CFGS = {
    "vault": VAULT_CFG,
    "secretsmanager": """
[secrets]
backend = airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend
backend_kwargs = {"connections_prefix": "airflow/connections", "variables_prefix": null, "sep": "-",
    "connections_lookup_pattern": "^(pg|mysql)_", "region_name": "eu-west-1",
    "aws_secret_access_key": "wJalr-not-copied", "profile_name": "default"}
""",
    "ssm": """
[secrets]
backend = airflow.providers.amazon.aws.secrets.systems_manager.SystemsManagerParameterStoreBackend
backend_kwargs = {"connections_prefix": "/airflow/connections", "region_name": "us-east-1"}
""",
    "gcp": """
[secrets]
backend = airflow.providers.google.cloud.secrets.secret_manager.CloudSecretManagerBackend
backend_kwargs = {"connections_prefix": "airflow-connections", "sep": "-", "project_id": "my-project-123",
    "gcp_key_path": "/files/key-not-copied.json"}
""",
    "azure": """
[secrets]
backend = airflow.providers.microsoft.azure.secrets.key_vault.AzureKeyVaultBackend
backend_kwargs = {"connections_prefix": "airflow-connections", "vault_url": "https://example.vault.azure.net/",
    "client_secret": "azure-secret-not-copied"}
""",
    "file": """
[secrets]
backend = airflow.secrets.local_filesystem.LocalFilesystemBackend
backend_kwargs = {"connections_file_path": "/files/connections.yaml", "variables_file_path": "/files/variables.json"}
""",
}
TYPES = {
    "vault": "vault",
    "secretsmanager": "aws_secrets_manager",
    "ssm": "aws_ssm",
    "gcp": "gcp_secret_manager",
    "azure": "azure_key_vault",
    "file": "file",
}


@pytest.mark.parametrize("provider", sorted(CFGS))
def test_each_provider_cfg_becomes_a_valid_broker_config_without_its_credentials(tmp_path: Path, provider: str) -> None:
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(CFGS[provider])
    result = migrate(cfg, {})
    validate_config(result.config)
    (backend,) = result.config["backends"]
    assert backend["type"] == TYPES[provider]
    text = yaml.safe_dump(result.config)
    assert "not-copied" not in text and "hunter2" not in text
    assert result.airflow_settings["AIRFLOW__SECRETS__BACKEND"] == "broker.airflow.BrokerSecretsBackend"
    assert json.loads(result.airflow_settings["AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"]) == {
        "socket_path": "/run/broker/broker.sock"
    }


def test_layout_kwargs_carry_over_and_credentials_name_the_identity(tmp_path: Path) -> None:
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(VAULT_CFG)
    result = migrate(cfg, {})
    (vault,) = result.config["backends"]
    assert vault["connections_path"] == ["connections/team1", "connections"]
    assert vault["variables_path"] is None and vault["mount_point"] == "airflow"
    assert vault["auth"] == {"method": "kubernetes", "role": "airflow-workers"}
    assert result.config["multi_team"] is True
    assert any("token is a credential and is not copied" in n for n in result.notes)

    cfg.write_text(CFGS["secretsmanager"])
    notes = migrate(cfg, {}).notes
    assert any("aws_secret_access_key" in n and "IRSA" in n for n in notes)
    assert any("profile_name" in n for n in notes)


def test_the_environment_overrides_the_file_as_in_airflow(tmp_path: Path) -> None:
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(CFGS["ssm"])
    env = {
        "AIRFLOW__SECRETS__BACKEND": "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend",
        "AIRFLOW__SECRETS__BACKEND_KWARGS": '{"connections_prefix": "from-env"}',
        "AIRFLOW__SECRETS__BACKEND_KWARG__REGION_NAME": "eu-central-1",
    }
    (backend,) = migrate(cfg, env).config["backends"]
    assert backend == {
        "name": "secrets",
        "type": "aws_secrets_manager",
        "connections_prefix": "from-env",
        "region_name": "eu-central-1",
    }
    # no file at all: the environment alone, and a [workers] backend that differs joins the chain
    env["AIRFLOW__WORKERS__SECRETS_BACKEND"] = "airflow.providers.hashicorp.secrets.vault.VaultBackend"
    env["AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"] = '{"url": "http://127.0.0.1:8200", "auth_type": "approle"}'
    result = migrate(None, env)
    validate_config(result.config)
    assert [b["type"] for b in result.config["backends"]] == ["aws_secrets_manager", "vault"]
    assert result.config["backends"][1]["auth"]["method"] == "approle"


def test_what_cannot_be_migrated_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrateError, match="no \\[secrets\\] backend"):
        migrate(None, {})
    with pytest.raises(MigrateError, match="not a provider backend"):
        migrate(None, {"AIRFLOW__SECRETS__BACKEND": "my.company.Backend"})
    with pytest.raises(MigrateError, match="not JSON"):
        migrate(None, {"AIRFLOW__SECRETS__BACKEND": "x", "AIRFLOW__SECRETS__BACKEND_KWARGS": "{oops"})
    with pytest.raises(MigrateError, match="already uses"):
        migrate(None, {"AIRFLOW__SECRETS__BACKEND": "broker.airflow.BrokerSecretsBackend"})


def without_airflow_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's process environment holds no ``AIRFLOW__*`` setting: only the file given is read."""
    for key in [k for k in os.environ if k.startswith("AIRFLOW__")]:
        monkeypatch.delenv(key)


def test_the_cli_writes_the_file_and_prints_the_airflow_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    without_airflow_settings(monkeypatch)
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(VAULT_CFG)
    out = tmp_path / "broker.yaml"
    assert main(["migrate", "--airflow-cfg", str(cfg), "--output", str(out)]) == 0
    validate_config(yaml.safe_load(out.read_text()))
    printed = capsys.readouterr()
    assert "AIRFLOW__WORKERS__SECRETS_BACKEND='broker.airflow.BrokerSecretsBackend'" in printed.out
    assert "token is a credential" in printed.err and "hunter2" not in printed.out + printed.err
    assert main(["migrate", "--airflow-cfg", str(cfg), "--output", str(out)]) == 2  # exists: not overwritten
    assert main(["migrate", "--airflow-cfg", str(cfg), "--output", str(out), "--force"]) == 0


def test_copied_deprecated_and_dropped_ignored_kwargs_print_the_load_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.backends.aws_secrets_manager import SecretsManagerConfig
    from broker.backends.vault import VaultConfig
    from broker.providerkw import notice

    without_airflow_settings(monkeypatch)
    vault = tmp_path / "vault.cfg"
    vault.write_text(VAULT_CFG.replace('"mount_point"', '"global_secrets_path": "common", "mount_point"'))
    out = tmp_path / "broker.yaml"
    assert main(["migrate", "--airflow-cfg", str(vault), "--output", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["backends"][0]["global_secrets_path"] == "common"
    rule = VaultConfig.provider_kwargs["global_secrets_path"]
    expected = notice("backends[0]", "global_secrets_path", rule)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert f"note: {expected}\n" in err
    assert err.count("global_secrets_path") == 1  # printed once, not also logged

    sm = tmp_path / "sm.cfg"
    sm.write_text(CFGS["secretsmanager"].replace('"sep": "-"', '"sep": "-", "full_url_mode": false'))
    assert main(["migrate", "--airflow-cfg", str(sm), "--output", str(out), "--force"]) == 0
    rule = SecretsManagerConfig.provider_kwargs["full_url_mode"]
    assert f"note: {notice('secrets', 'full_url_mode', rule)}; not carried over\n" in capsys.readouterr().err  # type: ignore[arg-type]
    assert "full_url_mode" not in out.read_text()


def test_a_moved_kwarg_is_written_under_the_broker_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_airflow_settings(monkeypatch)
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(
        CFGS["azure"].replace('"client_secret"', '"workload_identity_tenant_id": "tenant-1", "client_secret"')
    )
    result = migrate(cfg, {})
    assert result.config["backends"][0]["tenant_id"] == "tenant-1"
    validate_config(result.config)
