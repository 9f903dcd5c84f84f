"""A local Azure for tests: the Microsoft Entra token endpoint and Key Vault's REST API, both over TLS.

Entra (``POST /{tenant}/oauth2/v2.0/token``) takes the workload-identity client-credentials grant: the
``client_assertion`` must be the federated service-account token registered for the app, the client id and
tenant must match, and the scope must be a resource's ``/.default``; it issues bearer tokens for that
resource. Apps registered in ``federations`` take a real JWT instead: its RS256 signature (the issuer's
key), issuer, subject and audience must match the app's federated identity credential, as Entra checks.
``access`` limits an app to the secret names with a given prefix (Key Vault RBAC on secrets).

Key Vault answers an unauthenticated request with the 401 ``WWW-Authenticate`` challenge naming the tenant
and resource; with a live token for ``https://vault.azure.net`` it serves
``GET /secrets/{name}[/{version}]?api-version=...`` as documented (404 SecretNotFound, 403 for a disabled
secret or a denied identity, 400 without ``api-version``); tests queue 429 (``Retry-After``) and 5xx faults.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt

from tests.servers.cloud import LoopbackServer, QuietHandler, TestCA, TokenBook

VAULT_RESOURCE = "https://vault.azure.net"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SECRET_PATH = re.compile(r"^/secrets/([^/]+)(?:/([^/]*))?/?$")
NAME = re.compile(r"[0-9A-Za-z-]{1,127}")


@dataclass
class Secret:
    value: str
    version: str
    enabled: bool = True
    expires: float | None = None
    content_type: str | None = None


@dataclass
class Federation:
    """A federated identity credential of an app: the external token it trusts."""

    public_key: Any
    issuer: str
    subject: str
    audience: str = "api://AzureADTokenExchange"


@dataclass
class AzureCloud:
    """State shared by Entra and Key Vault; tests plant secrets and faults and read the counters."""

    tenant_id: str = "72f988bf-0000-4000-8000-2d7cd011db47"
    client_id: str = "0f5c8a4e-1111-4222-8333-a1b2c3d4e5f6"
    federated_token: str = "projected-service-account-jwt-for-azure"
    challenge_tenant: str | None = None  # defaults to tenant_id
    identity_header: str = "managed-identity-header-value"
    token_lifetime: float = 3599.0
    secrets: dict[str, Secret] = field(default_factory=dict)
    denied: set[str] = field(default_factory=set)
    federations: dict[str, Federation] = field(default_factory=dict)  # by client id
    access: dict[str, str] = field(default_factory=dict)  # client id -> the secret-name prefix it may read
    faults: list[tuple[int, str | None]] = field(default_factory=list)
    token_faults: list[int] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    tokens: TokenBook = field(default_factory=TokenBook)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, value: str, **attrs: object) -> None:
        with self.lock:
            version = f"{len(self.secrets) + 1:032x}"
            self.secrets[name] = Secret(value, version, **attrs)  # type: ignore[arg-type]


def _matches(federation: Federation, assertion: str) -> bool:
    try:
        claims = jwt.decode(
            assertion,
            federation.public_key,
            algorithms=["RS256"],
            audience=federation.audience,
            issuer=federation.issuer,
            options={"require": ["exp", "sub", "iss"]},
        )
    except jwt.PyJWTError:
        return False
    return bool(claims["sub"] == federation.subject)


def entra_handler(cloud: AzureCloud) -> type[QuietHandler]:
    class Entra(QuietHandler):
        def _refuse(self, status: int, error: str, code: int, text: str) -> None:
            with cloud.lock:
                cloud.refused[error] += 1
            body = {"error": error, "error_description": f"AADSTS{code}: {text}", "error_codes": [code]}
            self.send_json(status, body)

        def do_POST(self) -> None:
            parts = urlsplit(self.path).path.strip("/").split("/")
            form = {k: v[0] for k, v in parse_qs(self.read_body().decode()).items()}
            with cloud.lock:
                cloud.calls["entra:token"] += 1
                fault = cloud.token_faults.pop(0) if cloud.token_faults else None
            if fault:
                self.send_json(fault, {"error": "temporarily_unavailable", "error_description": "injected"})
                return
            if len(parts) != 4 or parts[1:] != ["oauth2", "v2.0", "token"]:
                self.send_json(404, {"error": "not_found"})
                return
            if parts[0] != cloud.tenant_id:
                self._refuse(400, "invalid_tenant", 90002, f"Tenant '{parts[0]}' not found.")
                return
            if form.get("grant_type") != "client_credentials" or form.get("client_assertion_type") != ASSERTION_TYPE:
                self._refuse(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
                return
            client_id = form.get("client_id", "")
            federation = cloud.federations.get(client_id)
            if federation is None and client_id != cloud.client_id:
                self._refuse(400, "unauthorized_client", 700016, "Application not found in the directory.")
                return
            if federation is not None and not _matches(federation, form.get("client_assertion", "")):
                self._refuse(401, "invalid_client", 70021, "No matching federated identity record found.")
                return
            if federation is None and form.get("client_assertion") != cloud.federated_token:
                self._refuse(401, "invalid_client", 70021, "No matching federated identity record found.")
                return
            scope = form.get("scope", "")
            if not scope.endswith("/.default") or " " in scope:
                self._refuse(400, "invalid_scope", 1002012, "The provided value for scope is not valid.")
                return
            resource = scope.removesuffix("/.default")
            token = cloud.tokens.issue(cloud.token_lifetime, aud=resource, tid=cloud.tenant_id, appid=client_id)
            lifetime = int(cloud.token_lifetime)
            body = {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}
            self.send_json(200, body)

        def do_GET(self) -> None:
            """The App Service / Container Apps managed-identity endpoint (``IDENTITY_ENDPOINT``)."""
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            with cloud.lock:
                cloud.calls["msi:token"] += 1
            if parts.path != "/msi/token" or self.headers.get("X-IDENTITY-HEADER") != cloud.identity_header:
                self._refuse(401, "invalid_request", 50000, "Missing or wrong X-IDENTITY-HEADER.")
                return
            resource = query.get("resource", "")
            if not query.get("api-version") or resource != VAULT_RESOURCE:
                self._refuse(400, "invalid_resource", 500011, "The resource principal was not found.")
                return
            token = cloud.tokens.issue(cloud.token_lifetime, aud=resource, tid=cloud.tenant_id, appid="msi")
            expires_on = str(int(time.time() + cloud.token_lifetime))
            self.send_json(
                200, {"access_token": token, "expires_on": expires_on, "resource": resource, "token_type": "Bearer"}
            )

    return Entra


def key_vault_handler(cloud: AzureCloud, base_url: list[str]) -> type[QuietHandler]:
    class KeyVault(QuietHandler):
        def _error(self, status: int, code: str, message: str, inner: str | None = None, **headers: str) -> None:
            error: dict[str, object] = {"code": code, "message": message}
            if inner:
                error["innererror"] = {"code": inner}
            self.send_json(status, {"error": error}, headers or None)

        def _challenge(self) -> None:
            tenant = cloud.challenge_tenant or cloud.tenant_id
            header = f'Bearer authorization="https://login.windows.net/{tenant}", resource="{VAULT_RESOURCE}"'
            self._error(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
                None,
                **{"WWW-Authenticate": header},
            )

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if not parse_qs(parts.query).get("api-version"):
                self._error(400, "BadParameter", "The 'api-version' query parameter is missing.")
                return
            grant, reason = cloud.tokens.check(self.bearer())
            if grant is None or grant.claims.get("aud") != VAULT_RESOURCE:
                with cloud.lock:
                    cloud.refused[f"token-{reason or 'audience'}"] += 1
                self._challenge()
                return
            if parts.path.rstrip("/") == "/secrets":
                self.send_json(200, {"value": [], "nextLink": None})
                return
            match = SECRET_PATH.match(parts.path)
            if not match:
                self._error(404, "NotFound", "The requested resource was not found.")
                return
            name, version = match.group(1), match.group(2) or None
            with cloud.lock:
                cloud.calls[f"get:{name}"] += 1
                fault = cloud.faults.pop(0) if cloud.faults else None
                secret = cloud.secrets.get(name)
            if fault:
                status, retry_after = fault
                code = "Throttled" if status == 429 else "ServiceUnavailable"
                self._error(status, code, "injected", None, **({"Retry-After": retry_after} if retry_after else {}))
                return
            if not NAME.fullmatch(name):
                self._error(400, "BadParameter", "The secret name is invalid.")
                return
            allowed = cloud.access.get(str(grant.claims.get("appid")))
            if name in cloud.denied or (allowed is not None and not name.startswith(allowed)):
                self._error(
                    403,
                    "Forbidden",
                    f"Caller is not authorized to perform action on resource. Action: 'secrets/getSecret/action' "
                    f"Assignment: (not found) appid={cloud.client_id}",
                    "ForbiddenByRbac",
                )
                return
            if secret is None or (version and version != secret.version):
                self._error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault.")
                return
            if not secret.enabled:
                self._error(403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled")
                return
            attributes: dict[str, object] = {
                "enabled": True,
                "created": 1764000000,
                "updated": 1764000000,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            }
            if secret.expires is not None:
                attributes["exp"] = int(secret.expires)
            body: dict[str, object] = {
                "value": secret.value,
                "id": f"{base_url[0]}/secrets/{name}/{secret.version}",
                "attributes": attributes,
                "tags": {},
            }
            if secret.content_type:
                body["contentType"] = secret.content_type
            self.send_json(200, body)

    return KeyVault


class AzureServers:
    """Entra and Key Vault on loopback over TLS (the test CA), sharing one ``AzureCloud``."""

    def __init__(self, ca: TestCA, cloud: AzureCloud | None = None) -> None:
        self.cloud = cloud or AzureCloud()
        self.ca = ca
        base: list[str] = [""]
        self.entra = LoopbackServer(entra_handler(self.cloud), ca.server_context())
        self.key_vault = LoopbackServer(key_vault_handler(self.cloud, base), ca.server_context())
        base[0] = self.key_vault.url

    def env(self, token_file: str) -> dict[str, str]:
        """What the AKS workload-identity webhook injects, pointed at the local Entra; the test CA trusted."""
        return {
            "AZURE_CLIENT_ID": self.cloud.client_id,
            "AZURE_TENANT_ID": self.cloud.tenant_id,
            "AZURE_FEDERATED_TOKEN_FILE": token_file,
            "AZURE_AUTHORITY_HOST": self.entra.url,
            "SSL_CERT_FILE": str(self.ca.bundle_path),
        }

    def stop(self) -> None:
        self.entra.stop()
        self.key_vault.stop()
