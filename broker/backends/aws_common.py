"""What the AWS backends share: identity (boto3's default chain, optional assume-role), clients with
retries left to the core, the one error map, and prefix layouts with lookup patterns.

boto3 calls run in the bounded thread pool. Credentials refresh through botocore's refreshable
credentials, which hold a lock so concurrent calls share one refresh.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from broker.backends.base import (
    AccessDenied,
    Backend,
    BackendConfig,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BrokerError,
    Kind,
    RateLimited,
    SecretNotFound,
    layout_key,
)

THROTTLED = {
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "ThrottledException",
    "SlowDown",
}
DENIED = {
    "AccessDeniedException",
    "AccessDenied",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "ExpiredTokenException",
    "SignatureDoesNotMatch",
    "NotAuthorized",
}
NOT_FOUND = {"ResourceNotFoundException", "ParameterNotFound", "ParameterVersionNotFound"}
UNAVAILABLE = {
    "InternalServiceError",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
}


class AwsConfig(BackendConfig):
    region_name: str | None = None
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://")
    role_arn: str | None = Field(default=None, pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/.+")
    role_session_name: str = Field(default="airflow-broker", pattern=r"^[\w+=,.@-]{2,64}$")
    external_id: str | None = None
    connections_lookup_pattern: str | None = None
    variables_lookup_pattern: str | None = None
    config_lookup_pattern: str | None = None

    @field_validator("connections_lookup_pattern", "variables_lookup_pattern", "config_lookup_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


def map_client_error(exc: BaseException, backend: str, what: str) -> BrokerError:
    """The one place AWS failures become broker errors. Matches error codes, not HTTP status."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = f"aws {backend}: {what}: {code or status}"
        if code in NOT_FOUND:
            return SecretNotFound(message)
        if code in DENIED:
            return AccessDenied(message)
        if code in THROTTLED or status == 429:
            return RateLimited(message)
        if code in UNAVAILABLE or status >= 500:
            return BackendUnavailable(message)
        return BackendError(message)  # DecryptionFailure, InvalidRequestException, ...: never "not found"
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        return BackendTimeout(f"aws {backend}: {what}: timed out")
    if isinstance(exc, EndpointConnectionError):
        return BackendUnavailable(f"aws {backend}: {what}: endpoint unreachable")
    if isinstance(exc, NoCredentialsError):
        return AccessDenied(f"aws {backend}: {what}: no credentials in the default chain")
    name = type(exc).__name__
    if "Credential" in name or "Token" in name:
        return AccessDenied(f"aws {backend}: {what}: {name}")
    if isinstance(exc, ConnectionError | OSError):
        return BackendUnavailable(f"aws {backend}: {what}: {name}")
    return BackendError(f"aws {backend}: {what}: {name}")


class AwsBackend(Backend):
    """Session and client management for one AWS service."""

    service: str = ""
    config: AwsConfig

    def __init__(self, config: BackendConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        self._session: Any = None
        self._client: Any = None

    def allowed(self, kind: Kind, name: str) -> bool:
        """Airflow's lookup patterns: ids that do not match are never looked up (no AWS call)."""
        pattern = layout_key(self.config, kind, "lookup_pattern")
        return pattern is None or re.match(pattern, name, re.IGNORECASE) is not None

    def _build_session(self) -> Any:
        import boto3
        import botocore.session
        from botocore.credentials import RefreshableCredentials

        base = boto3.session.Session(region_name=self.config.region_name)
        if not self.config.role_arn:
            return base
        sts = base.client("sts", endpoint_url=self.config.endpoint_url, config=self._client_config())
        role_arn, session_name = self.config.role_arn, self.config.role_session_name
        external_id = self.config.external_id

        def refresh() -> dict[str, str]:
            kwargs: dict[str, Any] = {"RoleArn": role_arn, "RoleSessionName": session_name}
            if external_id:
                kwargs["ExternalId"] = external_id
            creds = sts.assume_role(**kwargs)["Credentials"]
            return {
                "access_key": creds["AccessKeyId"],
                "secret_key": creds["SecretAccessKey"],
                "token": creds["SessionToken"],
                "expiry_time": creds["Expiration"].isoformat(),
            }

        credentials = RefreshableCredentials.create_from_metadata(
            metadata=refresh(), refresh_using=refresh, method="sts-assume-role"
        )
        core = botocore.session.get_session()
        core._credentials = credentials  # type: ignore[attr-defined]  # botocore has no public setter for these
        if self.config.region_name:
            core.set_config_variable("region", self.config.region_name)
        return boto3.session.Session(botocore_session=core)

    def _client_config(self) -> Any:
        from botocore.config import Config

        return Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # the core retries, with its own budget
            connect_timeout=self.config.timeout,
            read_timeout=self.config.timeout,
            max_pool_connections=32,
            user_agent_extra="credential-broker",
        )

    def _make_client(self) -> Any:
        if self._client is None:
            self._session = self._build_session()
            self._client = self._session.client(
                self.service, endpoint_url=self.config.endpoint_url, config=self._client_config()
            )
        return self._client

    async def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        """One boto3 call in the thread pool. Raises the mapped broker error."""

        def run() -> Any:
            client = self._make_client()
            return getattr(client, method)(**kwargs)

        try:
            result = await self.ctx.run_blocking(run)
        except BrokerError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK failure is mapped in one place
            raise map_client_error(exc, self.name, what) from None
        self._credential_gauge()
        return result

    def _credential_gauge(self) -> None:
        credentials = self._session.get_credentials() if self._session is not None else None
        expiry = getattr(credentials, "_expiry_time", None)
        if expiry is None:
            self.ctx.metrics.identity_expiry.labels(self.name).set(-1)
            return
        self.ctx.metrics.identity_expiry.labels(self.name).set(expiry.timestamp() - self.ctx.clock.wall())

    async def start(self) -> None:
        await self.ctx.run_blocking(self._make_client)

    async def check(self) -> str:
        def identity() -> dict[str, Any]:
            self._make_client()
            sts = self._session.client("sts", endpoint_url=self.config.endpoint_url, config=self._client_config())
            result: dict[str, Any] = sts.get_caller_identity()
            return result

        try:
            me = await self.ctx.run_blocking(identity)
        except BrokerError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise map_client_error(exc, self.name, "GetCallerIdentity") from None
        self.ctx.metrics.logins.labels(self.name, "ok").inc()
        return f"aws arn={me.get('Arn')} account={me.get('Account')} region={self._session.region_name}"
