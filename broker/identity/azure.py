"""Microsoft Entra access tokens with azure-identity's async credentials (aiohttp, on the event loop).

``workload_identity`` (AKS: ``AZURE_CLIENT_ID``, ``AZURE_TENANT_ID``, ``AZURE_FEDERATED_TOKEN_FILE``,
``AZURE_AUTHORITY_HOST`` injected by the webhook), ``managed_identity`` or ``default``
(``DefaultAzureCredential``). The scope and tenant come from Key Vault's 401 challenge, so the token
source is told them before the first token is asked for.

Node mode: ``workload_identity`` with the calling pod's own projected token as the client assertion
(azure-identity's ``ClientAssertionCredential``, handed the freshest verified token of the identity) and the
identity's ``client_id`` and ``tenant_id``; the app's federated credential (issuer, subject, audience) decides
whether Entra accepts it. No environment of the broker's pod is read for it, except ``AZURE_AUTHORITY_HOST``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from broker.backends.base import AccessDenied, BackendContext, BackendError, BackendUnavailable, BrokerError
from broker.identity import TokenSource

CredentialKind = Literal["workload_identity", "managed_identity", "default"]
WORKLOAD_ENV = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE")


def map_azure_error(exc: BaseException, where: str) -> BrokerError:
    """azure-identity / azure-core failures onto the error tree (their messages quote server answers: unused)."""
    from azure.core import exceptions as core
    from azure.identity import CredentialUnavailableError

    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, CredentialUnavailableError):
        return BackendError(f"{where}: Azure credential unavailable in this pod ({type(exc).__name__})")
    if isinstance(exc, core.ServiceRequestError | core.ServiceResponseError | TimeoutError | ConnectionError):
        return BackendUnavailable(f"{where}: token endpoint unreachable ({type(exc).__name__})")
    if isinstance(exc, core.ClientAuthenticationError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return BackendUnavailable(f"{where}: token endpoint answered HTTP {status}")
        return AccessDenied(f"{where}: token request refused" + (f" (HTTP {status})" if status else ""))
    if isinstance(exc, core.HttpResponseError):
        status = exc.status_code
        if status is not None and (status >= 500 or status == 429):
            return BackendUnavailable(f"{where}: token endpoint answered HTTP {status}")
        return AccessDenied(f"{where}: token request refused (HTTP {status})")
    if isinstance(exc, ValueError | OSError):
        return BackendError(f"{where}: credential configuration unusable ({type(exc).__name__})")
    return BackendError(f"{where}: credential failed ({type(exc).__name__})")


class AzureTokenSource(TokenSource):
    kind = "entra"

    def __init__(
        self,
        backend_name: str,
        ctx: BackendContext,
        *,
        credential: CredentialKind,
        client_id: str | None,
        tenant_id: str | None,
    ) -> None:
        super().__init__(backend_name, ctx)
        self.credential_kind = credential
        self.client_id = client_id
        self.tenant_id = tenant_id
        self.scope: str | None = None
        self.challenge_tenant: str | None = None
        self._credential: Any = None

    def set_challenge(self, scope: str, tenant: str | None) -> None:
        """What Key Vault asked for. A different scope or tenant drops the token held for the old one."""
        if (scope, tenant) != (self.scope, self.challenge_tenant):
            self.scope, self.challenge_tenant = scope, tenant
            self._token = None

    def _build(self) -> Any:
        from azure.identity.aio import (
            ClientAssertionCredential,
            DefaultAzureCredential,
            ManagedIdentityCredential,
            WorkloadIdentityCredential,
        )

        where = f"azure {self.backend_name}"
        if self.ctx.workload_token is not None:
            if self.credential_kind != "workload_identity" or not (self.client_id and self.tenant_id):
                raise BackendError(f"{where}: node mode needs workload_identity, client_id and tenant_id")
            return ClientAssertionCredential(self.tenant_id, self.client_id, self.ctx.pod_token)
        if self.credential_kind == "workload_identity":
            missing = [
                name
                for name, given in zip(WORKLOAD_ENV, (self.client_id, self.tenant_id, None), strict=True)
                if not (given or os.environ.get(name))
            ]
            if missing:
                raise BackendError(f"{where}: workload identity needs {', '.join(missing)} (set by the AKS webhook)")
            return WorkloadIdentityCredential(
                tenant_id=self.tenant_id or os.environ["AZURE_TENANT_ID"],
                client_id=self.client_id or os.environ["AZURE_CLIENT_ID"],
                token_file_path=os.environ["AZURE_FEDERATED_TOKEN_FILE"],
            )
        if self.credential_kind == "managed_identity":
            return (
                ManagedIdentityCredential(client_id=self.client_id) if self.client_id else ManagedIdentityCredential()
            )
        kwargs: dict[str, Any] = {}
        if self.client_id:
            kwargs["managed_identity_client_id"] = self.client_id
            kwargs["workload_identity_client_id"] = self.client_id
        if self.tenant_id:
            kwargs["workload_identity_tenant_id"] = self.tenant_id
        return DefaultAzureCredential(**kwargs)

    async def _discard(self) -> None:
        # azure-identity would hand back its cached copy of the refused token: start from a clean cache.
        if self._credential is not None:
            old, self._credential = self._credential, None
            await old.close()

    async def _acquire(self) -> tuple[str, float]:
        where = f"azure {self.backend_name}"
        if self.scope is None:
            raise BackendError(f"{where}: no scope yet (Key Vault has not sent its challenge)")
        try:
            if self._credential is None:
                self._credential = self._build()
            kwargs = {"tenant_id": self.challenge_tenant} if self.challenge_tenant else {}
            access = await self._credential.get_token(self.scope, **kwargs)
        except Exception as exc:  # noqa: BLE001 - mapped in one place
            raise map_azure_error(exc, where) from None
        return access.token, max(0.0, float(access.expires_on) - self.ctx.clock.wall())

    def describe(self) -> str:
        client = self.client_id or os.environ.get("AZURE_CLIENT_ID") or "system-assigned"
        tenant = self.challenge_tenant or self.tenant_id or os.environ.get("AZURE_TENANT_ID") or "?"
        return f"{self.credential_kind} client_id={client} tenant={tenant}"

    async def aclose(self) -> None:
        await super().aclose()
        if self._credential is not None:
            await self._credential.close()
            self._credential = None
