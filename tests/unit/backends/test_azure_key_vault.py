"""Key Vault's error table (``broker.backends.azure_key_vault.error_for``): each HTTP status and Key Vault error
code a read can answer, as the broker error it becomes. "Not found" needs Key Vault's own ``SecretNotFound``;
nothing else ever is, the challenge request included."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.backends import rest
from broker.backends.azure_key_vault import AzureConfig, Backend, error_code, error_for
from broker.backends.base import (
    AccessDenied,
    BackendContext,
    BackendError,
    BackendUnavailable,
    BrokerError,
    RateLimited,
    SecretNotFound,
)
from tests.support.rest_store import check_row, fetch_error, row_ids, scripted

WHAT = "azure k: airflow-variables-x"

# HTTP status, Key Vault's error code (the inner one when there is one), broker error
TABLE = [
    (404, "SecretNotFound", SecretNotFound),
    (404, "NotFound", BackendError),  # a path the vault does not have (a wrong vault_url): not a missing secret
    (404, None, BackendError),  # a 404 page that is not Key Vault's (a proxy, a private endpoint's gateway)
    (403, "SecretDisabled", AccessDenied),
    (403, "ForbiddenByRbac", AccessDenied),  # never "not found", never the next backend
    (403, "ForbiddenByPolicy", AccessDenied),
    (403, "Forbidden", AccessDenied),
    (403, None, AccessDenied),
    (401, "Unauthorized", AccessDenied),  # after the one new challenge and token
    (429, "Throttled", RateLimited),
    (429, None, RateLimited),
    (400, "BadParameter", BackendError),
    (409, "Conflict", BackendError),
    (408, None, BackendUnavailable),
    (500, "InternalServerError", BackendUnavailable),
    (502, None, BackendUnavailable),
    (503, "ServiceUnavailable", BackendUnavailable),
    (504, None, BackendUnavailable),
    (418, None, BackendError),  # a status nobody documents: a failure, never a miss
]


@pytest.mark.parametrize(("status", "code", "error"), TABLE, ids=row_ids(TABLE))
def test_error_table(status: int, code: str | None, error: type[BrokerError]) -> None:
    check_row(error_for(status, code, WHAT, "2"), error, WHAT, status, 2.0)


def test_a_disabled_secret_is_named() -> None:
    assert error_for(403, "SecretDisabled", WHAT).message == f"{WHAT}: HTTP 403 secret is disabled"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"error": {"code": "SecretNotFound", "message": "A secret with (name/id) x was not found"}}, "SecretNotFound"),
        ({"error": {"code": "Forbidden", "innererror": {"code": "SecretDisabled"}}}, "SecretDisabled"),  # inner wins
        ({"error": {"code": "Forbidden", "innererror": {"code": ""}}}, "Forbidden"),
        ({"error": {"code": "Forbidden", "innererror": "x"}}, "Forbidden"),
        ({"error": {"code": "Not Found"}}, None),  # not a code Key Vault spells
        ({"error": {"code": "Code1"}}, None),
        ({"error": {"code": 404}}, None),
        ({"error": "SecretNotFound"}, None),
        ({}, None),  # an error page that was not JSON (rest.request reads it as {})
    ],
)
def test_error_code(body: dict[str, Any], code: str | None) -> None:
    assert error_code(body) == code


@pytest.fixture
async def vault(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Backend, list[rest.Answer]]]:
    """A backend whose reads (and challenge requests) get the scripted answers: no network, no token."""

    def make(ctx: BackendContext) -> Backend:
        return Backend(AzureConfig(name="k", type="azure_key_vault", vault_url="https://k.vault.azure.net"), ctx)

    async with scripted(make, monkeypatch) as (backend, answers):

        async def get(session: Any, url: str, headers: dict[str, str], what: str) -> rest.Answer:
            return answers.pop(0)

        monkeypatch.setattr(rest, "get", get)
        yield backend, answers


@pytest.mark.parametrize(("status", "code", "error"), TABLE, ids=row_ids(TABLE))
async def test_fetch_raises_by_the_table(vault: Any, status: int, code: str | None, error: type[BrokerError]) -> None:
    vault[0].identity.set_challenge("https://vault.azure.net/.default", "tenant")
    body = {"error": {"code": code, "message": "echo s3cr3t"}} if code else {}
    if code == "SecretDisabled":
        body = {"error": {"code": "Forbidden", "message": "echo s3cr3t", "innererror": {"code": code}}}
    assert type(await fetch_error(*vault, rest.Answer(status, body, "2", None))) is error


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (404, {}, BackendError),  # a wrong vault_url: never "not found"
        (404, {"error": {"code": "SecretNotFound"}}, BackendError),  # the secrets list cannot be a missing secret
        (403, {"error": {"code": "Forbidden"}}, AccessDenied),
        (429, {}, RateLimited),
        (503, {}, BackendUnavailable),
        (200, {"value": []}, BackendError),  # answered without asking for a token: not Key Vault
    ],
)
async def test_the_challenge_request_is_never_not_found(
    vault: Any, status: int, body: dict[str, Any], error: type[BrokerError]
) -> None:
    assert type(await fetch_error(*vault, rest.Answer(status, body, None, None))) is error
