"""``type: aws_secrets_manager``: AWS Secrets Manager in the layout of Airflow's ``SecretsManagerBackend``.

``{prefix}{sep}{id}`` with prefixes ``airflow/connections|variables|config`` and ``sep="/"`` (a trailing
``sep`` on a prefix is dropped, as Airflow does); ``*_lookup_pattern`` limit which ids are looked up at all.
Connection secrets may be a URI or JSON; JSON keys are standardised like Airflow's (``user`` to ``login``...).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from broker.backends.aws_common import AwsBackend, AwsConfig
from broker.backends.base import BackendError, Kind, SecretValue, layout_key

CONN_WORDS: dict[str, list[str]] = {
    "conn_type": ["conn_type", "conn_id", "connection_type", "engine"],
    "host": ["host", "remote_host", "server"],
    "login": ["login", "user", "username", "user_name"],
    "password": ["password", "pass", "key"],
    "schema": ["schema", "database", "db"],
    "port": ["port"],
    "extra": ["extra"],
}


class SecretsManagerConfig(AwsConfig):
    type: Literal["aws_secrets_manager"]
    connections_prefix: str | None = "airflow/connections"
    variables_prefix: str | None = "airflow/variables"
    config_prefix: str | None = "airflow/config"
    sep: str = Field(default="/", min_length=0, max_length=8)
    extra_conn_words: dict[str, list[str]] | None = None
    version_stage: str | None = None
    version_id: str | None = None

    @model_validator(mode="after")
    def _one_version(self) -> SecretsManagerConfig:
        if self.version_stage and self.version_id:
            raise ValueError("set version_stage or version_id, not both")
        return self


def standardise(secret: dict[str, Any], extra_words: dict[str, list[str]] | None) -> dict[str, Any]:
    """Map the alternative key names Airflow's Secrets Manager backend accepts onto connection fields."""
    words = {k: list(v) for k, v in CONN_WORDS.items()}
    for field, more in (extra_words or {}).items():
        words.setdefault(field, []).extend(more)
    out: dict[str, Any] = {}
    for field, candidates in words.items():
        for candidate in candidates:
            if candidate in secret and secret[candidate] is not None:
                out[field] = secret[candidate]
                break
    if "description" in secret:
        out["description"] = secret["description"]
    return out


class Backend(AwsBackend):
    config_model = SecretsManagerConfig
    config: SecretsManagerConfig
    service = "secretsmanager"

    def locate(self, kind: Kind, name: str) -> str | None:
        prefix = layout_key(self.config, kind, "prefix")
        if prefix is None or not self.allowed(kind, name):
            return None
        sep = self.config.sep
        return f"{prefix.rstrip(sep) if sep else prefix}{sep}{name}"

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        kwargs: dict[str, Any] = {"SecretId": path}
        if self.config.version_stage:
            kwargs["VersionStage"] = self.config.version_stage
        if self.config.version_id:
            kwargs["VersionId"] = self.config.version_id
        response = await self._call(f"GetSecretValue {path}", "get_secret_value", **kwargs)
        value = response.get("SecretString")
        if value is None and response.get("SecretBinary") is not None:
            try:
                value = bytes(response["SecretBinary"]).decode("utf-8")
            except UnicodeDecodeError:
                raise BackendError(f"aws {self.name}: {path}: binary secret is not UTF-8 text") from None
        if value is None:
            raise BackendError(f"aws {self.name}: {path}: secret has no value")
        version = response.get("VersionId")
        if kind is Kind.CONNECTION and value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except ValueError:
                raise BackendError(f"aws {self.name}: {path}: connection JSON is invalid") from None
            if isinstance(parsed, dict):
                return SecretValue(standardise(parsed, self.config.extra_conn_words), version=version)
        return SecretValue(value, version=version)
