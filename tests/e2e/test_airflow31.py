"""Airflow 3.1 through the broker, for real: lookups in the server and task SDK contexts, and a 403.

Airflow 3.1 has no ``AirflowSecretsBackendAccessDenied``: a 403 from the broker is logged by the client as a
WARNING and raised as ``BrokerAccessDeniedError``, and Airflow goes on to the next backend (its environment
here), on both sides, as docs/airflow.md says. Its venv is minimal (no providers).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    DENIED_ENV_HOST,
    DENIED_ENV_VAR,
    DENIED_VALUE,
    EXTRA,
    PASSWORD,
    PLAIN,
    VAULT_VAR,
    Stack,
    airflow_env,
    run_airflow,
    server_lookups,
)
from tests.e2e.venvs import AIRFLOW_31
from tests.support.broker_process import wait_for

pytestmark = pytest.mark.e2e


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def warned(output: str, text: str) -> bool:
    """A WARNING line with ``text``, in Airflow 3's log format (``[warning  ]``) or the standard one."""
    return any(text in line and ("[warning" in line or "WARNING" in line) for line in output.splitlines())


def denied_audit_lines(st: Stack) -> list[dict[str, object]]:
    audit = st.broker.tmp_path.parent / "audit.jsonl"
    return [
        line
        for line in map(json.loads, audit.read_text().splitlines())
        if line["name"] == "e2e_denied" and line["outcome"] == "denied"
    ]


def test_server_context_reads_and_a_403_falls_through(stack31: tuple[Path, Stack]) -> None:
    python, st = stack31
    denied_before = len(denied_audit_lines(st))
    got, output = server_lookups(python, airflow_env("3", st.home, st.broker.socket_path), st.broker.socket_path)
    assert got["airflow"] == AIRFLOW_31
    assert got["pg"] == ["pg.example", 5432, digest(PASSWORD), EXTRA]
    # The ORM Connection parses the stored URI itself and JSON-decodes its query extras.
    assert got["uri"] == ["uri-db", digest("uri/pw"), {"ssl": True, "timeout": 5}]
    assert got["plain"] == digest(PLAIN) and got["vault"] == VAULT_VAR
    # No authoritative deny in 3.1: the client raises its own error and Airflow reads its environment.
    assert got["access_denied_class"] is None
    assert got["backend_raises"] == [{"raised": "BrokerAccessDeniedError"}] * 2
    assert got["denied_variable"] == DENIED_ENV_VAR and got["denied_host"] == DENIED_ENV_HOST
    assert warned(output, "broker denied variable 'e2e_denied'") and warned(
        output, "broker denied connection 'e2e_denied'"
    )
    assert DENIED_VALUE not in output and PASSWORD not in output
    # Two lookups through Airflow, two asked directly: each one reached the broker and was refused there.
    assert len(denied_audit_lines(st)) - denied_before == 4


def test_task_sdk_context_reads_and_a_403_falls_through(stack31: tuple[Path, Stack], tmp_path: Path) -> None:
    python, st = stack31
    out = tmp_path / "out.json"
    env = {**airflow_env("3", st.home, st.broker.socket_path), "BROKER_E2E_OUT": str(out)}
    denied_before = len(denied_audit_lines(st))
    result = run_airflow(python, env, "dags", "test", "broker_e2e", "2024-01-02", timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    got = json.loads(out.read_text())
    assert got["top_level"] == digest(PLAIN) and got["variable"] == digest(PLAIN)
    assert got["password"] == digest(PASSWORD) and got["host"] == "pg.example" and got["port"] == 5432
    assert got["extra"] == EXTRA
    # 3.1's BaseSecretsBackend builds the ORM Connection in tasks too (3.3 builds the task SDK's, which
    # keeps strings): the task gets the decoded extras, as it would from a provider backend.
    assert got["uri_extra"] == {"ssl": True, "timeout": 5}
    assert got["denied_variable"] == DENIED_ENV_VAR and got["denied_host"] == DENIED_ENV_HOST
    assert warned(output, "broker denied variable 'e2e_denied'") and warned(
        output, "broker denied connection 'e2e_denied'"
    )
    assert DENIED_VALUE not in output and PASSWORD not in output
    lines = wait_for(lambda: denied_audit_lines(st)[denied_before:], what="the task's denied audit lines")
    assert {line["kind"] for line in lines} >= {"variable", "connection"}
    # The denied reads came from the task itself: the audit trail has its identity from the task context.
    tasks = {(line["asserted"] or {}).get("task_id") for line in lines}
    assert "read_secrets" in tasks, lines
