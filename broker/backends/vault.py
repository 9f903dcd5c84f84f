"""``type: vault``: HashiCorp Vault and OpenBao over their HTTP API, through the one HTTP layer (``rest``).

Layout exactly as Airflow's ``VaultBackend``: ``{mount_point}/{connections_path}/{conn_id}`` on KV v1 or v2, each
path a string or a list tried in order, ``mount_point: null`` taking the mount from the first segment of the id,
team-scoped ``{path}/{team}/{id}`` under ``use_team_secrets_path`` in multi-team mode; connection data as
``conn_uri`` or the separate fields; variables and config from key ``value``. ``dynamic_connections`` turn a leased
secret (e.g. ``database/creds/airflow``) into an Airflow connection through a small field template.

This module builds Vault's requests and parses its answers; the token (login with the pod's identity, renewal,
a fresh login when it is refused) is ``broker.identity.vault``'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator

from broker.backends import rest
from broker.backends.base import (
    BackendConfig,
    BackendContext,
    BackendError,
    BackendUnavailable,
    BrokerError,
    Kind,
    Lease,
    SecretNotFound,
    SecretValue,
    layout_key,
)
from broker.configtypes import Duration, StrictModel
from broker.identity.vault import AuthConfig, VaultTokenSource, seconds
from broker.providerkw import Deprecated, Moves, ProviderKwarg, Replaced

_POD_LOGIN = "log in with the pod's identity: auth.method kubernetes, jwt or aws (docs/vault.md)"
_OTHER_METHOD = f"the provider's {{}} auth method is not supported; {_POD_LOGIN}"
# hashicorp provider 4.8.4, VaultBackend and _VaultClient keyword arguments that are not keys of ours.
PROVIDER_KWARGS: dict[str, ProviderKwarg] = {
    "auth_type": Moves("auth.method", {"aws_iam": "aws"}),
    "auth_mount_point": Moves("auth.mount"),
    "kubernetes_role": Moves("auth.role"),
    "kubernetes_jwt_path": Moves("auth.token_path"),
    "jwt_role": Moves("auth.role"),
    "jwt_token_path": Moves("auth.token_path"),
    "region": Moves("auth.aws_region"),
    "token": Replaced(f"a token in the config; {_POD_LOGIN}, or auth.method token with auth.token_file"),
    "token_path": Replaced(f"use auth.method token with auth.token_file, or better {_POD_LOGIN}"),
    "jwt_token": Replaced("a token in the config; use auth.token_path (a projected service-account token file)"),
    "role_id": Replaced(f"use auth.role_id_file (auth.method approle), or better {_POD_LOGIN}"),
    "secret_id": Replaced(f"use auth.secret_id_file (auth.method approle), or better {_POD_LOGIN}"),
    "username": Replaced(_OTHER_METHOD.format("ldap/userpass")),
    "password": Replaced(_OTHER_METHOD.format("ldap/userpass")),
    "key_id": Replaced("auth.method aws signs sts:GetCallerIdentity with the pod's AWS identity (IRSA, Pod Identity)"),
    "assume_role_kwargs": Replaced("auth.method aws uses the pod's AWS identity (IRSA, EKS Pod Identity) as is"),
    "gcp_key_path": Replaced(_OTHER_METHOD.format("gcp")),
    "gcp_keyfile_dict": Replaced(_OTHER_METHOD.format("gcp")),
    "gcp_scopes": Replaced(_OTHER_METHOD.format("gcp")),
    "azure_tenant_id": Replaced(_OTHER_METHOD.format("azure")),
    "azure_resource": Replaced(_OTHER_METHOD.format("azure")),
    "radius_host": Replaced(_OTHER_METHOD.format("radius")),
    "radius_secret": Replaced(_OTHER_METHOD.format("radius")),
    "radius_port": Replaced(_OTHER_METHOD.format("radius")),
    "verify": Replaced("TLS is always verified; set ca_cert to trust a private CA"),
    "cert": Replaced("client certificates are not used; " + _POD_LOGIN),
    "global_secrets_path": Deprecated("kept, as the provider keeps it: list the fallback paths in *_path instead"),
}
DYNAMIC_PREFIX = "dynamic:"
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
# Vault's status map: the shared one, and 412 (Enterprise: this node has not caught up yet) worth a retry.
STATUS_ERRORS: Mapping[int, type[BrokerError]] = {**rest.STATUS_ERRORS, 412: BackendUnavailable}


def vault_says_missing(data: dict[str, Any]) -> bool:
    """Whether an error answer's body is Vault's own (``errors``, or a KV v2 deleted version's ``data``): only then
    is a 404 "not found" (a proxy's or a load balancer's 404 page is a backend error)."""
    return isinstance(data.get("errors"), list) or isinstance(data.get("data"), dict)


def raise_for_status(answer: rest.Answer, what: str) -> None:
    """Raise the error Vault's status map gives an error answer, a 404 being "not found" only in Vault's own
    words (``vault_says_missing``); nothing for a success."""
    rest.raise_for_status(answer, what, table=STATUS_ERRORS, store_says_missing=vault_says_missing(answer.data))


class DynamicConnection(StrictModel):
    path: str = Field(min_length=1)
    fields: dict[str, Any] = {}

    @field_validator("fields")
    @classmethod
    def _connection_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed = {"conn_type", "host", "login", "password", "schema", "port", "extra", "description"}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"unknown connection field(s): {', '.join(unknown)}")
        return value


class VaultConfig(BackendConfig):
    provider_kwargs = PROVIDER_KWARGS
    type: Literal["vault"]
    url: str = Field(pattern=r"^https?://[^/\s]+/?$")
    namespace: str | None = None
    auth: AuthConfig
    # null (or ""): as the provider reads it, the mount is the first segment of each id (``secret/db``).
    mount_point: str | None = "secret"
    kv_engine_version: Literal[1, 2] = 2
    # One path or a list tried in order (the first found wins); null or [] turns the kind off.
    connections_path: str | list[str] | None = "connections"
    variables_path: str | list[str] | None = "variables"
    config_path: str | list[str] | None = "config"
    global_secrets_path: str | None = None  # deprecated by the provider: a last entry of every path list
    use_team_secrets_path: bool = True  # multi-team: a team reads {path}/{team}/{id} instead of {path}/{id}
    dynamic_connections: dict[str, DynamicConnection] = {}
    token_renew_at: float = Field(default=2 / 3, gt=0.1, lt=0.95)
    token_min_ttl: Duration = Field(default=10.0, ge=0)


def render(fields: dict[str, Any], data: dict[str, Any], where: str) -> dict[str, Any]:
    """Fill ``{{ key }}`` placeholders from a dynamic secret's data (plain substitution, nothing evaluated).

    Raises BackendError naming the missing key (never a value).
    """

    def fill(value: Any) -> Any:
        if isinstance(value, str):

            def one(match: re.Match[str]) -> str:
                key = match.group(1)
                if key not in data:
                    raise BackendError(f"{where}: the secret has no key {key!r} for the connection template")
                return str(data[key])

            return _TEMPLATE.sub(one, value)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    return {key: fill(value) for key, value in fields.items()}


def parse_kv(kind: Kind, engine: int, data: dict[str, Any], what: str) -> SecretValue:
    """A KV v1 or v2 read answer as the kind's value (a connection's fields or ``conn_uri``; ``value`` for the
    others, JSON-encoded when it is not a string) with the v2 version number.

    Raises SecretNotFound only for Vault's own word (a v2 current version deleted or destroyed), BackendError for
    any other answer without the data the kind needs.
    """
    payload = data.get("data")
    version = None
    if engine == 2:
        if not isinstance(payload, dict):
            raise BackendError(f"{what}: unexpected KV v2 answer")
        meta = payload.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        number = meta.get("version")
        version = str(number) if isinstance(number, int) and not isinstance(number, bool) else None
        payload = payload.get("data")
        if payload is None and (meta.get("deletion_time") or meta.get("destroyed")):
            raise SecretNotFound(f"{what}: the current version is deleted")
    if not isinstance(payload, dict):
        raise BackendError(f"{what}: answer has no data object")
    if kind is Kind.CONNECTION:
        if "conn_uri" in payload:
            uri = payload["conn_uri"]
            if not isinstance(uri, str):
                raise BackendError(f"{what}: conn_uri is not a string")
            return SecretValue(uri, version=version)
        return SecretValue(payload, version=version)
    if "value" not in payload:
        raise BackendError(f"{what}: the secret has no key 'value'")
    value = payload["value"]
    return SecretValue(value if isinstance(value, str) else json.dumps(value), version=version)


def parse_lease(data: dict[str, Any], now: float, what: str, *, lease_id: str | None = None) -> Lease | None:
    """The lease of a dynamic read or a renewal answer (``lease_id`` names the renewed one when the answer
    does not), or None when the answer carries no lease. Raises BackendError for a malformed lease."""
    given = data.get("lease_id")
    if given is not None and not isinstance(given, str):
        raise BackendError(f"{what}: lease_id is not a string")
    given = given or lease_id
    if not given:
        return None
    return Lease(given, seconds(data.get("lease_duration"), what), data.get("renewable") is True, now)


def parse_dynamic(spec: DynamicConnection, data: dict[str, Any], now: float, what: str) -> SecretValue:
    """A dynamic secret's answer as the connection ``spec`` describes, with its lease. A secret with a TTL but
    no lease (KV v1 with a ``ttl`` key) bounds the cache entry instead. Raises BackendError."""
    secret = data.get("data")
    if not isinstance(secret, dict):
        raise BackendError(f"{what}: answer has no data")
    lease = parse_lease(data, now, what)
    ttl = seconds(data.get("lease_duration"), what)
    try:
        fields = render(spec.fields, secret, what)
    except BrokerError as exc:
        exc.lease = lease
        raise
    return SecretValue(fields, lease=lease, ttl_hint=ttl if ttl and not lease else None)


class Backend(rest.RestBackend):
    config_model = VaultConfig
    config: VaultConfig
    identity: VaultTokenSource
    refused_status = 403  # Vault's answer to a token it does not take (and to a path the policy denies)

    def __init__(self, config: BackendConfig, ctx: BackendContext) -> None:
        assert isinstance(config, VaultConfig)
        super().__init__(config, ctx, config.url)
        self.identity = VaultTokenSource(
            self.name,
            ctx,
            config.auth,
            self._call,
            renew_at=config.token_renew_at,
            min_ttl=config.token_min_ttl,
        )

    # ------------------------------------------------------------------------------------------ layout

    def base_paths(self, kind: Kind) -> list[str]:
        """The kind's base paths in order, as the provider builds them: trailing '/' stripped, the deprecated
        ``global_secrets_path`` appended last (even to a kind whose own path is null)."""
        raw: str | list[str] | None = layout_key(self.config, kind, "path")
        paths = [] if raw is None else [p.rstrip("/") for p in ([raw] if isinstance(raw, str) else raw)]
        if self.config.global_secrets_path is not None:
            paths.append(self.config.global_secrets_path.rstrip("/"))
        return paths

    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        if kind is Kind.CONNECTION and name in self.config.dynamic_connections:
            return [DYNAMIC_PREFIX + name]
        bases = self.base_paths(kind)
        if not bases:
            return []
        mount = ""
        key = name
        if not self.config.mount_point:
            mount, sep, key = name.partition("/")
            if not sep:
                return []  # the provider needs "mount/key" here and looks nothing up
        team_paths = multi_team and self.config.use_team_secrets_path and kind is not Kind.CONFIG
        if team_paths and team is None and "/" in key:
            # A key with '/' read with no team could reach into a team's {path}/{team}/... namespace.
            return []
        out = []
        for base in bases:
            scoped = (f"{base}/{team}" if base else team) if team_paths and team is not None else base
            path = f"{scoped}/{key}" if scoped else key
            out.append(f"{mount}/{path}" if mount else path)
        return out

    def kv_path(self, secret_path: str) -> str:
        """The API path (under ``/v1/``) that reads a secret of the layout."""
        mount = self.config.mount_point
        if not mount:
            mount, _, secret_path = secret_path.partition("/")
        mount = mount.strip("/")
        if self.config.kv_engine_version == 2:
            return f"{mount}/data/{secret_path}"
        return f"{mount}/{secret_path}"

    # ------------------------------------------------------------------------------------------ requests

    def session_headers(self) -> dict[str, str]:
        headers = {**super().session_headers(), "X-Vault-Request": "true"}
        if self.config.namespace:
            headers["X-Vault-Namespace"] = self.config.namespace
        return headers

    def token_headers(self, token: str) -> dict[str, str]:
        return {"X-Vault-Token": token}

    def _url(self, path: str) -> str:
        return f"{self._base}/v1/{path.strip('/')}"

    async def _call(
        self, method: str, path: str, what: str, *, token: str | None = None, body: Any = None
    ) -> dict[str, Any]:
        """One request to ``/v1/{path}``, with ``token`` when given (the identity's logins and renewals).
        Raises by Vault's status map, and what ``rest.request`` raises."""
        what = f"vault {self.name}: {what}"
        headers = self.token_headers(token) if token else {}
        answer = await rest.request(self._http(), method, self._url(path), headers, what, body=body)
        raise_for_status(answer, what)
        return answer.data

    async def _authed(self, method: str, path: str, what: str, body: Any = None) -> dict[str, Any]:
        """A request with the backend's token; a refused token gets one fresh login and one more try."""
        what = f"vault {self.name}: {what}"
        answer = await self.authorized(method, self._url(path), what, body=body)
        raise_for_status(answer, what)
        return answer.data

    async def _on_unauthorized(self, answer: rest.Answer, what: str, token: str) -> bool:
        # A 403 is both "bad token" and "the policy denies this path": only the first is worth a new login.
        return not await self.identity.accepts(token)

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.identity.start()

    async def check(self) -> str:
        data = await self._authed("GET", "auth/token/lookup-self", "token lookup")
        info = data.get("data")
        info = info if isinstance(info, dict) else {}
        policies = info.get("policies")
        names = ",".join(sorted(str(p) for p in policies)) if isinstance(policies, list) else ""
        ttl = seconds(info.get("ttl"), f"vault {self.name}: token lookup")
        return f"vault {self._base} {self.identity.describe()} policies=[{names}] ttl={ttl:.0f}s"

    # ------------------------------------------------------------------------------------------ reads

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        """One read of a KV secret or a dynamic connection.

        Raises SecretNotFound, AccessDenied, RateLimited, BackendUnavailable (unreachable, sealed, an answer
        that is not Vault's), BackendError.
        """
        if path.startswith(DYNAMIC_PREFIX):
            spec = self.config.dynamic_connections[path.removeprefix(DYNAMIC_PREFIX)]
            data = await self._authed("GET", spec.path, f"read {spec.path}")
            return parse_dynamic(spec, data, self.ctx.clock.now(), f"vault {self.name}: {spec.path}")
        data = await self._authed("GET", self.kv_path(path), f"read {path}")
        return parse_kv(kind, self.config.kv_engine_version, data, f"vault {self.name}: read {path}")

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        body: dict[str, Any] = {"lease_id": lease.lease_id}
        if increment:
            body["increment"] = int(increment)
        data = await self._authed("PUT", "sys/leases/renew", "lease renew", body)
        renewed = parse_lease(data, self.ctx.clock.now(), f"vault {self.name}: lease renew", lease_id=lease.lease_id)
        assert renewed is not None
        return renewed

    async def revoke(self, lease: Lease) -> None:
        await self._authed("PUT", "sys/leases/revoke", "lease revoke", {"lease_id": lease.lease_id})
