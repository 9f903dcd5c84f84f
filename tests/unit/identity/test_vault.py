"""Vault's token source: each auth method's login request, answer parsing, one login for concurrent callers,
renewal at about 2/3 of the TTL with the login's TTL as increment, a fresh login when the token cannot be renewed,
is refused or is near its max TTL, backoff after failures keeping the old token, and logout in node mode. Vault is
a scripted ``call`` (the backend's HTTP layer is tested against real servers elsewhere); time is a fake clock."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker.backends.base import AccessDenied, BackendContext, BackendError, BackendUnavailable, BrokerError
from broker.clock import FakeClock
from broker.identity import NEVER_EXPIRES_RECHECK
from broker.identity.vault import AuthConfig, VaultTokenSource, login_request, parse_grant, seconds
from broker.metrics import Metrics
from tests.support.polling import until

Answer = dict[str, Any] | BrokerError | Callable[[dict[str, Any]], dict[str, Any]]


class ScriptedVault:
    """Answers each ``(method, path)`` from a queue of answers (the last one repeats); records every call."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[Answer]] = {}
        self.calls: list[dict[str, Any]] = []

    def on(self, method: str, path: str, *answers: Answer) -> None:
        self.answers[(method, path)] = list(answers)

    async def __call__(
        self, method: str, path: str, what: str, *, token: str | None = None, body: Any = None
    ) -> dict[str, Any]:
        call = {"method": method, "path": path, "token": token, "body": body}
        self.calls.append(call)
        queue = self.answers[(method, path)]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, BrokerError):
            raise answer
        return answer(call) if callable(answer) else answer

    def paths(self) -> list[str]:
        return [call["path"] for call in self.calls]


def login_answer(token: str, ttl: float, renewable: bool = True) -> dict[str, Any]:
    return {"auth": {"client_token": token, "lease_duration": ttl, "renewable": renewable}}


def issue(ttl: float, renewable: bool = True) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A login that hands out ``tok-1``, ``tok-2``, ..."""
    issued = [0]

    def answer(call: dict[str, Any]) -> dict[str, Any]:
        issued[0] += 1
        return login_answer(f"tok-{issued[0]}", ttl, renewable)

    return answer


class Rounds:
    """The refresh loop's sleep: records each wait, then lets the loop go on only when the test says so
    (advancing the fake clock by the wait)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []
        self._go = asyncio.Queue[None]()

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        await self._go.get()
        self.clock.advance(seconds)

    async def run(self, rounds: int = 1) -> None:
        """Let the loop take ``rounds`` more rounds and wait until it sleeps again."""
        for _ in range(rounds):
            expected = len(self.waits) + 1
            self._go.put_nowait(None)
            await until(lambda: len(self.waits) >= expected, "the refresh loop to sleep again")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ctx(clock: FakeClock) -> Iterator[BackendContext]:
    pool = ThreadPoolExecutor(1)
    yield BackendContext(executor=pool, clock=clock, metrics=Metrics())
    pool.shutdown()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name, text in {"sa": "sa-jwt\n", "role_id": "rid", "secret_id": "sid-1", "token": "file-token"}.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def approle(files: Path) -> AuthConfig:
    return AuthConfig(method="approle", role_id_file=files / "role_id", secret_id_file=files / "secret_id")


def source(ctx: BackendContext, auth: AuthConfig, vault: ScriptedVault, **kw: Any) -> VaultTokenSource:
    return VaultTokenSource("vault", ctx, auth, vault, **kw)


def metric(ctx: BackendContext, name: str, **labels: str) -> float:
    return ctx.metrics.registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("data", "lookup", "expected"),
    [
        (login_answer("t", 60), False, ("t", 60.0, True)),
        ({"auth": {"client_token": "t", "lease_duration": 0, "renewable": False}}, False, ("t", 0.0, False)),
        ({"auth": {"client_token": "t", "lease_duration": 30, "renewable": "yes"}}, False, ("t", 30.0, False)),
        ({"auth": {"client_token": "", "lease_duration": 30}}, False, (None, 30.0, False)),
        ({"auth": {"lease_duration": 30, "renewable": True}}, False, (None, 30.0, True)),  # renew-self may omit it
        ({"data": {"ttl": 45, "renewable": True, "policies": ["p"]}}, True, (None, 45.0, True)),
        ({"data": {"ttl": 0}}, True, (None, 0.0, False)),  # the root token: never expires
    ],
)
def test_grants_are_parsed(data: dict[str, Any], lookup: bool, expected: tuple[Any, ...]) -> None:
    assert parse_grant(data, "vault v: login", lookup=lookup) == expected


@pytest.mark.parametrize(
    ("data", "lookup"),
    [
        ({}, False),
        ({"auth": None}, False),
        ({"auth": ["client_token"]}, False),
        ({"auth": {"client_token": "t", "lease_duration": "60"}}, False),
        ({"auth": {"client_token": "t", "lease_duration": -1}}, False),
        ({"auth": {"client_token": "t", "lease_duration": True}}, False),
        ({"auth": {"client_token": "t", "lease_duration": float("nan")}}, False),
        ({"auth": {"client_token": "t"}}, True),  # a lookup answers under data
        ({"data": "ttl"}, True),
    ],
)
def test_malformed_grants_are_backend_errors(data: dict[str, Any], lookup: bool) -> None:
    with pytest.raises(BackendError) as caught:
        parse_grant(data, "vault v: login", lookup=lookup)
    assert type(caught.value) is BackendError and caught.value.message.startswith("vault v: login: ")


def test_seconds() -> None:
    assert (seconds(None, "w"), seconds(0, "w"), seconds(12, "w"), seconds(1.5, "w")) == (0.0, 0.0, 12.0, 1.5)
    bad: Any
    for bad in ("12", -3, False, [], float("nan")):
        with pytest.raises(BackendError):
            seconds(bad, "w")


# ---------------------------------------------------------------------------------------------- login requests


async def test_each_method_builds_its_login_request(ctx: BackendContext, files: Path) -> None:
    cases = [
        (AuthConfig(method="kubernetes", role="airflow", token_path=files / "sa"), "auth/kubernetes/login"),
        (AuthConfig(method="jwt", role="airflow", mount="oidc/", token_path=files / "sa"), "auth/oidc/login"),
    ]
    for auth, path in cases:
        assert await login_request(auth, ctx) == (path, {"role": "airflow", "jwt": "sa-jwt"})
    assert await login_request(approle(files), ctx) == ("auth/approle/login", {"role_id": "rid", "secret_id": "sid-1"})


async def test_files_are_read_again_at_every_login(ctx: BackendContext, files: Path) -> None:
    auth = approle(files)
    assert (await login_request(auth, ctx))[1]["secret_id"] == "sid-1"
    (files / "secret_id").write_text("sid-2\n")
    assert (await login_request(auth, ctx))[1]["secret_id"] == "sid-2"


async def test_node_mode_logs_in_with_the_pod_token(ctx: BackendContext, files: Path) -> None:
    ctx.workload_token = lambda: "pod-jwt"
    auth = AuthConfig(method="kubernetes", role="airflow", token_path=files / "absent")
    assert await login_request(auth, ctx) == ("auth/kubernetes/login", {"role": "airflow", "jwt": "pod-jwt"})
    ctx.workload_token = lambda: None
    with pytest.raises(AccessDenied):
        await login_request(auth, ctx)


@pytest.mark.parametrize("content", [None, "", "  \n"])
async def test_unreadable_or_empty_files_name_the_key(ctx: BackendContext, files: Path, content: str | None) -> None:
    if content is None:
        (files / "secret_id").unlink()
    else:
        (files / "secret_id").write_text(content)
    with pytest.raises(BackendError) as caught:
        await login_request(approle(files), ctx)
    assert caught.value.message.startswith("auth.secret_id_file: ")


def test_each_method_requires_its_keys() -> None:
    for method, missing in [
        ("kubernetes", "role"),
        ("approle", "role_id_file, secret_id_file"),
        ("token", "token_file"),
    ]:
        with pytest.raises(ValueError, match=f"{missing}: required for auth method {method}"):
            AuthConfig(method=method)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- logins


async def test_concurrent_callers_share_one_login(ctx: BackendContext, files: Path) -> None:
    vault = ScriptedVault()
    gate = asyncio.Event()
    issued = issue(60)

    async def slow_login(method: str, path: str, what: str, **kw: Any) -> dict[str, Any]:
        vault.calls.append({"path": path})
        await gate.wait()
        return issued({})

    tokens = source(ctx, approle(files), slow_login)  # type: ignore[arg-type]
    callers = [asyncio.create_task(tokens.token()) for _ in range(30)]
    await until(lambda: bool(vault.calls), "the login to start")
    gate.set()
    assert set(await asyncio.gather(*callers)) == {"tok-1"}
    assert vault.paths() == ["auth/approle/login"]
    assert metric(ctx, "broker_logins_total", backend="vault", outcome="ok") == 1
    assert metric(ctx, "broker_identity_expiry_seconds", backend="vault") == 60


async def test_token_method_looks_the_file_token_up(ctx: BackendContext, files: Path) -> None:
    vault = ScriptedVault()
    vault.on("GET", "auth/token/lookup-self", {"data": {"ttl": 0, "renewable": False}})
    tokens = source(ctx, AuthConfig(method="token", token_file=files / "token"), vault)
    assert await tokens.token() == "file-token"
    assert vault.calls == [{"method": "GET", "path": "auth/token/lookup-self", "token": "file-token", "body": None}]
    assert tokens._token is not None and math.isinf(tokens._token.expires_at)
    assert metric(ctx, "broker_identity_expiry_seconds", backend="vault") == -1  # does not expire
    assert tokens._next_wait(0) == NEVER_EXPIRES_RECHECK


async def test_a_login_without_a_token_fails_and_is_counted(ctx: BackendContext, files: Path) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", {"auth": {"lease_duration": 60}}, login_answer("tok", 60))
    tokens = source(ctx, approle(files), vault)
    with pytest.raises(BackendError, match="login answered without a token"):
        await tokens.token()
    assert tokens.not_ready_reason() == "no valid Vault token (backend_error)"
    assert metric(ctx, "broker_logins_total", backend="vault", outcome="failed") == 1
    assert await tokens.token() == "tok" and tokens.not_ready_reason() is None


async def test_a_refused_token_is_replaced_by_a_new_login(ctx: BackendContext, files: Path) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", issue(60))
    tokens = source(ctx, approle(files), vault)
    assert await tokens.token() == "tok-1"
    assert await tokens.token(refused="tok-1") == "tok-2"
    assert await tokens.token(refused="tok-1") == "tok-2"  # a late report of the old token: no new login
    assert vault.paths().count("auth/approle/login") == 2


async def test_accepts_asks_vault_about_the_token(ctx: BackendContext, files: Path) -> None:
    vault = ScriptedVault()
    vault.on("GET", "auth/token/lookup-self", {"data": {"ttl": 10}}, AccessDenied("403"), BackendUnavailable("503"))
    tokens = source(ctx, approle(files), vault)
    assert await tokens.accepts("t") is True  # the 403 was the policy's
    assert await tokens.accepts("t") is False  # the token is gone
    with pytest.raises(BackendUnavailable):
        await tokens.accepts("t")


# ---------------------------------------------------------------------------------------------- renewal


async def started(tokens: VaultTokenSource, clock: FakeClock) -> Rounds:
    """The source logged in, its refresh loop asleep before its first round."""
    rounds = Rounds(clock)
    tokens.backoff.sleep = rounds.sleep
    await tokens.start()
    await until(lambda: bool(rounds.waits), "the refresh loop's first sleep")
    return rounds


async def test_renewal_at_two_thirds_with_the_login_ttl(ctx: BackendContext, clock: FakeClock, files: Path) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", issue(60))
    vault.on("POST", "auth/token/renew-self", login_answer("tok-1", 60))
    tokens = source(ctx, approle(files), vault)
    rounds = await started(tokens, clock)
    try:
        assert 60 * 2 / 3 * 0.9 <= rounds.waits[0] <= 60 * 2 / 3  # jittered, never late
        await rounds.run()
        assert vault.calls[-1] == {
            "method": "POST",
            "path": "auth/token/renew-self",
            "token": "tok-1",
            "body": {"increment": "60s"},
        }
        assert 36 <= rounds.waits[1] <= 40  # measured from the renewal, not the login
        assert await tokens.token() == "tok-1" and tokens.acquisitions == 1
        assert metric(ctx, "broker_logins_total", backend="vault", outcome="renewed") == 1
        await rounds.run(3)
        assert vault.paths().count("auth/token/renew-self") == 4 and tokens.acquisitions == 1
    finally:
        await tokens.aclose()


@pytest.mark.parametrize(
    ("renewal", "min_ttl", "why"),
    [
        (AccessDenied("vault vault: token renew: HTTP 403"), 10.0, "revoked"),
        (login_answer("tok-1", 25), 10.0, "granted less than half of the increment: near max TTL"),
        (login_answer("tok-1", 40), 20.0, "granted no more than twice the minimum TTL"),
    ],
)
async def test_renewal_that_cannot_keep_the_token_logs_in_again(
    ctx: BackendContext, clock: FakeClock, files: Path, renewal: Answer, min_ttl: float, why: str
) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", issue(60))
    vault.on("POST", "auth/token/renew-self", renewal)
    tokens = source(ctx, approle(files), vault, min_ttl=min_ttl)
    rounds = await started(tokens, clock)
    try:
        await rounds.run()
        assert vault.paths() == ["auth/approle/login", "auth/token/renew-self", "auth/approle/login"], why
        assert await tokens.token() == "tok-2"
        assert metric(ctx, "broker_logins_total", backend="vault", outcome="failed") == 0, why
    finally:
        await tokens.aclose()


async def test_a_token_that_is_not_renewable_is_replaced_by_a_login(
    ctx: BackendContext, clock: FakeClock, files: Path
) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", issue(30, renewable=False))
    tokens = source(ctx, approle(files), vault)
    rounds = await started(tokens, clock)
    try:
        await rounds.run(2)
        assert vault.paths() == ["auth/approle/login"] * 3
        assert await tokens.token() == "tok-3"
    finally:
        await tokens.aclose()


async def test_failed_upkeep_backs_off_and_keeps_the_old_token(
    ctx: BackendContext, clock: FakeClock, files: Path
) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", issue(60))
    down = BackendUnavailable("vault vault: token renew: HTTP 503")
    vault.on("POST", "auth/token/renew-self", down, down, login_answer("tok-1", 60))
    tokens = source(ctx, approle(files), vault)
    rounds = await started(tokens, clock)
    try:
        await rounds.run()  # first renewal fails: a backoff wait, never past half of what the token has left
        left = 60 - rounds.waits[0]
        assert 0.5 <= rounds.waits[1] <= min(1.0, left / 2)
        assert await tokens.token() == "tok-1" and tokens.not_ready_reason() is None
        await rounds.run()
        assert 0.5 <= rounds.waits[2] <= 2.0  # the second failure: the ceiling doubles
        await rounds.run()
        assert vault.paths().count("auth/token/renew-self") == 3 and tokens.acquisitions == 1
        assert metric(ctx, "broker_logins_total", backend="vault", outcome="failed") == 2
        assert metric(ctx, "broker_logins_total", backend="vault", outcome="renewed") == 1
    finally:
        await tokens.aclose()


async def test_a_token_near_expiry_is_not_renewed_but_replaced(
    ctx: BackendContext, clock: FakeClock, files: Path
) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", issue(60))
    vault.on("POST", "auth/token/renew-self", login_answer("tok-1", 60))
    tokens = source(ctx, approle(files), vault)
    await tokens.token()
    clock.advance(58)  # past the point where it is handed out
    async with tokens._lock:
        await tokens._refresh(renew=True)
    assert vault.paths() == ["auth/approle/login", "auth/approle/login"]


async def test_node_mode_logs_out_on_close(ctx: BackendContext, files: Path) -> None:
    ctx.workload_token = lambda: "pod-jwt"
    vault = ScriptedVault()
    vault.on("POST", "auth/kubernetes/login", issue(60))
    vault.on("POST", "auth/token/revoke-self", BackendUnavailable("down"))
    tokens = source(ctx, AuthConfig(method="kubernetes", role="airflow"), vault)
    await tokens.start()
    await tokens.aclose()  # a logout that fails is not an error of the close
    assert vault.calls[-1] == {"method": "POST", "path": "auth/token/revoke-self", "token": "tok-1", "body": None}
    assert tokens.not_ready_reason() is not None


async def test_outside_node_mode_close_does_not_log_out(ctx: BackendContext, files: Path) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", issue(60))
    tokens = source(ctx, approle(files), vault)
    await tokens.start()
    await tokens.aclose()
    assert vault.paths() == ["auth/approle/login"]


async def test_no_token_or_file_content_in_logs_or_repr(
    ctx: BackendContext, files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vault = ScriptedVault()
    vault.on("POST", "auth/approle/login", {"auth": {"lease_duration": 1}}, login_answer("tok-secret-value", 60))
    tokens = source(ctx, approle(files), vault)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(BackendError):
            await tokens.token()
        await tokens.token()
    texts = [repr(tokens._token), *(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)]
    assert caplog.records and not any("tok-secret-value" in t or "sid-1" in t for t in texts)
