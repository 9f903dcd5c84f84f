"""The API app in-process: concurrency cap, error mapping, request ids, response shape, teams, the token."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from broker.backends.base import BackendTimeout, Kind, RateLimited
from broker.config import validate_config
from broker.resolver import Resolved
from broker.server import build_api_app, build_metrics_app
from broker.state import BrokerState
from tests.support.server_state import recording_state


@pytest.fixture
def state(tmp_path: Path) -> Any:
    config = validate_config(
        {
            "listen": {"socket": str(tmp_path / "s.sock"), "max_concurrency": 3},
            "backends": [{"name": "env", "type": "env"}],
        }
    )
    st = BrokerState(config)
    yield st
    st.executor.shutdown(wait=False)


async def client_for(app: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_concurrency_cap_answers_429(state: Any) -> None:
    gate = asyncio.Event()

    async def slow(kind: Kind, name: str, team: str | None = None) -> Resolved:
        await gate.wait()
        return Resolved("v", "env", None, None, 300, 0)

    state.cache._loader = slow
    client = await client_for(build_api_app(state))
    try:
        held = [asyncio.create_task(client.get(f"/v1/variables/k{i}")) for i in range(3)]
        for _ in range(100):
            if state.inflight == 3:
                break
            await asyncio.sleep(0.01)
        over = await client.get("/v1/variables/other")
        assert over.status == 429 and (await over.json())["error"] == "overloaded"
        assert over.headers["Retry-After"] == "1"
        gate.set()
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200, 200]
        assert state.inflight == 0
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (RateLimited("slow down", retry_after=7), 503, "backend_unavailable"),
        (BackendTimeout("too slow"), 504, "backend_timeout"),
    ],
)
async def test_errors_map_to_status_and_retry_after(state: Any, exc: Exception, status: int, code: str) -> None:
    async def failing(kind: Kind, name: str, team: str | None = None) -> Resolved:
        raise exc

    state.cache._loader = failing
    client = await client_for(build_api_app(state))
    try:
        resp = await client.get("/v1/connections/c")
        assert resp.status == status and (await resp.json())["error"] == code
        if isinstance(exc, RateLimited):
            assert resp.headers["Retry-After"] == "7"
    finally:
        await client.close()


async def test_request_id_echoed_or_generated(state: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_K", "v")
    client = await client_for(build_api_app(state))
    try:
        given = await client.get("/v1/variables/k", headers={"X-Request-Id": "abc-123"})
        assert given.headers["X-Request-Id"] == "abc-123"
        hostile = await client.get("/v1/variables/k", headers={"X-Request-Id": "a\tb" + "x" * 100})
        assert hostile.headers["X-Request-Id"] != "a\tb" + "x" * 100 and len(hostile.headers["X-Request-Id"]) == 16
        body = await given.json()
        assert body == {"value": "v", "backend": "env", "version": None, "cache": "miss", "age": 0}
    finally:
        await client.close()


async def test_metrics_app_serves_no_secret(state: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_SECRET_NAME_XYZ", "secret-value-xyz")
    api = await client_for(build_api_app(state))
    metrics = await client_for(build_metrics_app(state))
    try:
        assert (await api.get("/v1/variables/secret_name_xyz")).status == 200
        text = await (await metrics.get("/metrics")).text()
        assert "broker_requests_total" in text
        assert "secret-value-xyz" not in text and "secret_name_xyz" not in text.lower()
        assert (await metrics.get("/v1/variables/secret_name_xyz")).status == 404
    finally:
        await api.close()
        await metrics.close()


async def test_openapi_document_is_served_and_describes_the_api(state: Any) -> None:
    client = await client_for(build_api_app(state))
    try:
        resp = await client.get("/openapi.json")
        doc = await resp.json()
        assert resp.status == 200 and doc["openapi"].startswith("3.")
        assert {
            "/v1/connections/{conn_id}",
            "/v1/variables/{key}",
            "/v1/config/{key}",
            "/v1/cache/invalidate",
            "/healthz",
            "/readyz",
        } <= set(doc["paths"])
    finally:
        await client.close()


def team_state(tmp_path: Path, bound: str | None) -> Any:
    return recording_state(tmp_path, multi_team=True, **({"team": bound} if bound else {}))


async def test_the_team_is_part_of_the_key(tmp_path: Path) -> None:
    st = team_state(tmp_path, None)
    client = await client_for(build_api_app(st))
    try:
        for path, value in [
            ("k?team=alpha", "alpha:k"),
            ("k?team=beta", "beta:k"),
            ("k", "None:k"),
            ("k?team=alpha", "alpha:k"),
            ("team/k?team=alpha", "alpha:team/k"),
        ]:
            resp = await client.get(f"/v1/variables/{path}")
            assert (resp.status, (await resp.json())["value"]) == (200, value), path
        assert st.loads == [("k", "alpha"), ("k", "beta"), ("k", None), ("team/k", "alpha")]
        for bad in ("k?team=ab", "k?team=alpha&team=beta", "k?team=a%2Fb"):
            assert (await client.get(f"/v1/variables/{bad}")).status == 400, bad
        assert (await client.get("/v1/config/k?team=alpha")).status == 400  # config has no team
    finally:
        await client.close()
        st.executor.shutdown(wait=False)


async def test_a_bound_listener_serves_its_team_and_refuses_others(tmp_path: Path) -> None:
    st = team_state(tmp_path, "alpha")
    client = await client_for(build_api_app(st))
    try:
        assert (await (await client.get("/v1/connections/db")).json())["value"] == "alpha:db"
        assert (await client.get("/v1/connections/db?team=alpha")).status == 200  # the same entry
        refused = await client.get("/v1/connections/db?team=beta")
        assert refused.status == 403 and (await refused.json())["error"] == "forbidden"
        assert st.loads == [("db", "alpha")]  # the other team's secret was never looked up
        assert ("connection", "db", "denied", "beta") in st.audit.lines
        assert st.metrics.rejected.labels("team_denied")._value.get() == 1
    finally:
        await client.close()
        st.executor.shutdown(wait=False)


@pytest.mark.parametrize("raw", ["a%0Ab", "a%0D%0Ab", "%0A", "a%0Ab/c", "a%1Fb"])
async def test_control_characters_in_a_name_are_400_not_a_missed_route(state: Any, raw: str) -> None:
    """A decoded newline used to miss the ``/v1/{tail}`` route ('.' matches no newline): 404 not_found."""
    asked: list[str] = []

    async def loader(kind: Kind, name: str, team: str | None = None) -> Resolved:
        asked.append(name)
        return Resolved("v", "env", None, None, 300, 0)

    state.cache._loader = loader
    client = await client_for(build_api_app(state))
    metrics = await client_for(build_metrics_app(state))
    try:
        for kind in ("variables", "connections", "config"):
            resp = await client.get(f"/v1/{kind}/{raw}")
            assert (resp.status, (await resp.json())["error"]) == (400, "bad_request"), (kind, raw)
        assert (await metrics.get(f"/{raw}")).status == 404  # the metrics listener's own catch-all still answers
        assert asked == []
    finally:
        await client.close()
        await metrics.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("X-Broker-Token", "a" * 32)], 200),
        ([("X-Broker-Token", "a" * 32), ("X-Broker-Token", "a" * 32)], 401),  # once accepted: the first one won
        ([("X-Broker-Token", "wrong"), ("X-Broker-Token", "a" * 32)], 401),
        ([("X-Broker-Token", "a" * 32), ("X-Broker-Token", "wrong")], 401),
        ([], 401),
        ([("X-Broker-Token", "a" * 32), ("X-Forwarded-For", "10.0.0.1")], 400),
    ],
)
async def test_the_tcp_app_takes_one_token(tmp_path: Path, headers: list[tuple[str, str]], status: int) -> None:
    st = team_state(tmp_path, None)
    client = await client_for(build_api_app(st, tcp_token=b"a" * 32))
    try:
        resp = await client.get("/v1/variables/k", headers=CIMultiDict(headers))
        assert resp.status == status
        assert resp.headers["X-Request-Id"]  # refusals carry the request id too
        if status == 401:
            assert (await resp.json())["error"] == "unauthorized"
            assert st.audit.lines == [("variable", "k", "denied", None)]
    finally:
        await client.close()
        st.executor.shutdown(wait=False)
