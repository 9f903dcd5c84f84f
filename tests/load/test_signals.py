"""Signals under load. SIGTERM: every request the broker accepted gets its full response (new connections
fail fast once the socket is unlinked), the leases it holds are revoked (their PostgreSQL roles are gone) and
it exits 0 within the grace period. SIGHUP: a reload while clients run fails no request."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.load.conftest import HOT_KEYS, files_backend, vault_backend
from tests.load.loadgen import Tally, client, get
from tests.servers.openbao import OpenBao
from tests.servers.postgres import Postgres, dynamic_postgres
from tests.support.broker_process import wait_for
from tests.support.figures import report

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLIENTS = 50


@pytest.fixture(scope="module")
def postgres(bao: OpenBao) -> Iterator[Postgres]:
    with dynamic_postgres(bao, default_ttl="120s", max_ttl="600s") as pg:
        yield pg


def dynamic_roles(pg: Postgres) -> list[str]:
    with psycopg.connect(pg.dsn()) as conn:
        return [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'").fetchall()]


def mix(client_id: int) -> Any:
    def next_request(n: int) -> tuple[str, bytes]:
        slot = (client_id + n) % 3
        if slot == 0:
            return "hit", get("/v1/connections/pg_dynamic")
        if slot == 1:
            return "hit", get(f"/v1/variables/kv{n % HOT_KEYS}")
        return "hit", get(f"/v1/variables/file{n % HOT_KEYS}")

    return next_request


def config(bao: OpenBao, pg: Postgres, tmp_path: Path, files_ttl: str = "5m") -> dict[str, Any]:
    vault = vault_backend(bao, tmp_path) | {
        "dynamic_connections": {
            "pg_dynamic": {
                "path": "database/creds/airflow",
                "fields": {
                    "conn_type": "postgres",
                    "host": "127.0.0.1",
                    "port": pg.port,
                    "login": "{{ username }}",
                    "password": "{{ password }}",
                },
            }
        }
    }
    return {
        "listen": {"max_connections": 500, "max_concurrency": 500},
        "shutdown": {"grace": 10},
        "backends": [vault, files_backend(tmp_path) | {"ttl": files_ttl}],
    }


async def hammer(socket_path: str, seconds: float, stop_on_refused: bool, act: Any, act_after: float) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    tasks = [asyncio.create_task(client(socket_path, mix(i), until, tally, stop_on_refused)) for i in range(CLIENTS)]
    await asyncio.sleep(act_after)
    act()
    await asyncio.gather(*tasks)
    return tally


def test_sigterm_under_load_completes_accepted_requests_and_revokes_leases(
    broker_factory: Any, bao: OpenBao, postgres: Postgres, tmp_path: Path
) -> None:
    broker = broker_factory(config(bao, postgres, tmp_path))
    assert broker.get("connection", "pg_dynamic")[0] == 200
    assert len(dynamic_roles(postgres)) == 1
    sent: dict[str, float] = {}

    def term() -> None:
        sent["at"] = time.monotonic()
        broker.signal(signal.SIGTERM)

    tally = asyncio.run(hammer(broker.socket_path, 20, True, term, 2.0))
    assert broker.proc is not None
    code = broker.proc.wait(15)
    took = time.monotonic() - sent["at"]
    connect_failures = sum(n for k, n in tally.errors.items() if k.startswith("connect:"))
    cut = {k: n for k, n in tally.errors.items() if not k.startswith("connect:")}
    assert code == 0
    assert not cut, f"accepted requests lost their response: {cut}"
    assert {status for _, status in tally.statuses} == {200}, tally.statuses
    assert dynamic_roles(postgres) == []
    report(
        "SIGTERM under load",
        f"{CLIENTS} clients, {tally.total} requests answered 200 (0 cut or reset), {connect_failures} new "
        f"connections refused after the socket was unlinked; exit {code} {took:.2f} s after SIGTERM; "
        f"leased PostgreSQL roles left: 0",
    )


def test_sighup_under_load_fails_no_request(
    broker_factory: Any, bao: OpenBao, postgres: Postgres, tmp_path: Path
) -> None:
    broker = broker_factory(config(bao, postgres, tmp_path))
    assert broker.get("connection", "pg_dynamic")[0] == 200

    def reload() -> None:
        broker.write_config(config(bao, postgres, tmp_path, files_ttl="2m"))  # files changed, vault kept
        broker.signal(signal.SIGHUP)

    tally = asyncio.run(hammer(broker.socket_path, 6, False, reload, 2.0))
    wait_for(lambda: broker.metric("broker_config_reloads_total", outcome="ok") == 1, 10, what="reload applied")
    assert not tally.errors, tally.errors
    assert {status for _, status in tally.statuses} == {200}, tally.statuses
    assert len(dynamic_roles(postgres)) == 1  # the kept vault backend kept its lease: no new credential
    report("SIGHUP under load", f"{CLIENTS} clients, {tally.total} requests, 0 failed, reload applied")
