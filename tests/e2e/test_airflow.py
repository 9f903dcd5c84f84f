"""Airflow 2.10 and 3.x reading connections, variables and config through the broker, for real."""

from __future__ import annotations

import ast
import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    AWS_VAR,
    DENIED_ENV_HOST,
    DENIED_ENV_VAR,
    DENIED_VALUE,
    EXTRA,
    JSON_VAR,
    PASSWORD,
    PLAIN,
    VAULT_VAR,
    Stack,
    airflow_env,
    run_airflow,
    server_lookups,
)
from tests.support.broker_process import wait_for

pytestmark = pytest.mark.e2e


def stringified(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: stringified(v) for k, v in value.items()}
    if isinstance(value, list):
        return [stringified(v) for v in value]
    return value if isinstance(value, str) else str(value)


def env_for(major: str, stack: Stack) -> dict[str, str]:
    return airflow_env(major, stack.home, stack.broker.socket_path)


def test_connections_get_json(stack: tuple[str, Path, Stack]) -> None:
    major, python, st = stack
    result = run_airflow(python, env_for(major, st), "connections", "get", "e2e_pg", "-o", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    conn = json.loads(result.stdout)
    conn = conn[0] if isinstance(conn, list) else conn
    assert conn["host"] == "pg.example" and conn["login"] == "airflow" and conn["password"] == PASSWORD
    assert int(conn["port"]) == 5432
    if "extra" in conn:
        assert json.loads(conn["extra"]) == EXTRA
    else:  # the 2.10 CLI prints only extra_dejson, with nested scalars as strings; the DAG test checks types
        assert conn["extra_dejson"] == stringified(EXTRA)
    vault = run_airflow(python, env_for(major, st), "connections", "get", "e2e_vault_conn", "-o", "json")
    assert vault.returncode == 0 and "vault@pw" in vault.stdout


def test_variables_plain_and_json(stack: tuple[str, Path, Stack]) -> None:
    major, python, st = stack
    env = env_for(major, st)
    plain = run_airflow(python, env, "variables", "get", "e2e_plain")
    assert plain.returncode == 0 and plain.stdout.strip() == PLAIN, plain.stderr[-2000:]
    as_json = run_airflow(python, env, "variables", "get", "e2e_json", "-j")
    # -j makes Airflow deserialise the value; the CLI prints the resulting object
    assert as_json.returncode == 0 and ast.literal_eval(as_json.stdout.strip()) == JSON_VAR
    assert run_airflow(python, env, "variables", "get", "e2e_vault").stdout.strip() == VAULT_VAR
    assert run_airflow(python, env, "variables", "get", "e2e_aws").stdout.strip() == AWS_VAR


def test_sensitive_config_through_get_config(stack: tuple[str, Path, Stack]) -> None:
    major, python, st = stack
    result = run_airflow(python, env_for(major, st), "config", "get-value", "core", "fernet_key")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == st.fernet_key
    assert st.broker.metric("broker_requests_total", kind="config") >= 1


def test_missing_keys_fall_through_to_airflow_environment(stack: tuple[str, Path, Stack]) -> None:
    major, python, st = stack
    env = env_for(major, st)
    assert run_airflow(python, env, "variables", "get", "env_only").stdout.strip() == "from-airflow-environment"
    conn = run_airflow(python, env, "connections", "get", "env_only", "-o", "json")
    assert conn.returncode == 0 and "env.example" in conn.stdout
    assert st.broker.metric("broker_requests_total", kind="variable", outcome="not_found") >= 1


def test_dags_test_reads_through_the_broker(stack: tuple[str, Path, Stack], tmp_path: Path) -> None:
    major, python, st = stack
    out = tmp_path / "out.json"
    env = {**env_for(major, st), "BROKER_E2E_OUT": str(out)}
    result = run_airflow(python, env, "dags", "test", "broker_e2e", "2024-01-02", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = json.loads(out.read_text())
    digest = lambda v: hashlib.sha256(v.encode()).hexdigest()  # noqa: E731
    assert got["top_level"] == digest(PLAIN) and got["variable"] == digest(PLAIN)
    assert got["password"] == digest(PASSWORD) and got["host"] == "pg.example" and got["port"] == 5432
    assert got["extra"] == EXTRA
    if major == "3":
        # The task SDK's Connection parses the stored URI itself and keeps query extras as strings; a 403
        # stops the task's search (no fall-through to its environment or the Execution API).
        assert got["uri_extra"] == {"ssl": "true", "timeout": "5"}
        assert got["denied_variable"] == got["denied_host"] == {"raised": "AirflowSecretsBackendAccessDenied"}
    else:  # 2.10 has no authoritative deny: the task reads its environment after the 403
        assert got["denied_variable"] == DENIED_ENV_VAR and got["denied_host"] == DENIED_ENV_HOST
    for value in (PASSWORD, PLAIN):
        assert value not in st.broker.logs()
    # The audit trail names the task that read the connection, from Airflow's own task context.
    audit = st.broker.tmp_path.parent / "audit.jsonl"
    reads = wait_for(
        lambda: [
            line
            for line in map(json.loads, audit.read_text().splitlines())
            if line["kind"] == "connection" and line["name"] == "e2e_pg" and line["asserted"]
        ],
        what="the task's audit line",
    )
    asserted = reads[-1]["asserted"]
    assert (asserted["dag_id"], asserted["task_id"]) == ("broker_e2e", "read_secrets")
    assert asserted["run_id"] and asserted["try_number"].isdigit() and asserted["map_index"] == "-1"
    assert reads[-1]["outcome"] == "found" and reads[-1]["caller"]["listener"] == "unix"
    assert PASSWORD not in audit.read_text()


def test_a_403_stops_the_search_only_where_airflow_can(stack: tuple[str, Path, Stack]) -> None:
    """Server context: 3.3 stops on the deny; 2.10 has no such exception, logs our WARNING and goes on."""
    major, python, st = stack
    got, output = server_lookups(python, env_for(major, st), st.broker.socket_path)
    assert got["pg"] == ["pg.example", 5432, hashlib.sha256(PASSWORD.encode()).hexdigest(), EXTRA]
    if major == "3":
        denied = "AirflowSecretsBackendAccessDenied"
        assert got["access_denied_class"] == f"airflow.sdk.exceptions.{denied}"
        assert got["denied_variable"] == got["denied_host"] == {"raised": denied}
        assert got["backend_raises"] == [{"raised": denied}] * 2
        assert got["uri"][2] == {"ssl": True, "timeout": 5}  # the ORM Connection JSON-decodes query extras
    else:
        assert got["access_denied_class"] is None
        assert got["denied_variable"] == DENIED_ENV_VAR and got["denied_host"] == DENIED_ENV_HOST
        assert got["backend_raises"] == [{"raised": "BrokerAccessDeniedError"}] * 2
    for text in ("broker denied variable 'e2e_denied'", "broker denied connection 'e2e_denied'"):
        assert any(text in line and ("WARNING" in line or "[warning" in line) for line in output.splitlines())
    assert DENIED_VALUE not in output and PASSWORD not in output


def test_team_name_is_accepted(stack: tuple[str, Path, Stack]) -> None:
    major, python, st = stack
    code = (
        "import json, sys\n"
        "import airflow  # Airflow first, as in any Airflow process: it loads the configured backend itself\n"
        "from broker.airflow import BrokerSecretsBackend\n"
        "from airflow.secrets import BaseSecretsBackend\n"
        f"b = BrokerSecretsBackend(socket_path={st.broker.socket_path!r}, timeout='3')\n"
        "assert isinstance(b, BaseSecretsBackend)\n"
        "print(json.dumps([b.get_conn_value('e2e_pg', team_name='team_a'),"
        " b.get_variable('e2e_plain', team_name='team_b'),"
        " b.get_conn_value('absent_conn'), b.get_config('fernet_key')]))\n"
    )
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=120, env=env_for(major, st), cwd=st.home
    )
    assert result.returncode == 0, result.stderr[-2000:]
    conn, variable, absent, config = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(conn)["password"] == PASSWORD and variable == PLAIN and absent is None
    assert config == st.fernet_key


def test_dag_parse_load_measured(stack: tuple[str, Path, Stack]) -> None:
    """Repeated parses with a top-level Variable.get: requests reach the broker, the store sees few calls."""
    major, python, st = stack
    st.broker.invalidate()
    fetches_before = st.broker.metric("broker_backend_calls_total", backend="files", operation="fetch")
    requests_before = st.broker.metric("broker_requests_total", kind="variable")
    parses, processes = 10, 3
    code = (
        "try:\n    from airflow.dag_processing.dagbag import DagBag\n"
        "except ImportError:\n    from airflow.models.dagbag import DagBag\n"
        f"for _ in range({parses}):\n"
        "    bag = DagBag()\n"
        "    assert 'broker_e2e' in bag.dags, bag.import_errors\n"
    )
    env = env_for(major, st)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [str(python), "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=st.home
        )
        for _ in range(processes)
    ]
    errors = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                errors.append(err[-2000:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not errors, errors[0]
    elapsed = time.monotonic() - started
    requests = st.broker.metric("broker_requests_total", kind="variable") - requests_before
    fetches = st.broker.metric("broker_backend_calls_total", backend="files", operation="fetch") - fetches_before
    print(
        f"\nairflow {major}: {parses * processes} parses in {processes} processes ({elapsed:.1f}s): "
        f"{requests:.0f} lookups at the broker, {fetches:.0f} store call(s) with the broker; "
        f"without it each lookup is a store call: {requests:.0f}"
    )
    assert requests >= parses * processes  # every parse asked (one store call each without the broker)
    assert fetches <= 2  # a few calls per TTL, whatever the number of parses and processes


def test_broker_down_airflow_keeps_working_and_warns(stack: tuple[str, Path, Stack]) -> None:
    major, python, st = stack
    # Options kept only in the broker (here the fernet key, through _SECRET) are unavailable while it is down;
    # this scenario is about connections and variables, so the fernet key comes from the environment.
    env = env_for(major, st)
    del env["AIRFLOW__CORE__FERNET_KEY_SECRET"]
    env["AIRFLOW__CORE__FERNET_KEY"] = st.fernet_key
    st.broker.signal(signal.SIGTERM)
    assert st.broker.proc is not None and st.broker.proc.wait(30) == 0
    try:
        result = run_airflow(python, env, "variables", "get", "env_only")
        assert result.returncode == 0 and result.stdout.strip().endswith("from-airflow-environment")
        conn = run_airflow(python, env, "connections", "get", "env_only", "-o", "json")
        assert conn.returncode == 0 and "env.example" in conn.stdout, conn.stdout[-2000:] + conn.stderr[-2000:]
        # The CLI silences logging for some commands; a plain lookup shows what operators see in task logs.
        code = (
            "import logging, airflow\n"
            "from airflow.models import Connection, Variable\n"
            "print(Variable.get('env_only'))\n"
            "print(Connection.get_connection_from_secrets('env_only').host)\n"
        )
        looked_up = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=st.home
        )
        assert looked_up.returncode == 0, looked_up.stderr[-2000:]
        lines = looked_up.stdout.splitlines()
        assert "from-airflow-environment" in lines and "env.example" in lines
        output = looked_up.stdout + looked_up.stderr
        assert "unreachable" in output and st.broker.socket_path in output
        assert output.count("broker lookup of") >= 2  # one WARNING per lookup: variable and connection
    finally:
        st.broker.start()
