"""Secret Manager's error table (``broker.backends.gcp_secret_manager.error_for``): each HTTP status and Google
error status an access call can answer, as the broker error it becomes. "Not found" needs Google's own
``NOT_FOUND``; nothing else ever is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.backends import rest
from broker.backends.base import (
    AccessDenied,
    BackendContext,
    BackendError,
    BackendUnavailable,
    BrokerError,
    RateLimited,
    SecretNotFound,
)
from broker.backends.gcp_secret_manager import Backend, GcpConfig, error_code, error_for
from tests.support.rest_store import check_row, fetch_error, row_ids, scripted

WHAT = "gcp g: airflow-variables-x"

# HTTP status, Google's error status, broker error
TABLE = [
    (404, "NOT_FOUND", SecretNotFound),  # no such secret, or no such version
    (404, None, BackendError),  # a 404 page that is not Google's (a proxy, a wrong endpoint_url)
    (404, "UNIMPLEMENTED", BackendError),
    (403, "PERMISSION_DENIED", AccessDenied),  # never "not found", never the next backend
    (403, None, AccessDenied),
    (401, "UNAUTHENTICATED", AccessDenied),  # after the one fresh token
    (429, "RESOURCE_EXHAUSTED", RateLimited),
    (429, None, RateLimited),
    (400, "INVALID_ARGUMENT", BackendError),
    (400, "FAILED_PRECONDITION", BackendError),  # the version read is disabled or destroyed
    (409, "ABORTED", BackendError),
    (408, None, BackendUnavailable),
    (499, "CANCELLED", BackendError),
    (500, "INTERNAL", BackendUnavailable),
    (501, "UNIMPLEMENTED", BackendUnavailable),
    (502, None, BackendUnavailable),
    (503, "UNAVAILABLE", BackendUnavailable),
    (504, "DEADLINE_EXCEEDED", BackendUnavailable),
    (418, None, BackendError),  # a status nobody documents: a failure, never a miss
]


@pytest.mark.parametrize(("status", "code", "error"), TABLE, ids=row_ids(TABLE))
def test_error_table(status: int, code: str | None, error: type[BrokerError]) -> None:
    got = error_for(status, code, WHAT, "2")
    check_row(got, error, WHAT, status, 2.0)
    assert got.message.startswith(rest.status_message(WHAT, status, code))


def test_failed_precondition_names_the_disabled_version() -> None:
    assert "disabled or destroyed" in error_for(400, "FAILED_PRECONDITION", WHAT).message


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"error": {"code": 404, "message": "Secret [x] not found", "status": "NOT_FOUND"}}, "NOT_FOUND"),
        ({"error": {"code": 403, "status": "PERMISSION_DENIED"}}, "PERMISSION_DENIED"),
        ({"error": {"code": 404, "message": "no status"}}, None),
        ({"error": {"status": "not_upper"}}, None),  # not a canonical status name
        ({"error": {"status": "X" * 40}}, None),  # too long to be one
        ({"error": {"status": 5}}, None),
        ({"error": "NOT_FOUND"}, None),
        ({"status": "NOT_FOUND"}, None),
        ({}, None),  # an error page that was not JSON (rest.request reads it as {})
    ],
)
def test_error_code(body: dict[str, Any], code: str | None) -> None:
    assert error_code(body) == code


@pytest.fixture
async def gcp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Backend, list[rest.Answer]]]:
    """A backend whose access calls get the scripted answers (no network, no token)."""

    def make(ctx: BackendContext) -> Backend:
        return Backend(GcpConfig(name="g", type="gcp_secret_manager", project_id="my-project"), ctx)

    async with scripted(make, monkeypatch) as (backend, answers):

        async def token(refused: str | None = None) -> str:
            return "t"

        monkeypatch.setattr(backend.identity, "token", token)
        yield backend, answers


@pytest.mark.parametrize(("status", "code", "error"), TABLE, ids=row_ids(TABLE))
async def test_fetch_raises_by_the_table(gcp: Any, status: int, code: str | None, error: type[BrokerError]) -> None:
    body = {"error": {"code": status, "message": "echo s3cr3t", "status": code}} if code else {}
    assert type(await fetch_error(*gcp, rest.Answer(status, body, "2", None))) is error
