"""Vault and OpenBao tokens from the pod's identity: one login per backend, renewed, replaced when it must be.

Each auth method only builds its login request (``login_request``). ``VaultTokenSource``, on the shared
``TokenSource``, owns the rest: one login for every concurrent caller, renewal (``renew-self``) at about 2/3
of the token's TTL, a fresh login when the token is not renewable, when Vault refuses the renewal (revoked)
or when a renewal no longer buys time (near the token's max TTL), backoff after failures, metrics and logs.
Credential files (service-account token, AppRole ids, a token) are re-read at every login: the kubelet
rotates projected tokens. Requests go through the backend's HTTP layer (``Call``); nothing here opens a
connection.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import model_validator

from broker.backends.base import AccessDenied, BackendContext, BackendError, BrokerError
from broker.configtypes import StrictModel
from broker.identity import Token, TokenSource

SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_MOUNTS = {"kubernetes": "kubernetes", "jwt": "jwt", "aws": "aws", "approle": "approle"}
METHOD_KEYS = {
    "kubernetes": ["role"],
    "jwt": ["role"],
    "aws": ["role"],
    "approle": ["role_id_file", "secret_id_file"],
    "token": ["token_file"],
}


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
        missing = [key for key in METHOD_KEYS[self.method] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: required for auth method {self.method}")
        return self

    @property
    def mount_path(self) -> str:
        return (self.mount or DEFAULT_MOUNTS.get(self.method, self.method)).strip("/")


class Call(Protocol):
    """The backend's HTTP layer: one request to ``/v1/{path}``, its JSON object, errors raised by status."""

    async def __call__(
        self, method: str, path: str, what: str, *, token: str | None = None, body: Any = None
    ) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------- answers


def seconds(value: Any, what: str) -> float:
    """A duration field of a Vault answer (absent is 0). Raises BackendError when it is not a number >= 0."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise BackendError(f"{what}: a duration in the answer is not a number of seconds")
    return float(value)


def parse_grant(data: dict[str, Any], what: str, *, lookup: bool = False) -> tuple[str | None, float, bool]:
    """(token, TTL, renewable) from a login or renewal answer (its ``auth`` object), or with ``lookup`` from a
    token lookup (its ``data`` object, which names no token). A TTL of 0 means the token never expires.

    Raises BackendError when the object is missing or a duration is not a number.
    """
    section = data.get("data" if lookup else "auth")
    if not isinstance(section, dict):
        raise BackendError(f"{what}: answered without {'data' if lookup else 'auth'}")
    value = section.get("client_token")
    ttl = seconds(section.get("ttl" if lookup else "lease_duration"), what)
    return value if isinstance(value, str) and value else None, ttl, section.get("renewable") is True


# ---------------------------------------------------------------------------------------------- login requests


def read_secret_file(path: Path, key: str) -> str:
    """A credential file's content. Raises BackendError naming the config key and the path."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BackendError(f"{key}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if not value:
        raise BackendError(f"{key}: {path} is empty")
    return value


def signed_sts_request(url: str, region: str, server_id: str | None) -> dict[str, str]:
    """A SigV4-signed sts:GetCallerIdentity for Vault's IAM login, with boto3's default credential chain
    (IRSA web identity, EKS Pod Identity, instance profile). Blocking: runs in the thread pool.

    Raises AccessDenied when the chain finds no credentials.
    """
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


async def login_request(auth: AuthConfig, ctx: BackendContext) -> tuple[str, dict[str, Any]]:
    """(login path, body) for a login method (not ``token``). Raises BackendError for an unreadable file,
    AccessDenied when the pod has no identity to log in with."""
    path = f"auth/{auth.mount_path}/login"
    if auth.method in ("kubernetes", "jwt"):
        if ctx.workload_token is not None:  # node mode: the calling pod's own token
            return path, {"role": auth.role, "jwt": ctx.pod_token()}
        return path, {
            "role": auth.role,
            "jwt": await ctx.run_blocking(read_secret_file, auth.token_path, "auth.token_path"),
        }
    if auth.method == "approle":
        assert auth.role_id_file is not None and auth.secret_id_file is not None
        role_id = await ctx.run_blocking(read_secret_file, auth.role_id_file, "auth.role_id_file")
        secret_id = await ctx.run_blocking(read_secret_file, auth.secret_id_file, "auth.secret_id_file")
        return path, {"role_id": role_id, "secret_id": secret_id}
    if auth.method == "aws":
        body = await ctx.run_blocking(signed_sts_request, auth.aws_sts_url, auth.aws_region, auth.aws_server_id)
        return path, {"role": auth.role, **body}
    raise BackendError(f"auth.method {auth.method}: no login request")


# ---------------------------------------------------------------------------------------------- the token


class VaultTokenSource(TokenSource):
    """The backend's one Vault token."""

    kind = "Vault"

    def __init__(
        self,
        backend_name: str,
        ctx: BackendContext,
        auth: AuthConfig,
        call: Call,
        *,
        renew_at: float = 2 / 3,
        min_ttl: float = 10.0,
    ) -> None:
        super().__init__(backend_name, ctx, renew_at=renew_at, min_ttl=min_ttl)
        self.auth = auth
        self._call = call
        self.renewable = False
        self.increment = 0.0  # what a renewal asks for: the TTL the login granted

    async def _acquire(self) -> tuple[str, float]:
        """One login (for ``token``: the file's token, looked up for its TTL)."""
        where = f"vault {self.backend_name}"
        if self.auth.method == "token":
            assert self.auth.token_file is not None
            value = await self.ctx.run_blocking(read_secret_file, self.auth.token_file, "auth.token_file")
            data = await self._call("GET", "auth/token/lookup-self", "token lookup", token=value)
            _, ttl, renewable = parse_grant(data, f"{where}: token lookup", lookup=True)
        else:
            path, body = await login_request(self.auth, self.ctx)
            data = await self._call("POST", path, "login", body=body)
            granted, ttl, renewable = parse_grant(data, f"{where}: login")
            if granted is None:
                raise BackendError(f"{where}: login answered without a token")
            value = granted
        self.renewable, self.increment = renewable, ttl
        return value, ttl if ttl > 0 else math.inf

    async def _renew(self, current: Token) -> float | None:
        """``renew-self`` for the login's TTL; None (log in again) when the token is not renewable, when Vault
        refuses it, or when Vault grants less than half of it or too little to be worth keeping."""
        if not self.renewable or math.isinf(current.lifetime):
            return None
        what = f"vault {self.backend_name}: token renew"
        try:
            data = await self._call(
                "POST",
                "auth/token/renew-self",
                "token renew",
                token=current.value,
                body={"increment": f"{int(self.increment)}s"},
            )
        except AccessDenied:
            return None  # revoked or expired: a fresh login
        _, granted, self.renewable = parse_grant(data, what)
        if granted < self.increment * 0.5 or granted <= self.min_ttl * 2:
            return None  # near the token's max TTL: renewals no longer buy time
        return granted

    async def accepts(self, token: str) -> bool:
        """Whether Vault still takes ``token`` (a 403 is also Vault's answer to a path the policy denies).
        Raises what the lookup raises when Vault cannot say."""
        try:
            await self._call("GET", "auth/token/lookup-self", "token lookup", token=token)
        except AccessDenied:
            return False
        return True

    def describe(self) -> str:
        return f"auth={self.auth.method}" + (f" role={self.auth.role}" if self.auth.role else "")

    async def aclose(self) -> None:
        await super().aclose()
        token, self._token = self._token, None
        if self.ctx.workload_token is not None and token is not None:
            # Node mode: an identity closed for idleness logs out, so its token outlives no pod.
            with contextlib.suppress(BrokerError):
                await self._call("POST", "auth/token/revoke-self", "logout", token=token.value)
