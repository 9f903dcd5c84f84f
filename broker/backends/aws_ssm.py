"""``type: aws_ssm``: SSM Parameter Store in the layout of Airflow's ``SystemsManagerParameterStoreBackend``.

``/airflow/connections/{id}`` etc.: trailing slashes are stripped from a prefix, the name is ``{prefix}/{id}`` and
gets a leading slash when it lacks one; a null prefix turns the kind off and ``*_lookup_pattern`` (``re.match``,
case-insensitive) limits which ids are looked up at all. In multi-team mode a team reads ``{prefix}/{team}--{id}``
first, then the global name; an id with ``--`` is not looked up. ``GetParameter(WithDecryption=True)`` so
SecureString values arrive decrypted; values are served as stored (a connection as a URI or JSON).
"""

from __future__ import annotations

from typing import Literal

from broker.backends.aws_common import AwsBackend, AwsConfig
from broker.backends.base import (
    TEAM_SEP,
    BackendError,
    BackendUnavailable,
    Kind,
    RateLimitConfig,
    SecretValue,
)


class SsmConfig(AwsConfig):
    type: Literal["aws_ssm"]
    connections_prefix: str | None = "/airflow/connections"
    variables_prefix: str | None = "/airflow/variables"
    config_prefix: str | None = "/airflow/config"
    # Parameter Store's standard throughput is 40 requests/s per account and region, shared by
    # GetParameter, GetParameters and GetParametersByPath: half of it, leaving room for other callers.
    rate_limit: RateLimitConfig | None = RateLimitConfig(per_second=20, burst=40)


class Backend(AwsBackend):
    config_model = SsmConfig
    config: SsmConfig
    service = "ssm"

    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        prefix = self.served_prefix(kind, name, multi_team)
        if prefix is None:
            return []
        prefix = prefix.rstrip("/")
        ids = [f"{team}{TEAM_SEP}{name}"] if team and kind is not Kind.CONFIG else []
        ids.append(name)
        return [path if (path := f"{prefix}/{one}").startswith("/") else f"/{path}" for one in ids]

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        """GetParameter with decryption, one attempt; ``version`` is the parameter's version number.

        Raises SecretNotFound, AccessDenied, RateLimited, BackendUnavailable, BackendTimeout, BackendError.
        """
        response = await self._call(f"GetParameter {path}", "get_parameter", Name=path, WithDecryption=True)
        if not isinstance(response.get("Parameter"), dict):
            # botocore turns an unreadable body (cut in transit) into {"message": ...}: retry it
            raise BackendUnavailable(f"aws {self.name}: {path}: answer unreadable (no Parameter)")
        parameter = response["Parameter"]
        value = parameter.get("Value")
        if not isinstance(value, str):
            raise BackendError(f"aws {self.name}: {path}: parameter has no value")
        version = parameter.get("Version")
        return SecretValue(value, version=str(version) if version is not None else None)
