"""``type: vault``: HashiCorp Vault and OpenBao over their HTTP API (aiohttp; nothing blocks the loop).

Layout exactly as Airflow's ``VaultBackend``: ``{mount_point}/{connections_path}/{conn_id}`` on KV v1 or v2, each
path a string or a list tried in order, ``mount_point: null`` taking the mount from the first segment of the id,
team-scoped ``{path}/{team}/{id}`` under ``use_team_secrets_path`` in multi-team mode; connection data as
``conn_uri`` or the separate fields; variables and config from key ``value``. ``dynamic_connections`` turn a leased
secret (e.g. ``database/creds/airflow``) into an Airflow connection through a small field template.

One token per backend, obtained with the pod's identity, renewed at about 2/3 of its TTL and replaced by a new login
when it cannot be renewed or is refused; concurrent requests share one login.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import Field, field_validator, model_validator

from broker.backends import rest
from broker.backends.base import (
    AccessDenied,
    BackendConfig,
    BackendContext,
    BackendError,
    BackendUnavailable,
    BrokerError,
    Kind,
    Lease,
    RateLimited,
    SecretNotFound,
    SecretValue,
    is_transient,
    layout_key,
)
from broker.backends.base import Backend as BaseBackend
from broker.configtypes import Duration, StrictModel
from broker.providerkw import Deprecated, Moves, ProviderKwarg, Replaced

log = logging.getLogger("broker.backend.vault")

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
SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_MOUNTS = {"kubernetes": "kubernetes", "jwt": "jwt", "aws": "aws", "approle": "approle"}
DYNAMIC_PREFIX = "dynamic:"
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
LOGIN_BACKOFF_CAP = 30.0


class AuthConfig(StrictModel):
    method: Literal["kubernetes", "jwt", "aws", "approle", "token"]
    role: str | None = None
    mount: str | None = None
    token_path: Path = SA_TOKEN
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    token_file: Path | None = None
    # aws (IAM) method: the STS request signed with the pod's AWS credentials
    aws_region: str = "us-east-1"
    aws_sts_url: str = "https://sts.amazonaws.com/"
    aws_server_id: str | None = None

    @model_validator(mode="after")
    def _per_method(self) -> AuthConfig:
        needed = {
            "kubernetes": ["role"],
            "jwt": ["role"],
            "aws": ["role"],
            "approle": ["role_id_file", "secret_id_file"],
            "token": ["token_file"],
        }[self.method]
        missing = [key for key in needed if getattr(self, key) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: required for auth method {self.method}")
        return self

    @property
    def mount_path(self) -> str:
        return (self.mount or DEFAULT_MOUNTS.get(self.method, self.method)).strip("/")


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


class _Token:
    """The current Vault token and its lifetime on the monotonic clock."""

    __slots__ = ("expires_at", "renewable", "ttl", "value")

    def __init__(self, value: str, ttl: float, renewable: bool, now: float) -> None:
        self.value = value
        self.ttl = ttl
        self.renewable = renewable
        self.expires_at = now + ttl if ttl > 0 else float("inf")

    def __repr__(self) -> str:
        return f"_Token(<redacted>, ttl={self.ttl}, renewable={self.renewable})"


class Backend(BaseBackend):
    config_model = VaultConfig
    config: VaultConfig

    def __init__(self, config: BackendConfig, ctx: BackendContext) -> None:
        super().__init__(config, ctx)
        self._base = self.config.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._token: _Token | None = None
        self._login_lock = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None
        self._rng = random.Random()  # noqa: S311 - jitter only
        self.login_count = 0

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

    def locate(self, kind: Kind, name: str) -> str | None:
        paths = self.candidates(kind, name)
        return paths[0] if paths else None

    def _kv_url(self, secret_path: str) -> str:
        mount = self.config.mount_point
        if not mount:
            mount, _, secret_path = secret_path.partition("/")
        mount = mount.strip("/")
        if self.config.kv_engine_version == 2:
            return f"{self._base}/v1/{mount}/data/{secret_path}"
        return f"{self._base}/v1/{mount}/{secret_path}"

    # ------------------------------------------------------------------------------------------ HTTP

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"X-Vault-Request": "true", "User-Agent": rest.USER_AGENT}
            if self.config.namespace:
                headers["X-Vault-Namespace"] = self.config.namespace
            self._session = rest.make_session(self._base, self.config.ca_cert, headers)
        return self._session

    async def _request(
        self, method: str, url: str, *, token: str | None, body: Any = None, what: str
    ) -> tuple[int, dict[str, Any]]:
        headers = {"X-Vault-Token": token} if token else {}
        answer = await rest.request(self._http(), method, url, headers, f"vault {self.name}: {what}", body=body)
        if answer.status >= 400:
            self._raise_for(answer.status, what, answer.retry_after)
        return answer.status, answer.data

    def _raise_for(self, status: int, what: str, retry_after: str | None) -> None:
        """The one map from Vault's HTTP status to the error tree (bodies are never quoted: they may echo input)."""
        message = f"vault {self.name}: {what}: HTTP {status}"
        if status == 404:
            raise SecretNotFound(message)
        if status in (401, 403):
            raise AccessDenied(message)
        if status == 429:
            raise RateLimited(message, retry_after=rest.parse_retry_after(retry_after))
        if status >= 500 or status == 412:  # 503 sealed/standby, 412 Enterprise consistency
            raise BackendUnavailable(message)
        raise BackendError(message)

    # ------------------------------------------------------------------------------------------ login

    async def _login_payload(self) -> tuple[str, dict[str, Any]] | None:
        """(login path, body) for the method, or None for the token method. Files are re-read each time."""
        auth = self.config.auth
        if auth.method == "token":
            return None
        if auth.method in ("kubernetes", "jwt"):
            if self.ctx.workload_token is not None:  # node mode: the calling pod's own token
                return f"auth/{auth.mount_path}/login", {"role": auth.role, "jwt": self.ctx.pod_token()}
            jwt = await self.ctx.run_blocking(_read_secret_file, auth.token_path, "auth.token_path")
            return f"auth/{auth.mount_path}/login", {"role": auth.role, "jwt": jwt}
        if auth.method == "approle":
            assert auth.role_id_file is not None and auth.secret_id_file is not None
            role_id = await self.ctx.run_blocking(_read_secret_file, auth.role_id_file, "auth.role_id_file")
            secret_id = await self.ctx.run_blocking(_read_secret_file, auth.secret_id_file, "auth.secret_id_file")
            return f"auth/{auth.mount_path}/login", {"role_id": role_id, "secret_id": secret_id}
        body = await self.ctx.run_blocking(_signed_sts_request, auth.aws_sts_url, auth.aws_region, auth.aws_server_id)
        return f"auth/{auth.mount_path}/login", {"role": auth.role, **body}

    async def _login(self) -> _Token:
        """Log in once with the pod's identity. Raises AccessDenied, BackendUnavailable, BackendError."""
        payload = await self._login_payload()
        try:
            if payload is None:
                assert self.config.auth.token_file is not None
                value = await self.ctx.run_blocking(_read_secret_file, self.config.auth.token_file, "auth.token_file")
                _, data = await self._request(
                    "GET", f"{self._base}/v1/auth/token/lookup-self", token=value, what="token lookup"
                )
                info = data.get("data") or {}
                token = _Token(value, float(info.get("ttl") or 0), bool(info.get("renewable")), self.ctx.clock.now())
            else:
                path, body = payload
                _, data = await self._request("POST", f"{self._base}/v1/{path}", token=None, body=body, what="login")
                auth = data.get("auth") or {}
                if not auth.get("client_token"):
                    raise BackendError(f"vault {self.name}: login answered without a token")
                token = _Token(
                    auth["client_token"],
                    float(auth.get("lease_duration") or 0),
                    bool(auth.get("renewable")),
                    self.ctx.clock.now(),
                )
        except BrokerError as exc:
            self.ctx.metrics.logins.labels(self.name, "failed").inc()
            log.warning(
                "vault login failed",
                extra={
                    "backend": self.name,
                    "method": self.config.auth.method,
                    "error": exc.code,
                    "detail": exc.message,
                },
            )
            raise
        self.login_count += 1
        self.ctx.metrics.logins.labels(self.name, "ok").inc()
        self._set_token(token)
        log.info(
            "vault login",
            extra={
                "backend": self.name,
                "method": self.config.auth.method,
                "ttl": token.ttl,
                "renewable": token.renewable,
            },
        )
        return token

    def _set_token(self, token: _Token) -> None:
        self._token = token
        remaining = token.expires_at - self.ctx.clock.now()
        self.ctx.metrics.identity_expiry.labels(self.name).set(-1 if token.ttl <= 0 else remaining)

    def _valid(self, token: _Token | None) -> bool:
        return token is not None and token.expires_at - self.ctx.clock.now() > self.config.token_min_ttl

    async def _current_token(self, refused: _Token | None = None) -> _Token:
        """A valid token; one login is shared by every concurrent caller (second look after the lock)."""
        token = self._token
        if self._valid(token) and token is not refused:
            assert token is not None
            return token
        async with self._login_lock:
            token = self._token
            if self._valid(token) and token is not refused:
                assert token is not None
                return token
            return await self._login()

    async def _authed(self, method: str, url: str, what: str, body: Any = None) -> dict[str, Any]:
        """A request with the token; a 403 with a token we believed valid triggers one fresh login and retry."""
        token = await self._current_token()
        try:
            return (await self._request(method, url, token=token.value, body=body, what=what))[1]
        except AccessDenied:
            if self.config.auth.method == "token" and self._token is token:
                raise
            fresh = await self._current_token(refused=token)
            return (await self._request(method, url, token=fresh.value, body=body, what=what))[1]

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._current_token()
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop(), name=f"vault-token-{self.name}")

    async def _renew_loop(self) -> None:
        """Renew the token at ~2/3 of its TTL (jittered); log in again when renewal cannot keep it alive."""
        delay = 1.0
        while True:
            token = self._token
            now = self.ctx.clock.now()
            if token is None:
                wait = delay
            elif token.ttl <= 0:
                wait = 3600.0  # a token that never expires: nothing to do but look again later
            else:
                due = token.expires_at - token.ttl * (1 - self.config.token_renew_at * self._rng.uniform(0.9, 1.0))
                wait = max(0.0, due - now)
            await asyncio.sleep(wait)
            try:
                await self._renew_or_login()
                delay = 1.0
            except BrokerError as exc:
                log.warning(
                    "vault token upkeep failed; retrying",
                    extra={"backend": self.name, "error": exc.code, "retry_in": round(delay, 1)},
                )
                if not is_transient(exc) and self._token is not None and not self._valid(self._token):
                    self._token = None
                await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))
                delay = min(delay * 2, LOGIN_BACKOFF_CAP)

    async def _renew_or_login(self) -> None:
        token = self._token
        if token is None or not token.renewable:
            async with self._login_lock:
                await self._login()
            return
        try:
            _, data = await self._request(
                "POST",
                f"{self._base}/v1/auth/token/renew-self",
                token=token.value,
                body={"increment": f"{int(token.ttl)}s"},
                what="token renew",
            )
        except AccessDenied:
            async with self._login_lock:
                await self._login()  # revoked or expired: a fresh login
            return
        auth = data.get("auth") or {}
        granted = float(auth.get("lease_duration") or 0)
        self.ctx.metrics.logins.labels(self.name, "renewed").inc()
        renewed = _Token(token.value, granted, bool(auth.get("renewable")), self.ctx.clock.now())
        if granted < token.ttl * 0.5 or granted <= self.config.token_min_ttl * 2:
            # Near the token's max TTL: renewals no longer buy time, so log in again now.
            async with self._login_lock:
                await self._login()
            return
        self._set_token(_Token(token.value, granted, renewed.renewable, self.ctx.clock.now()))
        # keep the original TTL as the renewal increment for the next round
        assert self._token is not None
        self._token.ttl = granted

    def not_ready_reason(self) -> str | None:
        if not self._valid(self._token):
            return "no valid Vault token"
        return None

    async def check(self) -> str:
        await self._current_token()
        data = await self._authed("GET", f"{self._base}/v1/auth/token/lookup-self", "token lookup")
        info = data.get("data") or {}
        policies = ",".join(sorted(info.get("policies") or []))
        auth = self.config.auth
        role = f" role={auth.role}" if auth.role else ""
        return f"vault {self._base} auth={auth.method}{role} policies=[{policies}] ttl={info.get('ttl')}s"

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        token, self._token = self._token, None
        if self.ctx.workload_token is not None and token is not None:
            # Node mode: an identity closed for idleness logs out, so its token outlives no pod.
            with contextlib.suppress(BrokerError):
                await self._request("POST", f"{self._base}/v1/auth/token/revoke-self", token=token.value, what="logout")
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------------------------------ reads

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        if path.startswith(DYNAMIC_PREFIX):
            return await self._fetch_dynamic(path.removeprefix(DYNAMIC_PREFIX))
        data = await self._authed("GET", self._kv_url(path), f"read {path}")
        payload = data.get("data")
        version = None
        if self.config.kv_engine_version == 2:
            if not isinstance(payload, dict):
                raise BackendError(f"vault {self.name}: read {path}: unexpected KV v2 answer")
            meta = payload.get("metadata") or {}
            version = str(meta["version"]) if meta.get("version") is not None else None
            payload = payload.get("data")
            if payload is None and isinstance(meta, dict) and (meta.get("deletion_time") or meta.get("destroyed")):
                raise SecretNotFound(f"vault {self.name}: {path}: the current version is deleted")
        if not isinstance(payload, dict):
            # Only Vault's own word (404, a deleted version) means "not found"; anything else is a failure.
            raise BackendError(f"vault {self.name}: read {path}: answer has no data object")
        if kind is Kind.CONNECTION:
            if "conn_uri" in payload:
                uri = payload["conn_uri"]
                if not isinstance(uri, str):
                    raise BackendError(f"vault {self.name}: {path}: conn_uri is not a string")
                return SecretValue(uri, version=version)
            return SecretValue(payload, version=version)
        if "value" not in payload:
            raise BackendError(f"vault {self.name}: {path} has no key 'value'")
        value = payload["value"]
        return SecretValue(value if isinstance(value, str) else json.dumps(value), version=version)

    async def _fetch_dynamic(self, conn_id: str) -> SecretValue:
        spec = self.config.dynamic_connections[conn_id]
        data = await self._authed("GET", f"{self._base}/v1/{spec.path.strip('/')}", f"read {spec.path}")
        secret = data.get("data")
        if not isinstance(secret, dict):
            raise BackendError(f"vault {self.name}: {spec.path}: answer has no data")
        lease = None
        if data.get("lease_id"):
            lease = Lease(
                str(data["lease_id"]),
                float(data.get("lease_duration") or 0),
                bool(data.get("renewable")),
                self.ctx.clock.now(),
            )
        fields = render(spec.fields, secret, f"vault {self.name}: {spec.path}")
        ttl_hint = float(data["lease_duration"]) if data.get("lease_duration") and not lease else None
        return SecretValue(fields, lease=lease, ttl_hint=ttl_hint)

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        body: dict[str, Any] = {"lease_id": lease.lease_id}
        if increment:
            body["increment"] = int(increment)
        data = await self._authed("PUT", f"{self._base}/v1/sys/leases/renew", "lease renew", body)
        return Lease(
            str(data.get("lease_id") or lease.lease_id),
            float(data.get("lease_duration") or 0),
            bool(data.get("renewable")),
            self.ctx.clock.now(),
        )

    async def revoke(self, lease: Lease) -> None:
        await self._authed("PUT", f"{self._base}/v1/sys/leases/revoke", "lease revoke", {"lease_id": lease.lease_id})


def _read_secret_file(path: Path, key: str) -> str:
    """A credential file's content. Raises BackendError naming the config key and the path."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BackendError(f"{key}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if not value:
        raise BackendError(f"{key}: {path} is empty")
    return value


def _signed_sts_request(url: str, region: str, server_id: str | None) -> dict[str, str]:
    """A SigV4-signed sts:GetCallerIdentity for Vault's IAM login, with boto3's default credential chain
    (IRSA web identity, EKS Pod Identity, instance profile). Runs in the thread pool."""
    import boto3
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    credentials = boto3.session.Session().get_credentials()
    if credentials is None:
        raise AccessDenied("auth.method aws: no AWS credentials found in the default chain")
    body = "Action=GetCallerIdentity&Version=2011-06-15"
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if server_id:
        headers["X-Vault-AWS-IAM-Server-ID"] = server_id
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(credentials.get_frozen_credentials(), "sts", region).add_auth(request)
    signed = {k: [v] for k, v in request.headers.items()}
    return {
        "iam_http_request_method": "POST",
        "iam_request_url": base64.b64encode(url.encode()).decode(),
        "iam_request_body": base64.b64encode(body.encode()).decode(),
        "iam_request_headers": base64.b64encode(json.dumps(signed).encode()).decode(),
    }
