"""The Vault plug-in: its status table, KV v1/v2 and dynamic answer parsing, leases, and the requests it builds
(headers, paths, bodies, the one re-login for a refused token and none for a path the policy denies), the last
against a small Vault-like server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from broker.backends import rest
from broker.backends.base import (
    AccessDenied,
    BackendContext,
    BackendError,
    BackendUnavailable,
    BrokerError,
    Kind,
    Lease,
    RateLimited,
    SecretNotFound,
)
from broker.backends.vault import (
    STATUS_ERRORS,
    Backend,
    DynamicConnection,
    VaultConfig,
    parse_dynamic,
    parse_kv,
    parse_lease,
    raise_for_status,
    render,
)
from broker.clock import FakeClock
from broker.metrics import Metrics

C, V, CFG = Kind.CONNECTION, Kind.VARIABLE, Kind.CONFIG
WHAT = "vault v: read p"

# ---------------------------------------------------------------------------------------------- status table


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BackendError),  # a request Vault cannot parse: ours to fix, not worth a retry
        (401, AccessDenied),
        (403, AccessDenied),  # bad token or a policy deny: never "not found"
        (404, SecretNotFound),
        (405, BackendError),
        (408, BackendUnavailable),
        (412, BackendUnavailable),  # Enterprise: this node has not caught up yet
        (429, RateLimited),  # a rate-limit quota
        (473, BackendError),  # performance standby redirect we do not follow
        (500, BackendUnavailable),
        (502, BackendUnavailable),
        (503, BackendUnavailable),  # sealed, or a standby
    ],
)
def test_status_table(status: int, error: type[BrokerError]) -> None:
    with pytest.raises(BrokerError) as caught:
        raise_for_status(rest.Answer(status, {"errors": ["echoed input"]}, "3", None), WHAT)
    assert type(caught.value) is error
    assert caught.value.message == f"{WHAT}: HTTP {status}"  # the body is never quoted
    if error in (RateLimited, BackendUnavailable):
        assert caught.value.retry_after == 3.0


def test_412_is_vaults_own_entry() -> None:
    assert type(rest.error_for(412, "m")) is BackendError  # the shared table, as GCP and Azure read it
    assert type(rest.error_for(412, "m", table=STATUS_ERRORS)) is BackendUnavailable
    raise_for_status(rest.Answer(204, {}, None, None), WHAT)  # a success raises nothing


# ---------------------------------------------------------------------------------------------- KV answers


def kv2(data: Any, version: Any = 3, **meta: Any) -> dict[str, Any]:
    return {"data": {"data": data, "metadata": {"version": version, **meta}}, "lease_id": "", "lease_duration": 0}


@pytest.mark.parametrize(
    ("kind", "engine", "answer", "value", "version"),
    [
        (V, 2, kv2({"value": "v1"}), "v1", "3"),
        (CFG, 2, kv2({"value": "c", "other": 1}), "c", "3"),
        (V, 2, kv2({"value": {"a": [1]}}), '{"a": [1]}', "3"),  # not a string: JSON, as the provider's json.dumps
        (V, 2, kv2({"value": 5}, version=None), "5", None),
        (V, 2, kv2({"value": "v"}, version="7"), "v", None),  # a version that is not a number is not shown
        (C, 2, kv2({"conn_uri": "postgres://u:p@h/db"}), "postgres://u:p@h/db", "3"),
        (C, 2, kv2({"conn_type": "http", "host": "h"}), {"conn_type": "http", "host": "h"}, "3"),
        (V, 1, {"data": {"value": "v1"}, "lease_duration": 2764800}, "v1", None),
        (C, 1, {"data": {"conn_uri": "mysql://h"}}, "mysql://h", None),
        (C, 1, {"data": {"login": "u", "ttl": "1h"}}, {"login": "u", "ttl": "1h"}, None),
    ],
)
def test_kv_answers(kind: Kind, engine: int, answer: dict[str, Any], value: Any, version: str | None) -> None:
    parsed = parse_kv(kind, engine, answer, WHAT)
    assert (parsed.value, parsed.version, parsed.lease, parsed.ttl_hint) == (value, version, None, None)


@pytest.mark.parametrize(
    ("kind", "engine", "answer", "message"),
    [
        (V, 2, {}, "unexpected KV v2 answer"),
        (V, 2, {"data": ["value"]}, "unexpected KV v2 answer"),
        (V, 2, {"data": {"value": "v1"}}, "answer has no data object"),  # a v1 answer on a v2 mount
        (V, 2, kv2(None), "answer has no data object"),  # no data and not deleted: not Vault's "not found"
        (V, 2, kv2("text"), "answer has no data object"),
        (V, 1, {}, "answer has no data object"),
        (V, 1, {"data": "value"}, "answer has no data object"),
        (V, 1, {"data": {"val": "x"}}, "the secret has no key 'value'"),
        (C, 2, kv2({"conn_uri": 7}), "conn_uri is not a string"),
    ],
)
def test_kv_answers_without_the_data_are_failures(
    kind: Kind, engine: int, answer: dict[str, Any], message: str
) -> None:
    with pytest.raises(BrokerError) as caught:
        parse_kv(kind, engine, answer, WHAT)
    assert type(caught.value) is BackendError and caught.value.message == f"{WHAT}: {message}"


@pytest.mark.parametrize("meta", [{"deletion_time": "2026-01-01T00:00:00Z"}, {"destroyed": True}])
def test_a_deleted_current_version_is_not_found(meta: dict[str, Any]) -> None:
    with pytest.raises(SecretNotFound):
        parse_kv(V, 2, kv2(None, **meta), WHAT)


# ---------------------------------------------------------------------------------------------- leases


@pytest.mark.parametrize(
    ("answer", "asked", "expected"),
    [
        (
            {"lease_id": "database/creds/a/x1", "lease_duration": 9, "renewable": True},
            None,
            ("database/creds/a/x1", 9.0, True),
        ),
        ({"lease_id": "database/creds/a/x1", "lease_duration": 9}, None, ("database/creds/a/x1", 9.0, False)),
        ({"lease_id": "database/creds/a/x1", "renewable": "true"}, None, ("database/creds/a/x1", 0.0, False)),
        ({"lease_duration": 5, "renewable": True}, "database/creds/a/x1", ("database/creds/a/x1", 5.0, True)),
        ({"lease_id": "", "lease_duration": 5}, "database/creds/a/x1", ("database/creds/a/x1", 5.0, False)),
    ],
)
def test_leases(answer: dict[str, Any], asked: str | None, expected: tuple[Any, ...]) -> None:
    lease = parse_lease(answer, 100.0, WHAT, lease_id=asked)
    assert lease is not None
    assert (lease.lease_id, lease.duration, lease.renewable, lease.issued_at, lease.expires_at) == (
        *expected,
        100.0,
        100.0 + expected[1],
    )
    assert "x1" not in repr(lease)


def test_no_lease() -> None:
    assert parse_lease({"lease_id": "", "lease_duration": 2764800}, 0.0, WHAT) is None
    assert parse_lease({}, 0.0, WHAT) is None


@pytest.mark.parametrize(
    "answer",
    [
        {"lease_id": 12, "lease_duration": 9},
        {"lease_id": "l/1", "lease_duration": "9"},
        {"lease_id": "l/1", "lease_duration": -9},
    ],
)
def test_malformed_leases(answer: dict[str, Any]) -> None:
    with pytest.raises(BackendError):
        parse_lease(answer, 0.0, WHAT)


SPEC = DynamicConnection(
    path="database/creds/airflow",
    fields={
        "conn_type": "postgres",
        "login": "{{ username }}",
        "password": "{{password}}",
        "extra": {"u": ["{{ username }}"]},
    },
)


def test_dynamic_answer_with_a_lease() -> None:
    answer = {
        "lease_id": "database/creds/airflow/h1",
        "lease_duration": 9,
        "renewable": True,
        "data": {"username": "v-u", "password": "p-9"},
    }
    value = parse_dynamic(SPEC, answer, 50.0, WHAT)
    assert value.value == {"conn_type": "postgres", "login": "v-u", "password": "p-9", "extra": {"u": ["v-u"]}}
    assert value.lease == Lease("database/creds/airflow/h1", 9.0, True, 50.0) and value.ttl_hint is None


def test_dynamic_answer_without_a_lease_bounds_the_cache_entry() -> None:
    value = parse_dynamic(
        SPEC, {"lease_id": "", "lease_duration": 30, "data": {"username": "u", "password": "p"}}, 0, WHAT
    )
    assert (value.lease, value.ttl_hint) == (None, 30.0)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"lease_id": "l/1"}, "answer has no data"),
        ({"data": ["username"]}, "answer has no data"),
        ({"data": {"username": "u"}}, "the secret has no key 'password' for the connection template"),
    ],
)
def test_dynamic_answers_without_the_data(answer: dict[str, Any], message: str) -> None:
    with pytest.raises(BackendError) as caught:
        parse_dynamic(SPEC, answer, 0, WHAT)
    assert caught.value.message == f"{WHAT}: {message}"


def test_render_substitutes_and_evaluates_nothing() -> None:
    fields = {"login": "{{ username }}-{{username}}", "port": 5432, "extra": "{{ password.__class__ }}"}
    assert render(fields, {"username": "u"}, WHAT) == {
        "login": "u-u",
        "port": 5432,
        "extra": "{{ password.__class__ }}",
    }


# ---------------------------------------------------------------------------------------------- requests


class FakeVault:
    """Enough of Vault's HTTP API to see the plug-in's requests: AppRole login, token lookup and renewal, KV v2
    reads, a policy-denied path, leases. Tokens can be revoked by the test."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.issued = 0
        self.seen: list[tuple[str, str, dict[str, str], Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeVault:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.seen]

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read() or b"null")
        self.seen.append((request.method, request.path, dict(request.headers), body))
        path = request.path
        if path == "/v1/auth/approle/login":
            self.issued += 1
            token = f"tok-{self.issued}"
            self.tokens.add(token)
            return web.json_response({"auth": {"client_token": token, "lease_duration": 600, "renewable": True}})
        if request.headers.get("X-Vault-Token") not in self.tokens:
            return web.json_response({"errors": ["permission denied"]}, status=403)
        if path == "/v1/auth/token/lookup-self":
            return web.json_response({"data": {"ttl": 590, "renewable": True, "policies": ["default", "airflow-read"]}})
        if path == "/v1/secret/data/variables/forbidden":
            return web.json_response({"errors": ["permission denied"]}, status=403)
        if path == "/v1/secret/data/variables/plain":
            return web.json_response(kv2({"value": "plain-value"}))
        if path == "/v1/sys/leases/renew":
            return web.json_response({"lease_id": body["lease_id"], "lease_duration": 7, "renewable": True})
        if path == "/v1/sys/leases/revoke":
            return web.Response(status=204)
        return web.json_response({"errors": []}, status=404)


@pytest.fixture
async def fake_vault() -> AsyncIterator[FakeVault]:
    server = await FakeVault().start()
    yield server
    await server.stop()


@pytest.fixture
def ctx() -> Iterator[BackendContext]:
    pool = ThreadPoolExecutor(1)
    yield BackendContext(executor=pool, clock=FakeClock(), metrics=Metrics())
    pool.shutdown()


@pytest.fixture
async def vault(fake_vault: FakeVault, ctx: BackendContext, tmp_path: Path) -> AsyncIterator[Backend]:
    (tmp_path / "rid").write_text("role")
    (tmp_path / "sid").write_text("secret")
    config = VaultConfig.model_validate(
        {
            "name": "v",
            "type": "vault",
            "url": fake_vault.url,
            "namespace": "team-a",
            "auth": {
                "method": "approle",
                "role_id_file": str(tmp_path / "rid"),
                "secret_id_file": str(tmp_path / "sid"),
            },
        }
    )
    backend = Backend(config, ctx)
    yield backend
    await backend.aclose()


async def test_requests_carry_vaults_headers_and_the_token(vault: Backend, fake_vault: FakeVault) -> None:
    assert (await vault.fetch(V, "variables/plain")).value == "plain-value"
    (_, login, login_headers, login_body), (_, read, headers, _) = fake_vault.seen
    assert (login, read) == ("/v1/auth/approle/login", "/v1/secret/data/variables/plain")
    assert login_body == {"role_id": "role", "secret_id": "secret"} and "X-Vault-Token" not in login_headers
    assert headers["X-Vault-Token"] == "tok-1" and headers["X-Vault-Request"] == "true"
    assert headers["X-Vault-Namespace"] == "team-a" and headers["User-Agent"] == rest.USER_AGENT


async def test_a_policy_deny_costs_one_lookup_and_no_login(vault: Backend, fake_vault: FakeVault) -> None:
    for _ in range(3):
        with pytest.raises(AccessDenied):
            await vault.fetch(V, "variables/forbidden")
    assert fake_vault.issued == 1
    assert fake_vault.paths()[1:3] == ["/v1/secret/data/variables/forbidden", "/v1/auth/token/lookup-self"]


async def test_a_revoked_token_gets_one_login_and_one_retry(vault: Backend, fake_vault: FakeVault) -> None:
    await vault.fetch(V, "variables/plain")
    fake_vault.tokens.clear()
    del fake_vault.seen[:]
    assert (await vault.fetch(V, "variables/plain")).value == "plain-value"
    assert fake_vault.paths() == [
        "/v1/secret/data/variables/plain",
        "/v1/auth/token/lookup-self",
        "/v1/auth/approle/login",
        "/v1/secret/data/variables/plain",
    ]
    assert fake_vault.seen[-1][2]["X-Vault-Token"] == "tok-2"


async def test_not_found_is_vaults_404_only(vault: Backend, fake_vault: FakeVault) -> None:
    with pytest.raises(SecretNotFound):
        await vault.fetch(V, "variables/absent")


async def test_lease_renew_and_revoke(vault: Backend, fake_vault: FakeVault, ctx: BackendContext) -> None:
    lease = Lease("database/creds/airflow/h1", 9.0, True, 0.0)
    renewed = await vault.renew(lease, increment=30)
    assert renewed == Lease("database/creds/airflow/h1", 7.0, True, ctx.clock.now())
    await vault.revoke(lease)
    assert [(m, p, b) for m, p, _, b in fake_vault.seen[1:]] == [
        ("PUT", "/v1/sys/leases/renew", {"lease_id": "database/creds/airflow/h1", "increment": 30}),
        ("PUT", "/v1/sys/leases/revoke", {"lease_id": "database/creds/airflow/h1"}),
    ]


async def test_check_names_the_identity_and_policies(vault: Backend) -> None:
    line = await vault.check()
    assert line.endswith("auth=approle policies=[airflow-read,default] ttl=590s") and line.startswith("vault http://")


@pytest.mark.parametrize(
    ("mount_point", "engine", "path", "api_path"),
    [
        ("secret", 2, "variables/a/b", "secret/data/variables/a/b"),
        ("/kv/", 1, "variables/a", "kv/variables/a"),
        (None, 2, "team/variables/a", "team/data/variables/a"),
        ("", 1, "team/variables/a", "team/variables/a"),
    ],
)
def test_kv_paths(ctx: BackendContext, mount_point: str | None, engine: int, path: str, api_path: str) -> None:
    config = VaultConfig.model_validate(
        {
            "name": "v",
            "type": "vault",
            "url": "http://127.0.0.1:1",
            "auth": {"method": "token", "token_file": "/dev/null"},
            "mount_point": mount_point,
            "kv_engine_version": engine,
        }
    )
    assert Backend(config, ctx).kv_path(path) == api_path
