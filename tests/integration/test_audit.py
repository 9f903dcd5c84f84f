"""The audit trail through the real daemon: exactly one line per lookup with the right fields, for every
outcome and every listener (unix socket with and without the fast path, loopback TCP); the client's
asserted Airflow context; no value in the stream; and a stream that cannot be written fails no lookup."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from broker.client import BrokerClient, BrokerClientError, BrokerUnavailableError
from tests.support.broker_process import wait_for
from tests.support.leakcheck import plant
from tests.support.net import free_port

VALUE = "audit-planted-variable-value-71c3"
PASSWORD = "audit-planted-password-9d2e"
TOKEN = "audit-test-token-0123456789abcdef"
TASK_ENV = {
    "AIRFLOW_CTX_DAG_ID": "etl_daily",
    "AIRFLOW_CTX_TASK_ID": "load",
    "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__2026-12-01T00:00:00+00:00",
    "AIRFLOW_CTX_TRY_NUMBER": "2",
}
ASSERTED = {
    "dag_id": "etl_daily",
    "task_id": "load",
    "run_id": "scheduled__2026-12-01T00:00:00+00:00",
    "try_number": "2",
}
plant("audit", VALUE, PASSWORD)


def files(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "variables.json").write_text(json.dumps({"plain": VALUE}))
    (tmp_path / "connections.json").write_text(
        json.dumps({"db": {"conn_type": "postgres", "host": "h", "password": PASSWORD}})
    )
    (tmp_path / "config.json").write_text("{}")  # broken once the broker runs (see ``break_config``)
    return {
        "name": "files",
        "type": "file",
        "variables_file_path": str(tmp_path / "variables.json"),
        "connections_file_path": str(tmp_path / "connections.json"),
        "config_file_path": str(tmp_path / "config.json"),
    }


def break_config(tmp_path: Path) -> None:
    """From now on every config lookup fails with backend_error (the file is re-read when it changes)."""
    (tmp_path / "config.json").write_text("{not json at all")


def audit_lines(path: Path, count: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        found = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return found if len(found) >= count else None

    found: list[dict[str, Any]] = wait_for(enough, what=f"{count} audit lines")
    return found


@pytest.mark.parametrize("listener", ["unix-fast", "unix-app", "tcp"])
def test_one_audit_line_per_lookup_for_every_outcome(
    broker_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listener: str
) -> None:
    out = tmp_path / "audit.jsonl"
    listen: dict[str, Any] = {"fast_path": listener != "unix-app"}
    if listener == "tcp":
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        port = free_port()
        listen.update(socket=None, tcp=f"127.0.0.1:{port}", token_file=str(token_file))
    broker = broker_factory(
        {"listen": listen, "audit": {"enabled": True, "output": str(out)}, "backends": [files(tmp_path)]}
    )
    break_config(tmp_path)
    for key, value in TASK_ENV.items():
        monkeypatch.setenv(key, value)
    if listener == "tcp":
        client = BrokerClient(url=f"http://127.0.0.1:{port}", token=TOKEN)
        stranger = BrokerClient(url=f"http://127.0.0.1:{port}", token="not-the-token-at-all", context=None)
    else:
        client = BrokerClient(socket_path=broker.socket_path)
    assert client.get("variable", "plain") == VALUE  # miss
    assert client.get("variable", "plain") == VALUE  # hit (the fast path where it is on)
    assert client.get("connection", "db") is not None
    assert client.get("variable", "absent") is None
    with pytest.raises(BrokerUnavailableError):
        client.get("config", "broken")
    expected = [
        ("variable", "plain", "found", "files", "miss"),
        ("variable", "plain", "found", "files", "hit"),
        ("connection", "db", "found", "files", "miss"),
        ("variable", "absent", "not_found", None, None),
        ("config", "broken", "backend_error", None, None),
    ]
    if listener == "tcp":
        with pytest.raises(BrokerClientError) as refused:
            stranger.get("variable", "plain")
        assert refused.value.status == 401
        expected.append(("variable", "plain", "denied", None, None))
    found = audit_lines(out, len(expected))
    assert [(x["kind"], x["name"], x["outcome"], x["backend"], x["cache"]) for x in found] == expected
    assert len({x["request_id"] for x in found}) == len(found)
    for line in found[:5]:
        assert line["asserted"] == ASSERTED, line
        assert line["type"] == "audit" and line["team"] is None and line["verified"] is None
        if listener == "tcp":
            assert line["caller"]["listener"] == "tcp" and line["caller"]["token"].startswith("sha256:")
        else:
            assert line["caller"] == {"listener": "unix", "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}
    if listener == "tcp":
        assert found[5]["caller"] == {"listener": "tcp", "token": None} and found[5]["asserted"] is None
    text = out.read_text()
    assert VALUE not in text and PASSWORD not in text and TOKEN not in text
    assert all('"type": "audit"' not in line for line in broker.logs().splitlines())
    broker.stop()
    assert len(audit_lines(out, len(expected))) == len(expected)  # exactly one each, nothing more at stop


def test_a_refused_unix_peer_is_audited_as_denied(broker_factory: Any, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    broker = broker_factory(
        {
            "listen": {"allowed_uids": [4242]},
            "audit": {"enabled": True, "output": str(out)},
            "backends": [files(tmp_path)],
        }
    )
    assert broker.get("variable", "plain")[0] == 403
    (line,) = audit_lines(out, 1)
    assert (line["kind"], line["name"], line["outcome"], line["backend"]) == ("variable", "plain", "denied", None)
    assert line["caller"]["uid"] == os.getuid()


def test_an_unwritable_stream_fails_no_lookup(broker_factory: Any, tmp_path: Path) -> None:
    broker = broker_factory(
        {"audit": {"enabled": True, "output": "/dev/full", "readiness": True}, "backends": [files(tmp_path)]},
        start=False,
    )
    broker.start(wait_ready=False)
    wait_for(lambda: broker.readyz_status() is not None, what="metrics listener")
    for _ in range(3):
        status, data = broker.get("variable", "plain")
        assert status == 200 and data["value"] == VALUE
    wait_for(lambda: broker.metric("broker_audit_dropped_total", reason="ENOSPC") >= 3, what="ENOSPC counted")
    status, body = broker.metrics_get("/readyz")
    assert status == 503 and "audit stream cannot be written (ENOSPC)" in json.loads(body)["reasons"]
    assert broker.metric("broker_audit_failing") == 1


def test_names_can_be_audited_as_a_keyed_hash(broker_factory: Any, tmp_path: Path) -> None:
    from broker.audit import name_hmac

    out = tmp_path / "audit.jsonl"
    key = tmp_path / "audit.key"
    key.write_text("a-site-secret-hmac-key-for-names")
    broker = broker_factory(
        {
            "audit": {"enabled": True, "output": str(out), "name_hmac_key_file": str(key)},
            "backends": [files(tmp_path)],
        }
    )
    assert broker.get("connection", "db")[0] == 200
    (line,) = audit_lines(out, 1)
    assert line["name_hmac"] == name_hmac(b"a-site-secret-hmac-key-for-names", "db") and "name" not in line
