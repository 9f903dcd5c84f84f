"""``type: gcp_secret_manager``: Google Secret Manager in the layout of Airflow's ``CloudSecretManagerBackend``.

Secret ids are ``{prefix}{sep}{id}`` with prefixes ``airflow-connections``, ``airflow-variables``,
``airflow-config`` and ``sep="-"``; a null prefix turns the kind off. Prefix plus separator must be made of
``[A-Za-z0-9_-]`` (Airflow refuses others at start-up); an id that cannot form a valid secret id is not looked up
here (Airflow's client gets INVALID_ARGUMENT and returns nothing: same outcome, no call). In multi-team mode a team
reads ``{prefix}{sep}{team}--{id}`` (the id verbatim) first, then the global name, and a connection or variable id
with ``--`` is not looked up.

Each read is ``GET /v1/projects/{project}/secrets/{id}/versions/{version}:access`` with a bearer token from the
pod's identity (``broker.identity.gcp``); the payload's CRC32C is verified, a mismatch is a backend error.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from broker.backends import rest
from broker.backends.base import (
    TEAM_SEP,
    BackendConfig,
    BackendContext,
    BackendError,
    BrokerError,
    Kind,
    RateLimitConfig,
    SecretValue,
    layout_key,
)
from broker.configtypes import StrictModel
from broker.identity.gcp import GoogleTokenSource
from broker.providerkw import Ignored, Moves, Replaced

log = logging.getLogger("broker.backend.gcp")

SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
PREFIX_CHARS = re.compile(r"[A-Za-z0-9_-]*")
PROVIDER_AUDIENCE = (
    r"^//iam\.googleapis\.com/projects/[0-9]+/locations/global/workloadIdentityPools/[^/]+/providers/[^/]+$"
)


class GcpFederation(StrictModel):
    """Node mode: workload identity federation with the calling pod's token (STS exchange, then optionally
    impersonating a service account). The pool's OIDC provider must trust the cluster's issuer and allow the
    broker's audience (``node.audience``); its attribute mapping and conditions decide who the pod is."""

    audience: str = Field(pattern=PROVIDER_AUDIENCE)
    service_account: str | None = Field(default=None, pattern=r"^[^@\s]+@[a-z0-9.-]+\.iam\.gserviceaccount\.com$")
    token_url: str = Field(default="https://sts.googleapis.com/v1/token", pattern=r"^https?://[^/\s?#]+/\S*$")
    iam_endpoint: str = Field(default="https://iamcredentials.googleapis.com", pattern=r"^https?://[^/\s?#]+/?$")


_GCP_IDENTITY = (
    "use the pod's identity (GKE Workload Identity, Application Default Credentials) or "
    "credentials_file (a workload identity federation file)"
)


class GcpConfig(BackendConfig):
    # google provider: CloudSecretManagerBackend kwargs that are not keys of ours.
    provider_kwargs = {
        "gcp_key_path": Replaced(f"a service-account key in the config; {_GCP_IDENTITY}"),
        "gcp_keyfile_dict": Replaced(f"a service-account key in the config; {_GCP_IDENTITY}"),
        "gcp_credential_config_file": Moves("credentials_file"),
        "impersonation_chain": Replaced("impersonation is not done; grant the pod's own service account access"),
        "gcp_scopes": Ignored("the broker asks for the cloud-platform scope, which Secret Manager needs"),
    }
    type: Literal["gcp_secret_manager"]
    # A project id, a domain-scoped one (example.com:my-project), or a project number.
    project_id: str | None = Field(
        default=None, pattern=r"^([a-z0-9][a-z0-9.-]{0,62}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$|^\d{1,20}$"
    )
    credentials_file: Path | None = None
    federation: GcpFederation | None = None  # node mode only
    endpoint_url: str = Field(default="https://secretmanager.googleapis.com", pattern=r"^https?://[^/\s?#]+/?$")
    sep: str = Field(default="-", max_length=8)  # before the prefixes: their validator reads it
    connections_prefix: str | None = "airflow-connections"
    variables_prefix: str | None = "airflow-variables"
    config_prefix: str | None = "airflow-config"
    version: str = Field(default="latest", pattern=r"^(latest|[1-9][0-9]{0,18})$")
    # Access requests are allowed 90,000 per minute per project (1,500/s), shared by every client.
    rate_limit: RateLimitConfig | None = RateLimitConfig(per_second=250, burst=500)

    @field_validator("connections_prefix")
    @classmethod
    def _secret_id_chars(cls, prefix: str | None, info: ValidationInfo) -> str | None:
        # As the provider, which refuses to start on this prefix only: a variables or config prefix that cannot
        # form a secret id is accepted, and nothing of that kind is ever looked up (its ids are all invalid).
        sep = info.data.get("sep", "-")
        if prefix is not None and not PREFIX_CHARS.fullmatch(prefix + sep):
            raise ValueError("with sep, must use only letters, digits, '-' and '_' (Secret Manager secret ids)")
        return prefix

    @model_validator(mode="after")
    def _unusable_prefixes(self) -> GcpConfig:
        for kind in ("variables", "config"):
            prefix = getattr(self, f"{kind}_prefix")
            if prefix is not None and not PREFIX_CHARS.fullmatch(prefix + self.sep):
                log.warning(
                    "prefix cannot form a Secret Manager secret id: nothing of this kind is looked up here",
                    extra={"backend": self.name, "key": f"{kind}_prefix"},
                )
        return self


def error_code(data: dict[str, object]) -> str | None:
    """The canonical status name of a Google API error body (``error.status``, e.g. ``NOT_FOUND``), or None."""
    error = data.get("error")
    status = error.get("status") if isinstance(error, dict) else None
    return status if isinstance(status, str) and status.isupper() and len(status) < 40 else None


def error_for(status: int, code: str | None, what: str, retry_after: str | None = None) -> BrokerError:
    """Secret Manager's error answer to an access call as a broker error (the table in docs/gcp.md).

    404 is "not found" only with Google's ``NOT_FOUND`` body; ``FAILED_PRECONDITION`` (the version read is
    disabled or destroyed) is a backend error; the rest follows the shared HTTP table (``rest.error_for``).
    """
    message = rest.status_message(what, status, code)
    if code == "FAILED_PRECONDITION":
        return BackendError(f"{message} (the version read is disabled or destroyed)")
    return rest.error_for(status, message, retry_after, store_says_missing=code == "NOT_FOUND")


class Backend(rest.RestBackend):
    config_model = GcpConfig
    config: GcpConfig
    identity: GoogleTokenSource

    def __init__(self, config: BackendConfig, ctx: BackendContext) -> None:
        assert isinstance(config, GcpConfig)
        super().__init__(config, ctx, config.endpoint_url)
        self.identity = GoogleTokenSource(
            self.name,
            ctx,
            credentials_file=self.config.credentials_file,
            project_id=self.config.project_id,
            timeout=self.config.timeout,
            federation=self.config.federation,
        )

    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        prefix = layout_key(self.config, kind, "prefix")
        if prefix is None:
            return []
        if kind is Kind.CONFIG:
            team = None  # the provider reads config with no team and never refuses a config id
        elif multi_team and TEAM_SEP in name:
            return []  # an id with "--" could name another team's secret
        sep = self.config.sep
        ids = [f"{prefix}{sep}{team}{TEAM_SEP}{name}"] if team else []
        ids.append(f"{prefix}{sep}{name}")
        return [secret_id for secret_id in ids if SECRET_ID.fullmatch(secret_id)]

    def _project(self) -> str:
        project = self.config.project_id or self.identity.project_id
        if not project:
            raise BackendError(
                f"gcp {self.name}: project_id is not set and the credentials name no project (metadata server)"
            )
        return project

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        """AccessSecretVersion, one attempt (a 401 gets one fresh token). ``version`` is the version number.

        Raises SecretNotFound, AccessDenied, RateLimited, BackendUnavailable, BackendError (CRC32C mismatch,
        malformed payload, version disabled or destroyed).
        """
        await self.identity.token()  # the first token also names the project when the config does not
        what = f"gcp {self.name}: {path}"
        url = f"{self._base}/v1/projects/{self._project()}/secrets/{path}/versions/{self.config.version}:access"
        answer = await self.authorized_get(url, what)
        if answer.status >= 400:
            raise error_for(answer.status, error_code(answer.data), what, answer.retry_after)
        return self._decode(answer.data, what)

    @staticmethod
    def _decode(data: dict[str, object], what: str) -> SecretValue:
        import google_crc32c

        payload = data.get("payload")
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), str):
            raise BackendError(f"{what}: answer has no payload data")
        try:
            raw = base64.b64decode(payload["data"], validate=True)
        except (binascii.Error, ValueError):
            raise BackendError(f"{what}: payload is not valid base64") from None
        expected = payload.get("dataCrc32c")
        if expected is not None:
            try:
                expected_int = int(str(expected))
            except ValueError:
                raise BackendError(f"{what}: dataCrc32c is not an integer") from None
            if google_crc32c.value(raw) != expected_int:
                raise BackendError(f"{what}: payload CRC32C mismatch (corrupted in transit)")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BackendError(f"{what}: payload is not UTF-8 text") from None
        name = data.get("name")
        version = name.rsplit("/", 1)[-1] if isinstance(name, str) and "/versions/" in name else None
        return SecretValue(value, version=version)

    async def start(self) -> None:
        await self.identity.start()
        self._project()

    async def check(self) -> str:
        await self.identity.token()
        return f"gcp project={self._project()} {self.identity.describe()}"
