"""What the per-store error-table tests of the REST stores (GCP Secret Manager, Azure Key Vault) share: row ids,
the check of one row's error, and a backend whose reads get scripted answers (no network)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

import pytest

from broker.backends import rest
from broker.backends.base import Backend, BackendContext, BrokerError, Kind
from broker.clock import FakeClock
from broker.metrics import Metrics

B = TypeVar("B", bound=Backend)


def row_ids(table: list[tuple[int, str | None, type[BrokerError]]]) -> list[str]:
    """Test ids for a table of (HTTP status, the store's error code, broker error) rows."""
    return [f"{status}-{code}" for status, code, _ in table]


def check_row(got: BrokerError, error: type[BrokerError], what: str, status: int, retry_after: float) -> None:
    """One row's error: its type, a message naming the call and the status, and ``Retry-After`` kept only where
    the call is retried."""
    assert type(got) is error
    assert got.message.startswith(f"{what}: HTTP {status}")
    assert got.retry_after == (retry_after if got.transient else None)


@asynccontextmanager
async def scripted(
    make: Callable[[BackendContext], B], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[B, list[rest.Answer]]]:
    """A backend built by ``make`` whose token-carrying reads get the answers the test appends, in order."""
    answers: list[rest.Answer] = []
    with ThreadPoolExecutor(1) as pool:
        backend = make(BackendContext(executor=pool, clock=FakeClock(), metrics=Metrics()))

        async def authorized_get(url: str, what: str) -> rest.Answer:
            return answers.pop(0)

        monkeypatch.setattr(backend, "authorized_get", authorized_get)
        yield backend, answers
        await backend.aclose()


async def fetch_error(backend: Backend, answers: list[rest.Answer], answer: rest.Answer) -> BrokerError:
    """The error a variable read raises when the store gives ``answer``; the body is never quoted."""
    answers.append(answer)
    with pytest.raises(BrokerError) as caught:
        await backend.fetch(Kind.VARIABLE, "airflow-variables-x")
    assert "s3cr3t" not in str(caught.value)
    return caught.value
