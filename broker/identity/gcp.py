"""Google access tokens from Application Default Credentials (google-auth), refreshed in the thread pool.

GKE Workload Identity is the metadata server (``compute_engine.Credentials``); clusters outside Google use
an ``external_account`` (workload identity federation) file; development may use a service-account key.
``credentials_file`` names a file of either kind; otherwise google-auth's ADC chain decides
(``GOOGLE_APPLICATION_CREDENTIALS``, then the metadata server). google-auth's HTTP calls are blocking, so
they run in the core's bounded pool, each capped at the backend's timeout.

Node mode (``federation``): workload identity federation with the calling pod's own projected token as the
subject token (google-auth's ``identity_pool`` credentials with a supplier that hands it the freshest
verified token of the identity), then impersonation of ``federation.service_account`` when set. No
credential of the node's is ever read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.backends.base import AccessDenied, BackendContext, BackendError, BackendUnavailable, BrokerError
from broker.identity import TokenSource

if TYPE_CHECKING:
    from broker.backends.gcp_secret_manager import GcpFederation

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_LIFETIME = 3600.0
KINDS = {
    "google.auth.compute_engine.credentials": "metadata server",
    "google.oauth2.service_account": "service account key",
    "google.auth.identity_pool": "external_account",
    "google.auth.aws": "external_account aws",
    "google.auth.pluggable": "external_account executable",
    "google.auth.impersonated_credentials": "impersonated",
}


def _bounded_request(limit: float) -> Any:
    """A google-auth transport whose every call is capped at ``limit`` seconds and ignores environment proxies."""
    import requests
    from google.auth.transport.requests import Request

    class BoundedRequest(Request):
        def __call__(
            self, url: Any, method: Any = "GET", body: Any = None, headers: Any = None, timeout: Any = None, **kw: Any
        ) -> Any:
            capped = min(float(timeout), limit) if timeout else limit
            return super().__call__(  # type: ignore[no-untyped-call]
                url, method=method, body=body, headers=headers, timeout=capped, **kw
            )

    session = requests.Session()
    session.trust_env = False  # identity traffic never goes through an environment proxy
    return BoundedRequest(session)


def map_google_auth_error(exc: BaseException, where: str) -> BrokerError:
    """google-auth's failures onto the error tree. Its messages may quote server answers: never used."""
    from google.auth import exceptions

    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, exceptions.DefaultCredentialsError):
        return BackendError(f"{where}: no Google credentials found (Application Default Credentials)")
    if isinstance(exc, exceptions.TransportError | TimeoutError | ConnectionError):
        return BackendUnavailable(f"{where}: token endpoint unreachable ({type(exc).__name__})")
    if isinstance(exc, exceptions.RefreshError | exceptions.OAuthError):
        if getattr(exc, "retryable", False):
            return BackendUnavailable(f"{where}: token refresh failed, retryable")
        return AccessDenied(f"{where}: token refresh refused")
    if isinstance(exc, OSError | ValueError):
        return BackendError(f"{where}: credentials unusable ({type(exc).__name__})")
    return BackendError(f"{where}: credentials failed ({type(exc).__name__})")


class GoogleTokenSource(TokenSource):
    kind = "google"

    def __init__(
        self,
        backend_name: str,
        ctx: BackendContext,
        *,
        credentials_file: Path | None,
        project_id: str | None,
        timeout: float,
        federation: GcpFederation | None = None,
    ) -> None:
        super().__init__(backend_name, ctx)
        self.credentials_file = credentials_file
        self.federation = federation
        self.timeout = timeout
        self.project_id = project_id  # configured, else what the credentials name
        self._credentials: Any = None
        self._request: Any = None
        self._build_lock = threading.Lock()
        self._inflight: asyncio.Future[tuple[str, float]] | None = None

    def _ensure(self) -> Any:
        """Build the credentials once (ADC may ping the metadata server). Blocking: runs in the pool."""
        with self._build_lock:
            if self._credentials is None:
                import google.auth

                request = _bounded_request(self.timeout)
                if self.ctx.workload_token is not None:
                    credentials, project = self._pod_federation(), self.project_id
                elif self.credentials_file is not None:
                    credentials, project = self._from_file(self.credentials_file, request)
                else:
                    credentials, project = google.auth.default(scopes=[SCOPE], request=request)
                self._request = request
                self._credentials = credentials
                self.project_id = self.project_id or project
            return self._credentials

    def _pod_federation(self) -> Any:
        """Node mode: identity-pool credentials whose subject token is the calling identity's pod token."""
        from google.auth import identity_pool

        federation = self.federation
        if federation is None:
            raise BackendError(f"gcp {self.backend_name}: node mode needs federation (checked by the config)")
        pod_token = self.ctx.pod_token

        class PodToken(identity_pool.SubjectTokenSupplier):
            def get_subject_token(self, context: Any, request: Any) -> str:
                return pod_token()  # AccessDenied when no pod of the identity holds a valid token

        kwargs: dict[str, Any] = {}
        if federation.service_account:
            base = federation.iam_endpoint.rstrip("/")
            kwargs["service_account_impersonation_url"] = (
                f"{base}/v1/projects/-/serviceAccounts/{federation.service_account}:generateAccessToken"
            )
        return identity_pool.Credentials(  # type: ignore[no-untyped-call]
            audience=federation.audience,
            subject_token_type="urn:ietf:params:oauth:token-type:jwt",  # noqa: S106 - a type name, not a secret
            token_url=federation.token_url,
            subject_token_supplier=PodToken(),
            scopes=[SCOPE],
            **kwargs,
        )

    def _from_file(self, path: Path, request: Any) -> tuple[Any, str | None]:
        """A key or ``external_account`` file. The project of an external account is looked up (Resource
        Manager, after a token exchange) only when the config does not name it."""
        import google.auth

        info = json.loads(path.read_text())
        if not isinstance(info, dict) or info.get("type") != "external_account":
            loaded: tuple[Any, str | None] = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call]
                str(path), scopes=[SCOPE]
            )
            return loaded
        source = info.get("credential_source") or {}
        if str(source.get("environment_id", "")).startswith("aws"):
            from google.auth import aws as module
        elif "executable" in source:
            from google.auth import pluggable as module  # type: ignore[no-redef]
        else:
            from google.auth import identity_pool as module  # type: ignore[no-redef]
        credentials = module.Credentials.from_info(info, scopes=[SCOPE])  # type: ignore[no-untyped-call]
        if self.project_id:
            return credentials, self.project_id
        return credentials, credentials.get_project_id(request)

    def _refresh_blocking(self) -> tuple[str, float]:
        credentials = self._ensure()
        credentials.refresh(self._request)
        token = credentials.token
        if not token:
            raise BackendError(f"gcp {self.backend_name}: the credential refresh returned no token")
        expiry: dt.datetime | None = credentials.expiry  # naive UTC, as google-auth keeps it
        if expiry is None:
            return token, DEFAULT_LIFETIME
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        return token, max(0.0, (expiry - now).total_seconds())

    async def _acquire(self) -> tuple[str, float]:
        # A refresh runs in a worker thread that a caller's timeout cannot stop: later callers join the one
        # in flight instead of starting a second refresh of the same credentials.
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self.ctx.run_blocking(self._refresh_blocking))
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.shield(self._inflight)
        except Exception as exc:  # noqa: BLE001 - mapped in one place
            raise map_google_auth_error(exc, f"gcp {self.backend_name}") from None

    def describe(self) -> str:
        credentials = self._credentials
        if credentials is None:
            return "no credentials yet"
        email = getattr(credentials, "service_account_email", None)
        kind = KINDS.get(type(credentials).__module__, type(credentials).__name__)
        if email:
            return f"service_account={email} ({kind})"
        audience = getattr(credentials, "info", {}).get("audience") if hasattr(credentials, "info") else None
        return f"{kind} audience={audience}" if audience else kind
