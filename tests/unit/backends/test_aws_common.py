"""The AWS error table (``broker.backends.aws_common.map_client_error``), the one place Secrets Manager, SSM and
STS failures become broker errors: matched on the error code (moto answers 404 where AWS documents 400), the HTTP
status a fallback for answers without a code; and the one fresh login after an expired token."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from broker.backends import aws_common
from broker.backends.aws_common import map_client_error
from broker.backends.aws_secrets_manager import Backend, SecretsManagerConfig
from broker.backends.base import (
    AccessDenied,
    BackendContext,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BrokerError,
    RateLimited,
    SecretNotFound,
)
from broker.clock import FakeClock
from broker.metrics import Metrics


def client_error(code: str | None, status: int) -> ClientError:
    error = {"Message": "echo s3cr3t"} | ({"Code": code} if code else {})
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetSecretValue")


# AWS error code (None: the answer had none), HTTP status, broker error
TABLE = [
    # not found: only the services' own "no such secret/parameter", whatever the status
    ("ResourceNotFoundException", 400, SecretNotFound),
    ("ResourceNotFoundException", 404, SecretNotFound),  # as moto answers it
    ("ParameterNotFound", 400, SecretNotFound),
    ("ParameterVersionNotFound", 400, SecretNotFound),
    (None, 404, BackendError),  # a 404 without a code is not the service's word
    ("NotFound", 404, BackendError),
    ("UnknownOperationException", 404, BackendError),
    # denied: never "not found", never the next backend
    ("AccessDeniedException", 400, AccessDenied),
    ("AccessDenied", 403, AccessDenied),  # STS (query protocol)
    ("UnrecognizedClientException", 400, AccessDenied),
    ("InvalidClientTokenId", 403, AccessDenied),
    ("InvalidSignatureException", 400, AccessDenied),
    ("SignatureDoesNotMatch", 403, AccessDenied),
    ("IncompleteSignature", 400, AccessDenied),
    ("MissingAuthenticationToken", 403, AccessDenied),
    ("NotAuthorized", 400, AccessDenied),
    ("InvalidIdentityToken", 400, AccessDenied),  # AssumeRoleWithWebIdentity
    ("IDPRejectedClaim", 403, AccessDenied),
    ("ExpiredToken", 400, AccessDenied),  # reaches the table only after the one fresh login
    ("ExpiredTokenException", 400, AccessDenied),
    (None, 403, AccessDenied),  # no known code: the status decides, as for every REST store
    (None, 401, AccessDenied),
    ("OptInRequired", 403, AccessDenied),
    # throttled: retried after a backoff, then stale or 503
    ("ThrottlingException", 400, RateLimited),
    ("Throttling", 400, RateLimited),
    ("TooManyRequestsException", 429, RateLimited),
    ("RequestLimitExceeded", 400, RateLimited),
    ("RequestThrottled", 400, RateLimited),
    ("RequestThrottledException", 400, RateLimited),
    ("ThrottledException", 400, RateLimited),
    ("SlowDown", 503, RateLimited),
    (None, 429, RateLimited),
    ("SomethingNew", 429, RateLimited),
    # unavailable: retried, then stale or 503
    ("InternalServiceError", 500, BackendUnavailable),
    ("InternalServiceErrorException", 500, BackendUnavailable),
    ("InternalServerError", 500, BackendUnavailable),
    ("InternalFailure", 500, BackendUnavailable),
    ("InternalError", 500, BackendUnavailable),
    ("ServiceUnavailable", 503, BackendUnavailable),
    ("ServiceUnavailableException", 503, BackendUnavailable),
    ("IDPCommunicationError", 400, BackendUnavailable),
    ("SomethingNew", 500, BackendUnavailable),
    (None, 502, BackendUnavailable),
    (None, 503, BackendUnavailable),
    # anything else: a backend error, never "not found"
    ("DecryptionFailure", 400, BackendError),
    ("InvalidRequestException", 400, BackendError),  # e.g. a secret scheduled for deletion
    ("InvalidParameterException", 400, BackendError),
    ("InvalidKeyId", 400, BackendError),
    ("ValidationException", 400, BackendError),
    ("SomethingNew", 400, BackendError),
    (None, 400, BackendError),
    (None, 0, BackendError),
]


@pytest.mark.parametrize(("code", "status", "error"), TABLE, ids=[f"{c}-{s}" for c, s, _ in TABLE])
def test_client_error_table(code: str | None, status: int, error: type[BrokerError]) -> None:
    got = map_client_error(client_error(code, status), "sm", "GetSecretValue")
    assert type(got) is error
    assert got.message == f"aws sm: GetSecretValue: {code or f'HTTP {status}'}"  # AWS's message is never quoted


def test_every_code_the_module_knows_has_a_row() -> None:
    known = (
        aws_common.NOT_FOUND | aws_common.DENIED | aws_common.EXPIRED | aws_common.THROTTLED | aws_common.UNAVAILABLE
    )
    assert known <= {code for code, _, _ in TABLE}


OTHER = [
    (ReadTimeoutError(endpoint_url="https://sm"), BackendTimeout),
    (ConnectTimeoutError(endpoint_url="https://sm"), BackendUnavailable),
    (EndpointConnectionError(endpoint_url="https://sm"), BackendUnavailable),
    (ConnectionClosedError(endpoint_url="https://sm"), BackendUnavailable),
    (NoCredentialsError(), AccessDenied),
    (PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), AccessDenied),
    (CredentialRetrievalError(provider="container-role", error_msg="s3cr3t"), BackendUnavailable),
    (NoRegionError(), BackendError),
    (ConnectionResetError(), BackendUnavailable),
    (ValueError("s3cr3t"), BackendError),  # an SDK failure nobody mapped: never "not found"
]


@pytest.mark.parametrize(("exc", "error"), OTHER, ids=[type(e).__name__ for e, _ in OTHER])
def test_sdk_error_table(exc: BaseException, error: type[BrokerError]) -> None:
    got = map_client_error(exc, "sm", "GetSecretValue")
    assert type(got) is error
    assert "s3cr3t" not in got.message and got.message.startswith("aws sm: GetSecretValue")


def test_a_broker_error_raised_inside_the_sdk_is_kept() -> None:
    denied = AccessDenied("node: no valid token of this identity's pods to log in with")
    assert map_client_error(denied, "sm", "credentials") is denied


# ---------------------------------------------------------------------------------------------- expired tokens


class Credentials:
    def get_frozen_credentials(self) -> None:
        return None


class Client:
    """Answers each call with the next of ``outcomes`` (an exception is raised)."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    def get_secret_value(self, **kwargs: Any) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Backend, list[Client]]]:
    """A Secrets Manager backend whose every (re)build of its session installs the next scripted client."""
    clients: list[Client] = []
    with ThreadPoolExecutor(1) as pool:
        ctx = BackendContext(executor=pool, clock=FakeClock(), metrics=Metrics())
        b = Backend(SecretsManagerConfig(name="sm", type="aws_secrets_manager", region_name="us-east-1"), ctx)
        builds: list[Client] = []

        def build() -> None:
            b._client, b._credentials = clients[len(builds)], Credentials()
            builds.append(b._client)

        monkeypatch.setattr(b, "_build", build)
        yield b, clients


def test_an_expired_token_gets_one_fresh_login(backend: Any) -> None:
    b, clients = backend
    clients[:] = [Client([client_error("ExpiredTokenException", 400)]), Client([{"SecretString": "v"}])]
    assert b._invoke("get_secret_value", {"SecretId": "x"}, False) == {"SecretString": "v"}
    assert [c.calls for c in clients] == [1, 1]


def test_a_second_expired_token_is_denied(backend: Any) -> None:
    b, clients = backend
    expired = client_error("ExpiredToken", 400)
    clients[:] = [Client([expired]), Client([expired])]
    with pytest.raises(ClientError) as caught:
        b._invoke("get_secret_value", {"SecretId": "x"}, False)
    assert [c.calls for c in clients] == [1, 1]  # one fresh login, not a loop
    assert type(map_client_error(caught.value, "sm", "GetSecretValue")) is AccessDenied


@pytest.mark.parametrize("code", ["AccessDeniedException", "ThrottlingException", "ResourceNotFoundException"])
def test_other_errors_get_no_new_login(backend: Any, code: str) -> None:
    b, clients = backend
    clients[:] = [Client([client_error(code, 400)])]
    with pytest.raises(ClientError):
        b._invoke("get_secret_value", {"SecretId": "x"}, False)
    assert len(clients) == 1 and clients[0].calls == 1
