"""``broker migrate``: from the provider secrets backend Airflow is configured with to the broker.

Reads ``[secrets] backend`` / ``backend_kwargs`` and ``[workers] secrets_backend`` / ``secrets_backend_kwargs``
from an ``airflow.cfg`` and the ``AIRFLOW__SECRETS__*`` / ``AIRFLOW__WORKERS__*`` environment (which
override the file, as in Airflow, including the per-key ``AIRFLOW__SECRETS__BACKEND_KWARG__<KEY>``), and
``[core] multi_team``. Layout kwargs are carried over as they are; credentials found in the kwargs are
never copied: a note says which identity to set up instead.
"""

from __future__ import annotations

import configparser
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.providerkw import Ignored, Moves, ProviderKwarg, notice

CLIENT = "broker.airflow.BrokerSecretsBackend"
DEFAULT_SOCKET = "/run/broker/broker.sock"

# provider class -> (broker type, the kwargs carried over verbatim)
_AWS_LAYOUT = (
    "connections_prefix",
    "variables_prefix",
    "config_prefix",
    "connections_lookup_pattern",
    "variables_lookup_pattern",
    "config_lookup_pattern",
    "region_name",
    "endpoint_url",
    "role_arn",
)
PROVIDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "airflow.providers.hashicorp.secrets.vault.VaultBackend": (
        "vault",
        (
            "url",
            "namespace",
            "mount_point",
            "kv_engine_version",
            "connections_path",
            "variables_path",
            "config_path",
            "use_team_secrets_path",
            "global_secrets_path",
        ),
    ),
    "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend": (
        "aws_secrets_manager",
        (*_AWS_LAYOUT, "sep", "extra_conn_words"),
    ),
    "airflow.providers.amazon.aws.secrets.systems_manager.SystemsManagerParameterStoreBackend": (
        "aws_ssm",
        _AWS_LAYOUT,
    ),
    "airflow.providers.google.cloud.secrets.secret_manager.CloudSecretManagerBackend": (
        "gcp_secret_manager",
        ("connections_prefix", "variables_prefix", "config_prefix", "sep", "project_id"),
    ),
    "airflow.providers.microsoft.azure.secrets.key_vault.AzureKeyVaultBackend": (
        "azure_key_vault",
        ("vault_url", "connections_prefix", "variables_prefix", "config_prefix", "sep", "client_id", "tenant_id"),
    ),
    "airflow.secrets.local_filesystem.LocalFilesystemBackend": (
        "file",
        ("connections_file_path", "variables_file_path"),
    ),
}

# Credentials in backend_kwargs, by broker type: what to set up instead (never copied).
CREDENTIALS: dict[str, dict[str, str]] = {
    "vault": {
        "token": "a token file: auth.method token with auth.token_file (or better, auth.method kubernetes)",
        "token_path": "auth.token_file (auth.method token)",
        "role_id": "a file holding it: auth.role_id_file (auth.method approle)",
        "secret_id": "a file holding it: auth.secret_id_file (auth.method approle)",
        "username": "the pod's identity: auth.method kubernetes or jwt with auth.role",
        "password": "the pod's identity: auth.method kubernetes or jwt with auth.role",
        "key_id": "auth.method aws: the pod's AWS identity (IRSA) signs the login",
        "jwt_token": "the projected service-account token: auth.method jwt, auth.token_path",
        "gcp_keyfile_dict": "the pod's identity: auth.method kubernetes or jwt with auth.role",
        "gcp_key_path": "the pod's identity: auth.method kubernetes or jwt with auth.role",
        "radius_secret": "the pod's identity: auth.method kubernetes or jwt with auth.role",
    },
    "aws": {
        "aws_access_key_id": "the pod's AWS identity (IRSA or EKS Pod Identity), role_arn to assume a role",
        "aws_secret_access_key": "the pod's AWS identity (IRSA or EKS Pod Identity), role_arn to assume a role",
        "aws_session_token": "the pod's AWS identity (IRSA or EKS Pod Identity), role_arn to assume a role",
        "profile_name": "the pod's AWS identity (IRSA or EKS Pod Identity), role_arn to assume a role",
        "aws_conn_id": "the pod's AWS identity (IRSA or EKS Pod Identity), role_arn to assume a role",
    },
    "gcp_secret_manager": {
        "gcp_key_path": "Workload Identity (Application Default Credentials), or credentials_file",
        "gcp_keyfile_dict": "Workload Identity (Application Default Credentials), or credentials_file",
        "gcp_credential_config_file": "Workload Identity (Application Default Credentials), or credentials_file",
    },
    "azure_key_vault": {
        "client_secret": "Azure Workload Identity (credential: workload_identity, client_id, tenant_id)",
    },
}
VAULT_AUTH = {
    "kubernetes": "kubernetes",
    "jwt": "jwt",
    "aws_iam": "aws",
    "approle": "approle",
    "token": "token",
}


class MigrateError(Exception):
    """The Airflow settings name no backend the broker can take over."""


@dataclass
class Migration:
    """The broker config, the Airflow settings to switch to, and what the operator must still do."""

    config: dict[str, Any]
    airflow_settings: dict[str, str]
    notes: list[str] = field(default_factory=list)


def airflow_settings(cfg_path: Path | None, environ: Mapping[str, str]) -> dict[str, Any]:
    """The secrets settings Airflow would use: the file, then the environment over it."""
    parser = configparser.ConfigParser(interpolation=None)
    if cfg_path is not None:
        parser.read_string(cfg_path.read_text(encoding="utf-8"))

    def get(section: str, key: str) -> str:
        env = environ.get(f"AIRFLOW__{section.upper()}__{key.upper()}")
        if env is not None:
            return env
        return parser.get(section, key, fallback="") or ""

    out: dict[str, Any] = {"multi_team": get("core", "multi_team").strip().lower() in ("true", "1", "t")}
    for role, section, prefix in (("secrets", "secrets", ""), ("workers", "workers", "secrets_")):
        backend = get(section, f"{prefix}backend").strip()
        raw = get(section, f"{prefix}backend_kwargs").strip()
        try:
            kwargs = json.loads(raw) if raw else {}
        except ValueError:
            raise MigrateError(f"[{section}] {prefix}backend_kwargs is not JSON") from None
        if not isinstance(kwargs, dict):
            raise MigrateError(f"[{section}] {prefix}backend_kwargs must be a JSON object")
        if role == "secrets":  # Airflow's per-key overrides, always strings
            marker = "AIRFLOW__SECRETS__BACKEND_KWARG__"
            kwargs |= {k[len(marker) :].lower(): v for k, v in environ.items() if k.startswith(marker)}
        out[role] = (backend, kwargs)
    return out


def _backend(name: str, path: str, kwargs: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    if path not in PROVIDERS:
        raise MigrateError(f"{path!r} is not a provider backend broker migrate knows: {', '.join(sorted(PROVIDERS))}")
    kind, layout = PROVIDERS[path]
    out: dict[str, Any] = {"name": name, "type": kind}
    credentials = CREDENTIALS.get("aws" if kind.startswith("aws") else kind, {})
    rules = _provider_kwargs(kind)
    for key, value in kwargs.items():
        rule = rules.get(key)
        if key in layout:
            out[key] = value  # a deprecated one gets its warning when the written file is validated
        elif key in credentials:
            notes.append(f"{name}: {key} is a credential and is not copied; set up {credentials[key]}")
        elif kind == "vault" and key in ("auth_type", "auth_mount_point", "kubernetes_role", "kubernetes_jwt_path"):
            continue  # read below, into auth
        elif kind == "vault" and key in ("jwt_role", "jwt_token_path", "role_id_file", "secret_id_file"):
            continue
        elif isinstance(rule, Moves) and "." not in rule.to:
            out[rule.to] = value  # the provider's name for a broker key
        elif isinstance(rule, Ignored):
            notes.append(f"{notice(name, key, rule)}; not carried over")
        else:
            notes.append(f"{name}: {key} has no broker equivalent and is not carried over")
    if kind == "vault":
        out["auth"] = _vault_auth(name, kwargs, notes)
    if kind == "vault" and "url" not in out:
        notes.append(f"{name}: url was not in the kwargs (the provider falls back to VAULT_ADDR): set it")
        out["url"] = "https://vault.example:8200"
    if kind == "azure_key_vault" and "vault_url" not in out:
        notes.append(f"{name}: vault_url was not in the kwargs: set it")
        out["vault_url"] = "https://example.vault.azure.net"
    return out


def _provider_kwargs(kind: str) -> dict[str, ProviderKwarg]:
    """The config model's table of the provider's kwargs (empty for a type this build lacks)."""
    from broker.backends import load_type

    try:
        return dict(load_type(kind).config_model.provider_kwargs)
    except ImportError:
        return {}


def _vault_auth(name: str, kwargs: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    auth_type = str(kwargs.get("auth_type") or "token")
    method = VAULT_AUTH.get(auth_type)
    auth: dict[str, Any]
    if method is None:
        notes.append(
            f"{name}: auth_type {auth_type} has no broker equivalent; set up the pod's identity with "
            "auth.method kubernetes (auth.role)"
        )
        method = "kubernetes"
    if method == "kubernetes":
        auth = {"method": "kubernetes", "role": kwargs.get("kubernetes_role") or "airflow"}
        if "kubernetes_jwt_path" in kwargs:
            auth["token_path"] = kwargs["kubernetes_jwt_path"]
        if not kwargs.get("kubernetes_role"):
            notes.append(f"{name}: auth.role: the Vault Kubernetes auth role for the broker's service account")
    elif method == "jwt":
        auth = {"method": "jwt", "role": kwargs.get("jwt_role") or "airflow"}
        if kwargs.get("jwt_token_path"):
            auth["token_path"] = kwargs["jwt_token_path"]
    elif method == "aws":
        auth = {"method": "aws", "role": kwargs.get("role_id") or "airflow"}
    elif method == "approle":
        auth = {"method": "approle", "role_id_file": "/var/run/secrets/vault/role_id"}
        auth["secret_id_file"] = "/var/run/secrets/vault/secret_id"  # noqa: S105 - a path
        notes.append(
            f"{name}: put the AppRole role_id and secret_id in the files auth.role_id_file, auth.secret_id_file"
        )
    else:
        auth = {"method": "token", "token_file": kwargs.get("token_path") or "/var/run/secrets/vault/token"}
        notes.append(
            f"{name}: token auth reads auth.token_file; the pod's identity (auth.method kubernetes) needs no secret"
        )
    if kwargs.get("auth_mount_point"):
        auth["mount"] = kwargs["auth_mount_point"]
    return auth


def migrate(cfg_path: Path | None, environ: Mapping[str, str], socket_path: str = DEFAULT_SOCKET) -> Migration:
    """The equivalent broker config and Airflow settings. Raises MigrateError."""
    settings = airflow_settings(cfg_path, environ)
    secrets, workers = settings["secrets"], settings["workers"]
    if not secrets[0] and not workers[0]:
        raise MigrateError("no [secrets] backend or [workers] secrets_backend is configured")
    notes: list[str] = []
    chosen = [("secrets", secrets)] if secrets[0] else []
    if workers[0] and workers != secrets:
        chosen.append(("workers", workers))
        if secrets[0]:
            notes.append(
                "[secrets] and [workers] name different backends: both are in the chain, [secrets] first; "
                "the broker serves every Airflow process from one chain"
            )
    backends = [_backend(name, path, dict(kwargs), notes) for name, (path, kwargs) in chosen if path != CLIENT]
    if not backends:
        raise MigrateError(f"Airflow already uses {CLIENT}")
    config: dict[str, Any] = {"listen": {"socket": socket_path}, "backends": backends}
    if settings["multi_team"]:
        config["multi_team"] = True
    kwargs = json.dumps({"socket_path": socket_path})
    switch = {
        "AIRFLOW__SECRETS__BACKEND": CLIENT,
        "AIRFLOW__SECRETS__BACKEND_KWARGS": kwargs,
        "AIRFLOW__WORKERS__SECRETS_BACKEND": CLIENT,
        "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS": kwargs,
    }
    return Migration(config, switch, notes)
