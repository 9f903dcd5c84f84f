"""The one HTTP layer (``broker.backends.rest``): the shared status -> error table every REST store starts from, a
"not found" that needs the store's own word, ``Retry-After``, and the one fresh token after a refused one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pytest

from broker.backends import rest, vault
from broker.backends.base import (
    AccessDenied,
    BackendConfig,
    BackendContext,
    BackendError,
    BackendUnavailable,
    BrokerError,
    Kind,
    RateLimited,
    SecretNotFound,
    SecretValue,
)
from broker.backends.vault import vault_says_missing
from broker.clock import FakeClock
from broker.metrics import Metrics

WHAT = "store s: read p"

# status, the store's own "no such secret", error, retried (transient)
TABLE = [
    (400, True, BackendError),
    (401, True, AccessDenied),  # after the one fresh token (RestBackend.authorized)
    (403, True, AccessDenied),  # never "not found", never the next backend
    (404, True, SecretNotFound),
    (404, False, BackendError),  # a proxy's or a load balancer's 404 page: a failure, not a miss
    (405, True, BackendError),
    (408, True, BackendUnavailable),
    (409, True, BackendError),
    (410, True, BackendError),  # gone is not the store's "not found" either
    (412, True, BackendError),  # Vault adds its own entry (tests/unit/backends/test_vault.py)
    (418, True, BackendError),
    (429, True, RateLimited),
    (499, True, BackendError),
    (500, True, BackendUnavailable),
    (501, True, BackendUnavailable),
    (502, True, BackendUnavailable),
    (503, True, BackendUnavailable),
    (504, True, BackendUnavailable),
    (599, True, BackendUnavailable),
]


@pytest.mark.parametrize(("status", "missing", "error"), TABLE, ids=[f"{s}-{m}" for s, m, _ in TABLE])
def test_shared_status_table(status: int, missing: bool, error: type[BrokerError]) -> None:
    got = rest.error_for(status, "m", "4", store_says_missing=missing)
    assert type(got) is error
    assert got.transient == (error in (BackendUnavailable, RateLimited))
    # Retry-After is kept where the call is retried, so the retry waits at least that long.
    assert got.retry_after == (4.0 if got.transient else None)


@pytest.mark.parametrize("status", range(400, 600))
def test_no_status_but_404_is_ever_not_found(status: int) -> None:
    for missing in (True, False):
        got = rest.error_for(status, "m", store_says_missing=missing)
        assert isinstance(got, SecretNotFound) == (status == 404 and missing)


@pytest.mark.parametrize(("status", "code"), [(403, None), (404, "NOT_FOUND"), (503, "UNAVAILABLE")])
def test_messages_name_status_and_code_never_the_body(status: int, code: str | None) -> None:
    answer = rest.Answer(status, {"error": {"message": "s3cr3t echoed back"}}, None, None)
    with pytest.raises(BrokerError) as caught:
        rest.raise_for_status(answer, WHAT, code, store_says_missing=code == "NOT_FOUND")
    assert caught.value.message == rest.status_message(WHAT, status, code)
    assert caught.value.message.startswith(f"{WHAT}: HTTP {status}")
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize("status", [200, 201, 204, 302, 399])
def test_answers_below_400_raise_nothing(status: int) -> None:
    rest.raise_for_status(rest.Answer(status, {}, None, None), WHAT)


def test_a_404_is_not_found_only_with_the_store_word() -> None:
    """The safe answer is the default: a store that does not pass its word cannot turn a failure into a miss."""
    for rule in ({}, {"store_says_missing": False}):
        with pytest.raises(BackendError, match="not the store's own not-found answer") as caught:
            rest.raise_for_status(rest.Answer(404, {}, None, None), WHAT, **rule)
        assert type(caught.value) is BackendError
        assert type(rest.error_for(404, "m", **rule)) is BackendError
    with pytest.raises(SecretNotFound):
        rest.raise_for_status(rest.Answer(404, {}, None, None), WHAT, store_says_missing=True)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 12 ", 12.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # a date already past: no wait, never negative
        ("soon", None),
        ("-3", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    assert rest.parse_retry_after(header, now=1445412470.0) == seconds


# ---------------------------------------------------------------------------------------------- refused tokens


class FakeConfig(BackendConfig):
    type: Literal["fake_rest"] = "fake_rest"


class FakeIdentity:
    """Hands out tok-1, tok-2, ...; a refused token is replaced by the next."""

    def __init__(self) -> None:
        self.issued = 0
        self.refused: list[str] = []

    async def token(self, refused: str | None = None) -> str:
        if refused is not None or not self.issued:
            if refused is not None:
                self.refused.append(refused)
            self.issued += 1
        return f"tok-{self.issued}"

    def not_ready_reason(self) -> str | None:
        return None

    async def aclose(self) -> None:
        return None


class Store(rest.RestBackend):
    config_model = FakeConfig
    retry_refused = True

    def locate(self, kind: Kind, name: str) -> str | None:
        return name

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        raise NotImplementedError

    async def _on_unauthorized(self, answer: rest.Answer, what: str, token: str) -> bool:
        return self.retry_refused


@pytest.fixture
async def store(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Store, list[int], list[str]]]:
    """A store whose requests get the scripted statuses in turn; the tokens they carried are recorded."""
    statuses: list[int] = []
    sent: list[str] = []

    async def request(
        session: Any, method: str, url: str, headers: dict[str, str], what: str, *, body: Any = None
    ) -> rest.Answer:
        sent.append(headers["Authorization"])
        return rest.Answer(statuses.pop(0), {}, None, None)

    monkeypatch.setattr(rest, "request", request)
    with ThreadPoolExecutor(1) as pool:
        ctx = BackendContext(executor=pool, clock=FakeClock(), metrics=Metrics())
        s = Store(FakeConfig(name="s"), ctx, "http://127.0.0.1:1")
        s.identity = FakeIdentity()  # type: ignore[assignment]
        yield s, statuses, sent
        await s.aclose()


async def test_a_refused_token_gets_one_fresh_token_and_one_more_try(store: Any) -> None:
    s, statuses, sent = store
    statuses[:] = [401, 200]
    answer = await s.authorized_get("http://127.0.0.1:1/x", WHAT)
    assert answer.status == 200
    assert sent == ["Bearer tok-1", "Bearer tok-2"]
    assert s.identity.refused == ["tok-1"]


async def test_a_second_refusal_stands_and_is_denied(store: Any) -> None:
    s, statuses, sent = store
    statuses[:] = [401, 401]
    answer = await s.authorized_get("http://127.0.0.1:1/x", WHAT)
    assert len(sent) == 2  # one fresh token, not a loop
    with pytest.raises(AccessDenied):
        rest.raise_for_status(answer, WHAT)


@pytest.mark.parametrize("status", [403, 404, 429, 500])
async def test_other_errors_are_not_retried_with_a_new_token(store: Any, status: int) -> None:
    s, statuses, sent = store
    statuses[:] = [status]
    assert (await s.authorized_get("http://127.0.0.1:1/x", WHAT)).status == status
    assert sent == ["Bearer tok-1"] and s.identity.refused == []


async def test_a_store_may_let_a_refusal_stand(store: Any) -> None:
    s, statuses, sent = store
    s.retry_refused = False  # e.g. Vault, when the token is still good and the policy denies the path
    statuses[:] = [401]
    assert (await s.authorized_get("http://127.0.0.1:1/x", WHAT)).status == 401
    assert sent == ["Bearer tok-1"]


# ---------------------------------------------------------------------------------------------- the store's word


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        ({"errors": []}, True),  # Vault's answer to a path with no secret
        ({"errors": ["no handler for route"]}, True),
        ({"data": {"data": None, "metadata": {"deletion_time": "2026-01-01T00:00:00Z"}}}, True),  # KV v2 deleted
        ({}, False),  # a 404 page that was not JSON (rest.request reads it as {})
        ({"error": "not found"}, False),  # JSON, but not Vault's
        ({"errors": "x"}, False),
        ({"data": "x"}, False),
    ],
)
def test_vaults_own_404(body: dict[str, Any], missing: bool) -> None:
    assert vault_says_missing(body) is missing
    with pytest.raises(SecretNotFound if missing else BackendError):
        vault.raise_for_status(rest.Answer(404, body, None, None), WHAT)
