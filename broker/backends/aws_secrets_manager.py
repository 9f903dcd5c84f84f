"""``type: aws_secrets_manager``: AWS Secrets Manager in the layout of Airflow's ``SecretsManagerBackend``.

``{prefix}{sep}{id}`` with prefixes ``airflow/connections|variables|config`` and ``sep="/"``: trailing ``sep``
characters are stripped from a prefix, an empty prefix means the bare id, a null prefix turns the kind off, and
``*_lookup_pattern`` (``re.match``, case-insensitive) limits which ids are looked up at all. Connection secrets may
be a URI or JSON; JSON keys are standardised as Airflow does (``user`` to ``login``, ``database`` to ``schema``,
...). In multi-team mode a team reads ``{prefix}{sep}{team}--{id}`` first, then the global name, and an id with
``--`` is not looked up (it could name another team's secret). ``version_stage`` / ``version_id`` pick a version
other than ``AWSCURRENT``; binary secrets are served as UTF-8 text.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from broker.backends.aws_common import AWS_PROVIDER_KWARGS, AwsBackend, AwsConfig
from broker.backends.base import (
    TEAM_SEP,
    BackendError,
    BackendUnavailable,
    Kind,
    RateLimitConfig,
    SecretValue,
)
from broker.providerkw import Ignored

# Airflow's SecretsManagerBackend accepts these key names for each connection field.
CONN_WORDS: dict[str, tuple[str, ...]] = {
    "login": ("login", "user", "username", "user_name"),
    "password": ("password", "pass", "key"),
    "host": ("host", "remote_host", "server"),
    "port": ("port",),
    "schema": ("database", "schema"),
    "conn_type": ("conn_type", "conn_id", "connection_type", "engine"),
    "extra": ("extra",),
}
EXTRA_WORD_FIELDS = frozenset({*CONN_WORDS, "user"})  # "user" means "login", as Airflow keeps it


class SecretsManagerConfig(AwsConfig):
    provider_kwargs = {
        **AWS_PROVIDER_KWARGS,
        "full_url_mode": Ignored(
            "removed from the provider; a connection secret is read as a URI or as JSON, whichever it holds"
        ),
        "are_secret_values_urlencoded": Ignored(
            "removed from the provider; values are served as stored, never URL-decoded"
        ),
    }
    type: Literal["aws_secrets_manager"]
    connections_prefix: str | None = "airflow/connections"
    variables_prefix: str | None = "airflow/variables"
    config_prefix: str | None = "airflow/config"
    sep: str = Field(default="/", max_length=8)
    # GetSecretValue is allowed 10,000 requests/s per account and region (shared with DescribeSecret).
    rate_limit: RateLimitConfig | None = RateLimitConfig(per_second=500, burst=1000)
    extra_conn_words: dict[str, list[str]] | None = None
    version_stage: str | None = Field(default=None, min_length=1, max_length=256)
    version_id: str | None = Field(default=None, min_length=32, max_length=64)

    @field_validator("extra_conn_words")
    @classmethod
    def _fields(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        unknown = sorted(set(value or {}) - EXTRA_WORD_FIELDS)
        if unknown:
            raise ValueError(f"unknown connection field(s) {', '.join(unknown)}; use {', '.join(sorted(CONN_WORDS))}")
        return value

    @model_validator(mode="after")
    def _one_version(self) -> SecretsManagerConfig:
        if self.version_stage and self.version_id:
            raise ValueError("set version_stage or version_id, not both")
        return self


def standardise(secret: dict[str, Any], extra_words: dict[str, list[str]] | None) -> dict[str, Any]:
    """Airflow's key standardisation for JSON connection secrets.

    Each field takes the value of the first key of the secret (in the secret's own order) that is one of
    the field's words; other keys (``description`` included) are dropped, as Airflow drops them.
    """
    words = {field: list(candidates) for field, candidates in CONN_WORDS.items()}
    for field, more in (extra_words or {}).items():
        words["login" if field == "user" else field].extend(more)
    return {field: next((v for k, v in secret.items() if k in candidates), None) for field, candidates in words.items()}


class Backend(AwsBackend):
    config_model = SecretsManagerConfig
    config: SecretsManagerConfig
    service = "secretsmanager"

    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        prefix = self.served_prefix(kind, name, multi_team)
        if prefix is None:
            return []
        sep = self.config.sep
        # Airflow strips trailing separators from a non-empty prefix, and an empty prefix means the id alone.
        prefix = prefix.rstrip(sep) if prefix else prefix
        out = []
        if prefix and team and kind is not Kind.CONFIG:
            out.append(f"{prefix}{sep}{team}{TEAM_SEP}{name}")  # the team's own secret first
        out.append(f"{prefix}{sep}{name}" if prefix else name)
        return out

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        """GetSecretValue, one attempt; ``version`` is the VersionId.

        Raises SecretNotFound, AccessDenied, RateLimited, BackendUnavailable, BackendTimeout, BackendError
        (a binary secret that is not UTF-8, invalid connection JSON, KMS DecryptionFailure).
        """
        kwargs: dict[str, Any] = {"SecretId": path}
        if self.config.version_stage:
            kwargs["VersionStage"] = self.config.version_stage
        if self.config.version_id:
            kwargs["VersionId"] = self.config.version_id
        response = await self._call(f"GetSecretValue {path}", "get_secret_value", **kwargs)
        if "ARN" not in response and "Name" not in response:
            # botocore turns an unreadable body (cut in transit) into {"message": ...}: retry it
            raise BackendUnavailable(f"aws {self.name}: {path}: answer unreadable (no ARN)")
        value = response.get("SecretString")
        if value is None and response.get("SecretBinary") is not None:
            try:
                value = bytes(response["SecretBinary"]).decode("utf-8")
            except UnicodeDecodeError:
                raise BackendError(f"aws {self.name}: {path}: binary secret is not UTF-8 text") from None
        if value is None:
            raise BackendError(f"aws {self.name}: {path}: secret has no value")
        if not isinstance(value, str):  # botocore passes a mistyped field through as it came
            raise BackendError(f"aws {self.name}: {path}: SecretString is not a string")
        version = response.get("VersionId")
        if kind is Kind.CONNECTION and value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except ValueError:
                raise BackendError(f"aws {self.name}: {path}: connection JSON is invalid") from None
            if isinstance(parsed, dict):
                return SecretValue(standardise(parsed, self.config.extra_conn_words), version=version)
        return SecretValue(value, version=version)
