"""The published OpenAPI document (broker/openapi.json, served at /openapi.json) against the live broker:
schemathesis generates valid and invalid requests for every operation and checks that none gets a 5xx and that
every answer's status, content type and body conform to the document. The broker runs with the loopback TCP
listener and its token, over the file backend."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.support.broker_process import BrokerProcess
from tests.support.figures import report
from tests.support.leakcheck import plant
from tests.support.net import free_port

OPENAPI = Path(__file__).resolve().parents[2] / "broker" / "openapi.json"
TOKEN = "schemathesis-token-0123456789abcdef"
VALUE = "schemathesis-planted-value-4d8e"
plant("schemathesis", VALUE)
schema = schemathesis.openapi.from_path(OPENAPI)
CALLS: dict[str, int] = {}
FAILED: set[str] = set()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, str]]:
    work = tmp_path_factory.mktemp("schemathesis")
    (work / "variables.json").write_text(json.dumps({"known": VALUE}))
    (work / "connections.json").write_text(json.dumps({"known": "postgres://u:p@db:5432/x"}))
    (work / "token").write_text(TOKEN)
    port = free_port()
    config = {
        "listen": {"tcp": f"127.0.0.1:{port}", "token_file": str(work / "token")},
        # the audit trail on, so generated X-Airflow-* headers go through its parsing and writing too
        "audit": {"enabled": True, "output": str(work / "audit.jsonl")},
        "backends": [
            {
                "name": "files",
                "type": "file",
                "variables_file_path": str(work / "variables.json"),
                "connections_file_path": str(work / "connections.json"),
            }
        ],
    }
    (work / "b").mkdir()
    broker = BrokerProcess(config, work / "b").start()
    try:
        yield broker, f"http://127.0.0.1:{port}"
    finally:
        broker.stop()
        total = sum(CALLS.values())
        verdict = f"failures in {sorted(FAILED)}" if FAILED else "no 5xx, every answer conformant"
        report("schemathesis", f"{len(CALLS)} operations, {total} generated requests: {verdict}")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_openapi_document(case: Any, live: tuple[BrokerProcess, str]) -> None:
    _broker, base_url = live
    CALLS[case.operation.label] = CALLS.get(case.operation.label, 0) + 1
    response = case.call(base_url=base_url, headers={"X-Broker-Token": TOKEN}, timeout=10)
    try:
        case.validate_response(response)
        assert response.status_code < 500, (case.operation.label, response.status_code, response.text[:200])
        if response.status_code >= 400:
            assert VALUE not in response.text
    except BaseException:
        FAILED.add(case.operation.label)
        raise
