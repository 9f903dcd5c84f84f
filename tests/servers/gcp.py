"""A local Google Cloud for tests: the GCE metadata server, OAuth token endpoints, and Secret Manager's REST API.

The metadata server (plain HTTP, as the real one) answers the ping, project and service-account queries and
issues access tokens; every ``/computeMetadata`` request must carry ``Metadata-Flavor: Google`` and no
``X-Forwarded-For`` (refused with 403 otherwise, as GCE does). The same server takes the OAuth grants
google-auth makes from key files: the JWT-bearer grant (``POST /token``, the assertion's RS256 signature,
issuer, audience and scope checked against a registered service-account key) and the STS token exchange of
``external_account`` files (``POST /v1/token``, the subject token checked). Workload identity federation
with OIDC subject tokens: a registered provider (its audience, the issuer's public key and the audience the
JWT must carry) turns a valid RS256 subject token into a federated token for
``principal://iam.googleapis.com/{pool}/subject/{sub}``; that principal may impersonate the service accounts
that name it (``POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken``, the IAM Credentials API).
``access`` limits a principal or service account to the secret ids with a given prefix (IAM on secrets).

Secret Manager (HTTPS with the test CA) serves ``GET /v1/projects/{p}/secrets/{s}/versions/{v}:access``
with base64 payloads and their CRC32C (the path's variables percent-decoded, as Google's HTTP/JSON
transcoding does), and refuses like the real service: 401 UNAUTHENTICATED for a missing,
unknown, expired or revoked token, 403 for a token without the ``cloud-platform`` scope, another project or a
denied secret, 400 INVALID_ARGUMENT for an invalid secret id, 404 NOT_FOUND, 400 FAILED_PRECONDITION for a
disabled version. Tests queue one-shot faults (429 with ``Retry-After``, 5xx) and corrupt a payload's CRC32C.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import google_crc32c
import jwt

from tests.servers.cloud import LoopbackServer, QuietHandler, TestCA, TokenBook

OAUTH_AUDIENCE = "https://oauth2.googleapis.com/token"  # what Google requires in the assertion, whatever the URI
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
IMPERSONATE = re.compile(r"^/v1/projects/-/serviceAccounts/([^/:]+):generateAccessToken$")
ACCESS = re.compile(r"^/v1/projects/([^/]+)/secrets/([^/]+)/versions/([^/:]+):access$")
STATUS_NAME = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@dataclass
class Version:
    data: bytes
    state: str = "ENABLED"


@dataclass
class Provider:
    """An OIDC provider of a workload identity pool: whose JWTs it trusts, and for which audience."""

    public_key: Any
    allowed_audience: str

    def principal(self, provider_audience: str, subject: str) -> str:
        pool = provider_audience.removeprefix("//iam.googleapis.com/").rsplit("/providers/", 1)[0]
        return f"principal://iam.googleapis.com/{pool}/subject/{subject}"


@dataclass
class GoogleCloud:
    """State shared by the servers; tests plant secrets and faults and read the counters."""

    project_id: str = "airflow-prod"
    project_number: str = "123456789012"
    email: str = "airflow-broker@airflow-prod.iam.gserviceaccount.com"
    token_lifetime: float = 3600.0
    secrets: dict[str, list[Version]] = field(default_factory=dict)
    denied: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    faults: list[tuple[int, str | None]] = field(default_factory=list)  # one-shot (status, Retry-After)
    token_faults: list[int] = field(default_factory=list)  # one-shot statuses for the metadata token endpoint
    keys: dict[str, Any] = field(default_factory=dict)  # service-account email -> RSA public key
    subject_tokens: set[str] = field(default_factory=set)  # accepted by the STS exchange
    providers: dict[str, Provider] = field(default_factory=dict)  # by the provider's STS audience
    impersonation: dict[str, set[str]] = field(default_factory=dict)  # service account -> principals allowed
    access: dict[str, str] = field(default_factory=dict)  # principal or email -> the secret-id prefix it may read
    calls: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    tokens: TokenBook = field(default_factory=TokenBook)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, secret_id: str, value: str | bytes) -> int:
        data = value.encode() if isinstance(value, str) else value
        with self.lock:
            self.secrets.setdefault(secret_id, []).append(Version(data))
            return len(self.secrets[secret_id])

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(n for key, n in self.calls.items() if key.startswith(prefix))


def _error(handler: QuietHandler, status: int, message: str, name: str | None = None, **headers: str) -> None:
    body = {"error": {"code": status, "message": message, "status": name or STATUS_NAME.get(status, "UNKNOWN")}}
    handler.send_json(status, body, headers or None)


def metadata_handler(cloud: GoogleCloud) -> type[QuietHandler]:
    class Metadata(QuietHandler):
        def _flavored(self) -> bool:
            if self.headers.get("Metadata-Flavor") != "Google" or self.headers.get("X-Forwarded-For"):
                with cloud.lock:
                    cloud.refused["metadata-flavor"] += 1
                self.send_body(403, b"Missing required header: Metadata-Flavor\n", "text/html")
                return False
            return True

        def _text(self, text: str) -> None:
            self.send_body(200, text.encode(), "application/text", {"Metadata-Flavor": "Google"})

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            if path == "/":
                with cloud.lock:
                    cloud.calls["metadata:ping"] += 1
                self.send_body(200, b"", "application/text", {"Metadata-Flavor": "Google"})
                return
            if not path.startswith("/computeMetadata/v1/"):
                self.send_body(404, b"Not Found\n", "text/html")
                return
            if not self._flavored():
                return
            rel = path.removeprefix("/computeMetadata/v1/")
            with cloud.lock:
                cloud.calls[f"metadata:{rel}"] += 1
            accounts = ("instance/service-accounts/default/", f"instance/service-accounts/{cloud.email}/")
            if rel == "project/project-id":
                self._text(cloud.project_id)
            elif rel == "project/numeric-project-id":
                self._text(cloud.project_number)
            elif rel in accounts and query.get("recursive") == ["true"]:
                body = {"aliases": ["default"], "email": cloud.email, "scopes": [CLOUD_PLATFORM]}
                self.send_json(200, body, {"Metadata-Flavor": "Google"})
            elif rel in (a + "email" for a in accounts):
                self._text(cloud.email)
            elif rel in (a + "token" for a in accounts):
                with cloud.lock:
                    fault = cloud.token_faults.pop(0) if cloud.token_faults else None
                if fault:
                    self.send_body(fault, b"injected\n", "text/plain")
                    return
                scopes = ",".join(query.get("scopes", [])).split(",")
                token = cloud.tokens.issue(cloud.token_lifetime, email=cloud.email, scopes=scopes)
                body = {"access_token": token, "expires_in": int(cloud.token_lifetime), "token_type": "Bearer"}
                self.send_json(200, body, {"Metadata-Flavor": "Google"})
            else:
                self.send_body(404, b"Not Found\n", "text/html")

        def do_POST(self) -> None:
            impersonate = IMPERSONATE.match(urlsplit(self.path).path)
            if impersonate:
                self._generate_access_token(impersonate.group(1))
                return
            form = {k: v[0] for k, v in parse_qs(self.read_body().decode()).items()}
            if self.path == "/token":
                self._jwt_bearer(form)
            elif self.path == "/v1/token":
                self._sts_exchange(form)
            else:
                self.send_body(404, b"Not Found\n", "text/html")

        def _jwt_bearer(self, form: dict[str, str]) -> None:
            with cloud.lock:
                cloud.calls["oauth:jwt-bearer"] += 1
            if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
                self.send_json(400, {"error": "unsupported_grant_type"})
                return
            try:
                unverified = jwt.decode(form.get("assertion", ""), options={"verify_signature": False})
                key = cloud.keys[unverified["iss"]]
                claims = jwt.decode(
                    form["assertion"], key, algorithms=["RS256"], audience=OAUTH_AUDIENCE, options={"require": ["exp"]}
                )
            except (jwt.PyJWTError, KeyError):
                with cloud.lock:
                    cloud.refused["jwt-bearer"] += 1
                self.send_json(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
                return
            token = cloud.tokens.issue(
                cloud.token_lifetime, email=claims["iss"], scopes=str(claims.get("scope", "")).split()
            )
            self.send_json(
                200, {"access_token": token, "expires_in": int(cloud.token_lifetime), "token_type": "Bearer"}
            )

        def _federated_principal(self, form: dict[str, str]) -> str | None:
            """The principal an OIDC subject token stands for at a registered provider (None: refused)."""
            provider = cloud.providers.get(form.get("audience", ""))
            if provider is None or form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt":
                return None
            try:
                claims = jwt.decode(
                    form.get("subject_token", ""),
                    provider.public_key,
                    algorithms=["RS256"],
                    audience=provider.allowed_audience,
                    options={"require": ["exp", "sub"]},
                )
            except jwt.PyJWTError:
                return None
            return provider.principal(form["audience"], str(claims["sub"]))

        def _sts_exchange(self, form: dict[str, str]) -> None:
            with cloud.lock:
                cloud.calls["sts:exchange"] += 1
            grant_ok = (
                form.get("grant_type") == "urn:ietf:params:oauth:grant-type:token-exchange"
                and form.get("requested_token_type") == "urn:ietf:params:oauth:token-type:access_token"
                and form.get("audience", "").startswith("//iam.googleapis.com/projects/")
            )
            principal = self._federated_principal(form) if grant_ok else None
            if principal is None and grant_ok and form.get("subject_token") in cloud.subject_tokens:
                principal = f"principal:{form['audience']}"
            if principal is None:
                with cloud.lock:
                    cloud.refused["sts"] += 1
                self.send_json(400, {"error": "invalid_grant", "error_description": "The subject token is invalid."})
                return
            token = cloud.tokens.issue(cloud.token_lifetime, email=principal, scopes=form.get("scope", "").split())
            body = {
                "access_token": token,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
                "expires_in": int(cloud.token_lifetime),
            }
            self.send_json(200, body)

        def _generate_access_token(self, email: str) -> None:
            """The IAM Credentials API: a federated principal gets a token for a service account that trusts it."""
            with cloud.lock:
                cloud.calls[f"iam:generateAccessToken:{email}"] += 1
            grant, _ = cloud.tokens.check(self.bearer())
            raw = self.read_body()
            if grant is None:
                self.send_json(401, {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "bad token"}})
                return
            if grant.claims.get("email") not in cloud.impersonation.get(email, set()):
                with cloud.lock:
                    cloud.refused["impersonation"] += 1
                body = {"code": 403, "status": "PERMISSION_DENIED", "message": "iam.serviceAccounts.getAccessToken"}
                self.send_json(403, {"error": body})
                return
            scopes = json.loads(raw or b"{}").get("scope") or []
            token = cloud.tokens.issue(cloud.token_lifetime, email=email, scopes=list(scopes))
            expire = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=cloud.token_lifetime)
            self.send_json(200, {"accessToken": token, "expireTime": expire.strftime("%Y-%m-%dT%H:%M:%SZ")})

    return Metadata


def secret_manager_handler(cloud: GoogleCloud) -> type[QuietHandler]:
    class SecretManager(QuietHandler):
        def do_GET(self) -> None:
            match = ACCESS.match(urlsplit(self.path).path)
            if not match:
                _error(self, 404, "Method not found.")
                return
            # one-segment path variables arrive percent-encoded (HTTP/JSON transcoding): the id is the decoded one
            project, secret_id, version = (unquote(part) for part in match.groups())
            grant, reason = cloud.tokens.check(self.bearer())
            if grant is None:
                with cloud.lock:
                    cloud.refused[f"token-{reason}"] += 1
                _error(
                    self,
                    401,
                    "Request had invalid authentication credentials. Expected OAuth 2 access token.",
                    **{"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
                )
                return
            if CLOUD_PLATFORM not in grant.claims.get("scopes", []):
                _error(self, 403, "Request had insufficient authentication scopes.")
                return
            with cloud.lock:
                cloud.calls[f"access:{secret_id}"] += 1
                fault = cloud.faults.pop(0) if cloud.faults else None
            if fault:
                status, retry_after = fault
                _error(self, status, "injected", **({"Retry-After": retry_after} if retry_after else {}))
                return
            if project not in (cloud.project_id, cloud.project_number):
                _error(self, 403, f"Permission denied on resource project {project}.")
                return
            if not SECRET_ID.fullmatch(secret_id):
                _error(self, 400, "Invalid secret id.")
                return
            resource = f"projects/{cloud.project_number}/secrets/{secret_id}"
            allowed = cloud.access.get(str(grant.claims.get("email")))
            if secret_id in cloud.denied or (allowed is not None and not secret_id.startswith(allowed)):
                _error(self, 403, f"Permission 'secretmanager.versions.access' denied for resource '{resource}'.")
                return
            with cloud.lock:
                versions = list(cloud.secrets.get(secret_id, []))
            if not versions:
                _error(self, 404, f"Secret [{resource}] not found or has no versions.")
                return
            number = len(versions) if version == "latest" else int(version) if version.isdigit() else 0
            if not 1 <= number <= len(versions):
                _error(self, 404, f"Secret Version [{resource}/versions/{version}] not found.")
                return
            chosen = versions[number - 1]
            if chosen.state != "ENABLED":
                _error(
                    self,
                    400,
                    f"Secret Version [{resource}/versions/{number}] is in {chosen.state} state.",
                    "FAILED_PRECONDITION",
                )
                return
            crc = google_crc32c.value(chosen.data) + (1 if secret_id in cloud.corrupt else 0)
            body = {
                "name": f"{resource}/versions/{number}",
                "payload": {"data": base64.b64encode(chosen.data).decode(), "dataCrc32c": str(crc)},
            }
            self.send_json(200, body)

    return SecretManager


class GcpServers:
    """The metadata server (HTTP) and Secret Manager (HTTPS) on loopback, sharing one ``GoogleCloud``."""

    def __init__(self, ca: TestCA, cloud: GoogleCloud | None = None) -> None:
        self.cloud = cloud or GoogleCloud()
        self.metadata = LoopbackServer(metadata_handler(self.cloud))
        self.secret_manager = LoopbackServer(secret_manager_handler(self.cloud), ca.server_context())
        self.metadata_host = f"127.0.0.1:{self.metadata.port}"

    def env(self) -> dict[str, str]:
        """The environment a GKE pod's process sees, pointed at the local metadata server."""
        return {"GCE_METADATA_HOST": self.metadata_host, "GCE_METADATA_IP": self.metadata_host}

    def stop(self) -> None:
        self.metadata.stop()
        self.secret_manager.stop()
