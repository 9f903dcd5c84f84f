"""Dynamic PostgreSQL credentials through the broker: real leases, renewals, rotation at max TTL, revocation;
and reload, then shutdown, with a live lease: for every reload shape the broker exits 0, revokes every lease it
handed out (the PostgreSQL roles are dropped), unlinks its socket and closes every backend it built. A read
invalidated while OpenBao's answer is on its way gives its lease back at once when nobody waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import hvac
import psycopg
import pytest

from broker.backends.base import BackendError, Kind
from broker.config import validate_config
from broker.state import BrokerState
from tests.integration.vault.conftest import VaultEnv
from tests.servers.fault_proxy import FaultProxy
from tests.servers.postgres import Postgres, dynamic_postgres
from tests.support.broker_process import wait_for
from tests.support.polling import until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def postgres(vault_env: VaultEnv) -> Iterator[Postgres]:
    with dynamic_postgres(vault_env.bao, default_ttl="9s", max_ttl="24s") as pg:
        yield pg


def role_valid_until(pg: Postgres, role: str) -> Any:
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute("SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return row[0] if row else None


def can_log_in(pg: Postgres, fields: dict[str, Any]) -> bool:
    with psycopg.connect(
        host=fields["host"],
        port=fields["port"],
        user=fields["login"],
        password=fields["password"],
        dbname=fields["schema"],
        connect_timeout=5,
    ) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def test_leased_credential_renewed_rotated_and_revoked(
    broker_factory: Any, vault_env: VaultEnv, postgres: Postgres
) -> None:
    backend = vault_env.backend(
        "approle",
        dynamic_connections={
            "pg_dynamic": {
                "path": "database/creds/airflow",
                "fields": {
                    "conn_type": "postgres",
                    "host": "127.0.0.1",
                    "port": postgres.port,
                    "schema": "postgres",
                    "login": "{{ username }}",
                    "password": "{{ password }}",
                    "extra": {"sslmode": "disable"},
                },
            }
        },
    )
    broker = broker_factory({"cache": {"ttl": 300}, "backends": [backend]})
    status, body = broker.get("connection", "pg_dynamic")
    assert status == 200
    first = json.loads(body["value"])
    assert can_log_in(postgres, first)
    initial_valid_until = role_valid_until(postgres, first["login"])
    assert initial_valid_until is not None
    assert broker.metric("broker_leases_active", backend="vault") == 1

    # In use: renewed at ~2/3 of the 9 s lease; PostgreSQL's VALID UNTIL moves forward.
    wait_for(
        lambda: (
            broker.get("connection", "pg_dynamic")[0] == 200
            and broker.metric("broker_lease_renewals_total", backend="vault", outcome="ok") >= 1
        ),
        timeout=15,
        interval=0.5,
        what="a lease renewal",
    )
    assert role_valid_until(postgres, first["login"]) > initial_valid_until
    assert json.loads(broker.get("connection", "pg_dynamic")[1]["value"])["login"] == first["login"]

    # Near the 24 s max TTL renewals are capped; a new credential replaces the old one before it expires.
    seen: dict[str, dict[str, Any]] = {first["login"]: first}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(seen) < 2:
        status, body = broker.get("connection", "pg_dynamic")
        assert status == 200
        fields = json.loads(body["value"])
        if fields["login"] not in seen:
            seen[fields["login"]] = fields
            assert role_valid_until(postgres, first["login"]) is not None  # the old role still exists
        time.sleep(0.5)
    assert len(seen) == 2, "no rotation before max TTL"
    second = next(f for login, f in seen.items() if login != first["login"])
    assert can_log_in(postgres, second)
    assert broker.metric("broker_lease_renewals_total", backend="vault", outcome="capped") >= 1

    # Shutdown revokes what it holds: the roles are dropped from PostgreSQL.
    broker.signal(signal.SIGTERM)
    assert broker.proc.wait(30) == 0
    assert role_valid_until(postgres, second["login"]) is None
    with psycopg.connect(postgres.dsn()) as conn:
        remaining = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-%%'").fetchone()
    assert remaining == (0,)
    assert second["password"] not in broker.logs() and first["password"] not in broker.logs()


def dynamic_backend(vault_env: VaultEnv, postgres: Postgres, name: str) -> dict[str, Any]:
    return vault_env.backend(
        "approle",
        name=name,
        dynamic_connections={
            "pg_dynamic": {
                "path": "database/creds/airflow",
                "fields": {
                    "conn_type": "postgres",
                    "host": "127.0.0.1",
                    "port": postgres.port,
                    "schema": "postgres",
                    "login": "{{ username }}",
                    "password": "{{ password }}",
                },
            }
        },
    )


def files_backend(tmp: Any) -> dict[str, Any]:
    (tmp / "variables.json").write_text(json.dumps({"plain": "files-plain-value"}))
    return {"name": "files", "type": "file", "variables_file_path": str(tmp / "variables.json")}


def renamed(cfg: dict[str, Any]) -> None:
    cfg["backends"][0]["name"] = "vault-renamed"


def removed(cfg: dict[str, Any]) -> None:
    del cfg["backends"][0]


def reordered(cfg: dict[str, Any]) -> None:
    cfg["backends"].reverse()


def changed(cfg: dict[str, Any]) -> None:
    cfg["backends"][0]["ttl"] = 120


def unchanged(cfg: dict[str, Any]) -> None:
    cfg["cache"]["ttl"] = 301  # only the cache section moves; every backend is kept


SHAPES: dict[str, Callable[[dict[str, Any]], None]] = {
    "renamed": renamed,
    "removed": removed,
    "reordered": reordered,
    "changed": changed,
    "unchanged": unchanged,
}


def live_roles(pg: Postgres) -> set[str]:
    with psycopg.connect(pg.dsn()) as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%%'").fetchall()
    return {r[0] for r in rows}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_reload_then_sigterm_with_live_leases(
    broker_factory: Any, vault_env: VaultEnv, postgres: Postgres, tmp_path: Any, shape: str
) -> None:
    config = {
        "cache": {"ttl": 300},
        "backends": [dynamic_backend(vault_env, postgres, "vault"), files_backend(tmp_path)],
    }
    broker = broker_factory(config)
    status, body = broker.get("connection", "pg_dynamic")
    assert status == 200, body
    login = json.loads(body["value"])["login"]
    assert login in live_roles(postgres)

    new = copy.deepcopy(broker.config)
    SHAPES[shape](new)
    broker.write_config(new)
    broker.signal(signal.SIGHUP)
    wait_for(lambda: broker.metric("broker_config_reloads_total", outcome="ok") >= 1, timeout=15, what="reload")
    if shape != "removed":
        # the reloaded broker hands out a credential too (the same one, or a new lease from the new backend)
        wait_for(lambda: broker.get("connection", "pg_dynamic")[0] == 200, timeout=15, what="served after reload")
    handed_out = live_roles(postgres)
    assert login in handed_out or shape == "unchanged"

    broker.signal(signal.SIGTERM)
    assert broker.proc.wait(30) == 0, broker.logs()[-3000:]
    logs = broker.logs()
    assert "Traceback" not in logs, logs[-3000:]
    assert not os.path.exists(broker.socket_path)
    assert not (live_roles(postgres) & handed_out), f"{shape}: leases left unrevoked"
    closed = {json.loads(line).get("backend") for line in logs.splitlines() if '"backend closed"' in line}
    built = {b["name"] for b in config["backends"]} | {b["name"] for b in new["backends"]}
    assert closed >= built, f"{shape}: backends not closed: {built - closed}"


def live_leases(vault_env: VaultEnv) -> set[str]:
    try:
        listed = vault_env.bao.client().sys.list_leases("database/creds/airflow")
    except hvac.exceptions.InvalidPath:  # none left under the prefix
        return set()
    return {f"database/creds/airflow/{key}" for key in listed["data"]["keys"]}


def lease_exists(vault_env: VaultEnv, lease_id: str) -> bool:
    try:
        vault_env.bao.client().sys.read_lease(lease_id)
    except hvac.exceptions.InvalidRequest:  # "invalid lease": revoked
        return False
    return True


@contextlib.asynccontextmanager
async def started_state(backend: dict[str, Any], tmp_path: Any) -> AsyncIterator[BrokerState]:
    """The broker's state for one backend, started in this event loop (no listeners); closed with every lease
    it holds revoked."""
    state = BrokerState(validate_config({"listen": {"socket": str(tmp_path / "unused.sock")}, "backends": [backend]}))
    try:
        for guard in state.guards:
            await guard.start()
        yield state
    finally:
        await state.cache.aclose(revoke_leases=True)
        await asyncio.gather(*(g.aclose() for g in state.guards))
        state.executor.shutdown()


@pytest.mark.parametrize("waiting", [False, True], ids=["caller-left", "caller-waiting"])
async def test_a_read_invalidated_while_openbao_answers_gives_its_lease_back_when_nobody_waits(
    vault_env: VaultEnv, postgres: Postgres, tmp_path: Any, waiting: bool
) -> None:
    """OpenBao has granted the lease (the PostgreSQL role exists) and its answer is held on the way back when
    the name is invalidated. With its caller gone, the credential goes to no one: the broker revokes the lease
    then and there (the role is dropped), instead of keeping it unrenewed until its TTL ends. A caller still
    waiting gets a credential that works, and it stays alive."""
    proxy = FaultProxy(vault_env.bao.url).start()
    backend = dynamic_backend(vault_env, postgres, "vault") | {"url": proxy.url}
    roles, leases = live_roles(postgres), live_leases(vault_env)
    try:
        async with started_state(backend, tmp_path) as state:
            cache = state.cache
            forwarded = proxy.counts()[1]
            proxy.set("hold")
            caller = asyncio.create_task(cache.get(Kind.CONNECTION, "pg_dynamic"))
            await until(lambda: proxy.counts()[1] > forwarded, "OpenBao's answer held at the proxy", interval=0.01)
            [granted] = live_leases(vault_env) - leases
            [role] = live_roles(postgres) - roles
            assert cache.loads(), "the read is under way"
            cache.invalidate(Kind.CONNECTION, "pg_dynamic")
            if not waiting:
                caller.cancel()
            proxy.set("pass")
            await until(lambda: not cache.loads(), "the read done", interval=0.01)
            assert cache.peek(Kind.CONNECTION, "pg_dynamic") is None  # disowned: not stored
            if waiting:
                entry, _ = await caller
                fields = json.loads(entry.value)
                assert fields["login"] == role and can_log_in(postgres, fields)
                assert [lease.lease_id for _, lease in cache.leases.live()] == [granted]
                assert lease_exists(vault_env, granted) and role in live_roles(postgres)
            else:
                assert cache.leases.live() == []
                await until(lambda: not lease_exists(vault_env, granted), "the lease revoked in OpenBao", interval=0.05)
                assert role not in live_roles(postgres)
                revoked = {"backend": "vault", "outcome": "revoked"}
                assert state.metrics.registry.get_sample_value("broker_lease_renewals_total", revoked) == 1
    finally:
        proxy.stop()
    assert not (live_roles(postgres) - roles), "every lease given back by the end"


async def test_a_credential_that_does_not_fit_its_template_is_revoked_not_left_alive(
    vault_env: VaultEnv, postgres: Postgres, tmp_path: Any
) -> None:
    """OpenBao creates the PostgreSQL role and grants the lease, but the connection template asks for a key the
    answer does not have: the caller gets a 502 naming the key, and the lease is revoked (the role dropped)
    instead of living on unrenewed, one more role per retry, until its TTL ends."""
    backend = dynamic_backend(vault_env, postgres, "vault")
    backend["dynamic_connections"]["pg_dynamic"]["fields"]["login"] = "{{ user_name }}"
    roles, leases = live_roles(postgres), live_leases(vault_env)
    async with started_state(backend, tmp_path) as state:
        with pytest.raises(BackendError, match="no key 'user_name'") as raised:
            await state.cache.get(Kind.CONNECTION, "pg_dynamic")
        assert raised.value.status == 502
        await until(lambda: live_leases(vault_env) == leases, "the lease revoked in OpenBao", interval=0.05)
        assert live_roles(postgres) == roles, "the role OpenBao created for it is dropped"
        granted = raised.value.lease
        assert granted is not None and not lease_exists(vault_env, granted.lease_id)
        revoked = {"backend": "vault", "outcome": "revoked"}
        assert state.metrics.registry.get_sample_value("broker_lease_renewals_total", revoked) == 1
