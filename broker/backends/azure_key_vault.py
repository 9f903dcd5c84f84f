"""``type: azure_key_vault``: Azure Key Vault in the layout of Airflow's ``AzureKeyVaultBackend``.

Secret names are ``{prefix}{sep}{id}`` (prefixes ``airflow-connections``, ``airflow-variables``, ``airflow-config``,
``sep="-"``; trailing ``sep`` stripped from a prefix; an empty prefix means the id alone; a null prefix turns the
kind off) with every ``_`` then replaced by ``sep``, so ``aws_default`` is read from
``airflow-connections-aws-default``. In multi-team mode a team reads ``{prefix}{sep}{team}--{id}`` (the same
replacement) first, then the global name, and an id whose name would contain ``--`` is not looked up. A name Key
Vault cannot hold (``[0-9A-Za-z-]{1,127}``) is not looked up.

Reads are ``GET {vault_url}/secrets/{name}?api-version=...``. The first request goes without a token and gets Key
Vault's 401 challenge, which names the tenant and the resource the token must be for; the resource must belong to
the vault's own domain (as the Azure SDK checks) unless ``verify_challenge_resource`` is false. Disabled secrets are
refused by Key Vault (403); expired or not-yet-valid secrets are still returned by a read (Key Vault does not
enforce ``exp``/``nbf`` on reads): served by default, refused with ``expired_secrets: refuse``.
"""

from __future__ import annotations

import logging
import re
from typing import Literal
from urllib.parse import quote, urlsplit

from pydantic import Field

from broker.backends import rest
from broker.backends.base import (
    TEAM_SEP,
    AccessDenied,
    BackendConfig,
    BackendContext,
    BackendError,
    BrokerError,
    Kind,
    RateLimitConfig,
    SecretValue,
    layout_key,
)
from broker.identity.azure import AzureTokenSource, CredentialKind
from broker.providerkw import Ignored, Moves, Replaced

log = logging.getLogger("broker.backend.azure")

SECRET_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_PARAM = re.compile(r'(\w+)="([^"]*)"')


class AzureConfig(BackendConfig):
    # microsoft-azure provider 15.2.1: AzureKeyVaultBackend kwargs that are not keys of ours.
    provider_kwargs = {
        "client_secret": Replaced(
            "a credential in the config; use credential: workload_identity (the default) with client_id and tenant_id"
        ),
        "managed_identity_client_id": Replaced("use credential: managed_identity with client_id"),
        "workload_identity_tenant_id": Moves("tenant_id"),
        # The provider hands any other kwarg to the SDK's SecretClient; these are its transport settings.
        "connection_verify": Replaced("use ca_cert: PATH (TLS is always verified)"),
        "logging_enable": Ignored("the broker logs its own requests (logging.level), never a secret"),
        **dict.fromkeys(
            ("retry_total", "retry_mode", "retry_backoff_factor", "retry_backoff_max", "retry_connect", "retry_read"),
            Ignored("the broker's retries and backoff apply (retries)"),
        ),
        **dict.fromkeys(("connection_timeout", "read_timeout"), Ignored("the broker's timeout applies (timeout)")),
        "user_agent": Ignored("the broker sends its own User-Agent"),
    }
    type: Literal["azure_key_vault"]
    vault_url: str = Field(pattern=r"^https://[^/\s?#]+/?$")
    credential: CredentialKind = "workload_identity"
    client_id: str | None = Field(default=None, min_length=1, max_length=64)
    tenant_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.-]{1,100}$")
    connections_prefix: str | None = "airflow-connections"
    variables_prefix: str | None = "airflow-variables"
    config_prefix: str | None = "airflow-config"
    sep: str = Field(default="-", max_length=8)
    api_version: str = Field(default="7.5", pattern=r"^[0-9][0-9.a-z-]{0,30}$")
    # Secret transactions are allowed 4,000 per 10 s per vault and region (400/s), shared by every client.
    rate_limit: RateLimitConfig | None = RateLimitConfig(per_second=100, burst=200)
    verify_challenge_resource: bool = True
    expired_secrets: Literal["serve", "refuse"] = "serve"


def parse_challenge(header: str) -> dict[str, str]:
    """The parameters of a ``Bearer`` challenge (``authorization``/``authorization_uri``, ``resource``, ``scope``)."""
    scheme, _, rest_ = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return {}
    return {key.lower(): value for key, value in _PARAM.findall(rest_)}


def error_code(data: dict[str, object]) -> str | None:
    """Key Vault's error code from an error body: the inner one when there is one (``SecretDisabled``,
    ``ForbiddenByRbac``), else the outer (``SecretNotFound``, ``Forbidden``); None when the body is not Key
    Vault's."""
    error = data.get("error")
    if not isinstance(error, dict):
        return None
    inner = error.get("innererror")
    code = inner.get("code") if isinstance(inner, dict) and inner.get("code") else error.get("code")
    return code if isinstance(code, str) and re.fullmatch(r"[A-Za-z]{1,60}", code) else None


def error_for(status: int, code: str | None, what: str, retry_after: str | None = None) -> BrokerError:
    """Key Vault's error answer to a read as a broker error (the table in docs/azure.md).

    404 is "not found" only with Key Vault's ``SecretNotFound`` code; a disabled secret (403 ``SecretDisabled``)
    is denied; the rest follows the shared HTTP table (``rest.error_for``).
    """
    if status == 403 and code == "SecretDisabled":
        return AccessDenied(f"{what}: HTTP 403 secret is disabled")
    message = rest.status_message(what, status, code)
    return rest.error_for(status, message, retry_after, store_says_missing=code == "SecretNotFound")


class Backend(rest.RestBackend):
    config_model = AzureConfig
    config: AzureConfig
    identity: AzureTokenSource

    def __init__(self, config: BackendConfig, ctx: BackendContext) -> None:
        assert isinstance(config, AzureConfig)
        super().__init__(config, ctx, config.vault_url)
        self._host = (urlsplit(self._base).hostname or "").lower()
        self.identity = AzureTokenSource(
            self.name,
            ctx,
            credential=self.config.credential,
            client_id=self.config.client_id,
            tenant_id=self.config.tenant_id,
        )

    # ------------------------------------------------------------------------------------------ layout

    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        prefix = layout_key(self.config, kind, "prefix")
        if prefix is None:
            return []
        sep = self.config.sep
        if multi_team and TEAM_SEP in name.replace("_", sep):
            return []  # the name built from this id could be another team's secret
        prefix = prefix.rstrip(sep) if prefix else prefix
        ids = [f"{team}{TEAM_SEP}{name}"] if team and kind is not Kind.CONFIG else []
        ids.append(name)
        paths = [(f"{prefix}{sep}{one}" if prefix else one).replace("_", sep) for one in ids]
        return [path for path in paths if SECRET_NAME.fullmatch(path)]

    # ------------------------------------------------------------------------------------------ challenge

    def _accept_challenge(self, header: str | None, what: str) -> None:
        """Take the tenant and scope from a 401 challenge; refuse a resource outside the vault's domain."""
        params = parse_challenge(header or "")
        authority = params.get("authorization") or params.get("authorization_uri")
        scope = params.get("scope")
        resource = params.get("resource")
        if not scope and resource:
            scope = resource.rstrip("/") + "/.default"
        if not authority or not scope:
            raise BackendError(f"{what}: HTTP 401 without a usable Bearer challenge")
        if self.config.verify_challenge_resource:
            resource_host = (urlsplit(scope).hostname or "").lower()
            if not resource_host or not (self._host == resource_host or self._host.endswith("." + resource_host)):
                raise AccessDenied(
                    f"{what}: challenge asks for a token for {resource_host!r}, outside the vault's domain "
                    f"{self._host!r} (set verify_challenge_resource: false only for a private endpoint)"
                )
        tenant = urlsplit(authority).path.strip("/").split("/", 1)[0] or None
        self.identity.set_challenge(scope, tenant)

    async def _challenge(self, what: str) -> None:
        """An unauthenticated request, answered with the challenge (the vault's secrets list, never read)."""
        answer = await rest.get(self._http(), f"{self._base}/secrets?api-version={self.config.api_version}", {}, what)
        if answer.status != 401:
            # The vault's own secrets list: a 404 there means a wrong vault_url, never a missing secret.
            rest.raise_for_status(answer, what, error_code(answer.data))
            raise BackendError(f"{what}: Key Vault answered an unauthenticated request with HTTP {answer.status}")
        self._accept_challenge(answer.www_authenticate, what)

    async def _on_unauthorized(self, answer: rest.Answer, what: str, token: str) -> bool:
        self._accept_challenge(answer.www_authenticate, what)  # the vault may have moved tenant or resource
        return True

    # ------------------------------------------------------------------------------------------ reads

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        """Get Secret (latest version), one attempt; a 401 renews the challenge and token once.

        Raises SecretNotFound, AccessDenied (incl. disabled secrets), RateLimited, BackendUnavailable, BackendError.
        """
        what = f"azure {self.name}: {path}"
        url = f"{self._base}/secrets/{quote(path, safe='')}?api-version={self.config.api_version}"
        if self.identity.scope is None:
            await self._challenge(what)
        answer = await self.authorized_get(url, what)
        if answer.status >= 400:
            raise error_for(answer.status, error_code(answer.data), what, answer.retry_after)
        return self._decode(answer.data, what)

    def _decode(self, data: dict[str, object], what: str) -> SecretValue:
        value = data.get("value")
        if not isinstance(value, str):
            raise BackendError(f"{what}: answer has no secret value")
        attributes = data.get("attributes")
        if isinstance(attributes, dict):
            now = self.ctx.clock.wall()
            expires, not_before = attributes.get("exp"), attributes.get("nbf")
            outside = (isinstance(expires, int | float) and expires <= now) or (
                isinstance(not_before, int | float) and not_before > now
            )
            if outside:
                if self.config.expired_secrets == "refuse":
                    raise AccessDenied(f"{what}: secret is expired or not yet valid (exp/nbf)")
                log.warning("serving a secret outside its exp/nbf window", extra={"backend": self.name, "path": what})
        secret_id = data.get("id")
        version = secret_id.rstrip("/").rsplit("/", 1)[-1] if isinstance(secret_id, str) else None
        return SecretValue(value, version=version)

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.identity.scope is None:
            await self._challenge(f"azure {self.name}: challenge")
        await self.identity.start()

    async def check(self) -> str:
        if self.identity.scope is None:
            await self._challenge(f"azure {self.name}: challenge")
        await self.identity.token()
        return f"azure vault={self._base} {self.identity.describe()}"
