"""Vault behind a proxy that answers 200 with an HTML page (or a body over the size bound) to every request:
every operation of the plug-in and of its token source is a failure, never "not found": each login method, the
token lookup, KV v1 and v2 reads, a dynamic connection, lease renewal and revocation, token renewal. Through the
daemon, a dynamic connection and a login at start-up answer 502/503 and are not remembered as missing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hvac
import pytest

from broker.backends.base import BackendContext, BackendError, BackendUnavailable, BrokerError, Kind, Lease
from broker.backends.vault import Backend, VaultConfig
from broker.clock import FakeClock
from broker.metrics import Metrics
from tests.servers.openbao import ROOT_TOKEN
from tests.servers.stores import Harness, value_of
from tests.support.broker_process import wait_for
from tests.support.leakcheck import plant

pytestmark = pytest.mark.integration

# what each 200 that is not Vault's answer becomes
FAILURES: dict[str, type[BrokerError]] = {"garbage": BackendUnavailable, "oversize": BackendError}
DYNAMIC_MOUNT = "dyn-faults"  # a KV v1 mount read as a dynamic connection (a TTL, no lease)
DYNAMIC_PASSWORD = "dynamic-fault-password-4b7e"
plant("vault-garbage", DYNAMIC_PASSWORD)


@pytest.fixture(params=sorted(FAILURES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def vault_harness(harnesses: dict[str, Harness]) -> Iterator[Harness]:
    harness = harnesses["vault"]
    harness.proxy.set("pass")
    yield harness
    harness.proxy.set("pass")


@pytest.fixture
def ctx() -> Iterator[BackendContext]:
    pool = ThreadPoolExecutor(2)
    yield BackendContext(executor=pool, clock=FakeClock(), metrics=Metrics())
    pool.shutdown()


def root(harness: Harness) -> hvac.Client:
    return hvac.Client(url=harness.proxy.url, token=ROOT_TOKEN)


def dynamic_secret(harness: Harness) -> str:
    """The path of a secret with a TTL, read as a dynamic connection."""
    client = root(harness)
    if f"{DYNAMIC_MOUNT}/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("kv", path=DYNAMIC_MOUNT, options={"version": "1"})
    secret = {"username": "dyn-user", "password": DYNAMIC_PASSWORD, "ttl": "30s"}
    client.secrets.kv.v1.create_or_update_secret(path="creds", mount_point=DYNAMIC_MOUNT, secret=secret)
    return f"{DYNAMIC_MOUNT}/creds"


def make_backend(ctx: BackendContext, harness: Harness, **overrides: Any) -> Backend:
    config = VaultConfig.model_validate({**harness.config(timeout=2, retries=0), **overrides})
    return Backend(config, ctx)


@pytest.fixture
async def logged_in(ctx: BackendContext, vault_harness: Harness, tmp_path: Path) -> AsyncIterator[Backend]:
    """A backend holding a renewable token, logged in while the proxy still passes requests through."""
    token = root(vault_harness).auth.token.create(ttl="120s", renewable=True)["auth"]["client_token"]
    (tmp_path / "token").write_text(token)
    backend = make_backend(
        ctx,
        vault_harness,
        auth={"method": "token", "token_file": str(tmp_path / "token")},
        dynamic_connections={"dyn": {"path": dynamic_secret(vault_harness), "fields": {"password": "{{ password }}"}}},
    )
    await backend.identity.token()
    assert backend.identity.renewable
    yield backend
    await backend.aclose()


def login_configs(files: Path) -> dict[str, dict[str, Any]]:
    for name in ("jwt", "role_id", "secret_id", "token"):
        (files / name).write_text(f"{name}-content")
    return {
        "approle": {
            "method": "approle",
            "role_id_file": str(files / "role_id"),
            "secret_id_file": str(files / "secret_id"),
        },
        "jwt": {"method": "jwt", "role": "airflow", "token_path": str(files / "jwt")},
        "kubernetes": {"method": "kubernetes", "role": "airflow", "token_path": str(files / "jwt")},
        "token": {"method": "token", "token_file": str(files / "token")},
    }


@pytest.mark.parametrize("method", ["approle", "jwt", "kubernetes", "token"])
async def test_login_answered_by_a_proxy_page_is_a_failure(
    ctx: BackendContext, vault_harness: Harness, tmp_path: Path, mode: str, method: str
) -> None:
    backend = make_backend(ctx, vault_harness, auth=login_configs(tmp_path)[method])
    vault_harness.proxy.set(mode)
    try:
        with pytest.raises(BrokerError) as caught:
            await backend.start()
        assert type(caught.value) is FAILURES[mode], caught.value
        assert backend.not_ready_reason() == f"no valid Vault token ({caught.value.code})"
    finally:
        await backend.aclose()


async def test_every_operation_with_a_token_is_a_failure(logged_in: Backend, vault_harness: Harness, mode: str) -> None:
    lease = Lease("database/creds/airflow/h1", 60.0, True, 0.0)
    token = await logged_in.identity.token()
    operations = {
        "kv2 read": lambda: logged_in.fetch(Kind.VARIABLE, "variables/k0"),
        "dynamic read": lambda: logged_in.fetch(Kind.CONNECTION, "dynamic:dyn"),
        "lease renew": lambda: logged_in.renew(lease, 60),
        "lease revoke": lambda: logged_in.revoke(lease),
        "token lookup": logged_in.check,
    }
    vault_harness.proxy.set(mode)
    for what, operation in operations.items():
        with pytest.raises(BrokerError) as caught:
            await operation()
        assert type(caught.value) is FAILURES[mode], (what, caught.value)
    with pytest.raises(BrokerError) as caught:  # the background renewal's one step
        async with logged_in.identity._lock:
            await logged_in.identity._refresh(renew=True)
    assert type(caught.value) is FAILURES[mode]
    assert await logged_in.identity.token() == token  # the old token keeps serving
    vault_harness.proxy.set("pass")
    assert (await logged_in.fetch(Kind.VARIABLE, "variables/k0")).value == value_of("vault", "k0")
    assert (await logged_in.fetch(Kind.CONNECTION, "dynamic:dyn")).value == {"password": DYNAMIC_PASSWORD}


async def test_kv1_read_is_a_failure(ctx: BackendContext, kv1_harness: Harness, mode: str) -> None:
    backend = make_backend(ctx, kv1_harness)
    try:
        await backend.start()
        kv1_harness.proxy.set(mode)
        with pytest.raises(BrokerError) as caught:
            await backend.fetch(Kind.VARIABLE, "variables/k1")
        assert type(caught.value) is FAILURES[mode]
    finally:
        kv1_harness.proxy.set("pass")
        await backend.aclose()


def test_dynamic_connection_through_the_daemon(broker_factory: Any, vault_harness: Harness) -> None:
    spec = {"path": dynamic_secret(vault_harness), "fields": {"conn_type": "http", "password": "{{ password }}"}}
    backend = vault_harness.config(timeout=2, retries=0, dynamic_connections={"dyn": spec})
    broker = broker_factory({"cache": {"ttl": 300, "negative_ttl": 300}, "backends": [backend]})
    vault_harness.proxy.set("garbage")
    try:
        status, body = broker.get("connection", "dyn")
        assert (status, body["error"]) == (503, "backend_unavailable")
    finally:
        vault_harness.proxy.set("pass")
    status, body = broker.get("connection", "dyn")
    assert status == 200 and json.loads(body["value"])["password"] == DYNAMIC_PASSWORD


def test_login_at_start_up_through_the_daemon(broker_factory: Any, vault_harness: Harness) -> None:
    backend = vault_harness.config(timeout=2, retries=0)
    broker = broker_factory({"cache": {"negative_ttl": 300}, "backends": [backend]}, start=False)
    vault_harness.proxy.set("garbage")
    try:
        broker.start(wait_ready=False)
        wait_for(lambda: broker.readyz_status() == 503, timeout=20, what="/readyz 503 while logins fail")
        status, body = broker.get("variable", "k2")
        assert status in (502, 503) and body["error"] in ("backend_error", "backend_unavailable"), body
    finally:
        vault_harness.proxy.set("pass")
    wait_for(lambda: broker.readyz_status() == 200, timeout=30, what="the login once Vault answers")
    assert broker.get("variable", "k2")[1]["value"] == value_of("vault", "k2")
