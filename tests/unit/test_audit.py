"""The audit writer on its own: the line's fields, hashed names, a full disk, a closed stream, a full queue,
rotation, and its config errors."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from broker.audit import AuditLog, Caller, asserted_value, name_hmac, token_caller
from broker.backends.base import ConfigurationError
from broker.config import AuditConfig, validate_config
from broker.metrics import Metrics


def make(output: str, **cfg: Any) -> AuditLog:
    return AuditLog(AuditConfig(enabled=True, output=output, **cfg), Metrics())


async def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    """Poll without blocking the loop (the audit log formats its batches on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def lines(path: Path, count: int) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        if not path.exists():
            return None
        found = [json.loads(line) for line in path.read_text().splitlines()]
        return found if len(found) >= count else None

    result: list[dict[str, Any]] = await wait_for(ready, what=f"{count} audit lines")
    return result


def sample(log: AuditLog, metric: str, **labels: str) -> float:
    return log.metrics.registry.get_sample_value(metric, labels or None) or 0.0


async def test_one_line_per_lookup_with_every_field(tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    log = make(str(out))
    log.start()
    caller = Caller("unix", uid=50000, gid=0, pid=4242)
    asserted = [("dag_id", b"etl"), ("task_id", b"load"), ("run_id", b"manual__1"), ("try_number", b"2")]
    log.record(b"rid1", "connection", "pg", "found", backend="vault", cache="hit", caller=caller, asserted=asserted)
    log.record("rid2", "variable", "nope", "not_found", team="blue", caller=token_caller(b"t" * 32))
    await log.aclose()
    first, second = await lines(out, 2)
    assert first == {
        "time": first["time"],
        "type": "audit",
        "request_id": "rid1",
        "kind": "connection",
        "name": "pg",
        "team": None,
        "backend": "vault",
        "outcome": "found",
        "cache": "hit",
        "caller": {"listener": "unix", "uid": 50000, "gid": 0, "pid": 4242},
        "verified": None,
        "asserted": {"dag_id": "etl", "task_id": "load", "run_id": "manual__1", "try_number": "2"},
    }
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-01-01T00:00:00.000Z")
    assert second["caller"] == {"listener": "tcp", "token": second["caller"]["token"]}
    assert second["caller"]["token"].startswith("sha256:") and "t" * 16 not in second["caller"]["token"]
    assert second["team"] == "blue" and second["asserted"] is None and second["backend"] is None
    assert sample(log, "broker_audit_lines_total") == 2
    assert os.stat(out).st_mode & 0o777 == 0o640


async def test_names_can_be_logged_as_a_keyed_hash(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"0123456789abcdef-audit-key\n")
    out = tmp_path / "audit.jsonl"
    log = make(str(out), name_hmac_key_file=key_file)
    log.start()
    log.record("r", "connection", "warehouse", "found")
    await log.aclose()
    (line,) = await lines(out, 1)
    assert "name" not in line and "warehouse" not in out.read_text()
    assert line["name_hmac"] == name_hmac(b"0123456789abcdef-audit-key", "warehouse")
    assert line["name_hmac"].startswith("hmac-sha256:") and len(line["name_hmac"]) == len("hmac-sha256:") + 64


def test_a_short_or_missing_key_is_a_config_error(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tiny")
    for path in (short, tmp_path / "absent"):
        with pytest.raises(ConfigurationError) as err:
            make(str(tmp_path / "a"), name_hmac_key_file=path)
        assert err.value.errors[0].startswith("audit.name_hmac_key_file:")


def test_output_is_a_stream_or_a_file_path() -> None:
    backends = [{"name": "f", "type": "file"}]
    with pytest.raises(ConfigurationError) as err:
        validate_config({"audit": {"output": "", "color": 1}, "backends": backends})
    assert sorted(err.value.errors) == [
        "audit.color: unknown key",
        'audit.output: output must be "stderr", "stdout" or a file path, got \'\'',
    ]
    assert validate_config({"audit": {"enabled": True}, "backends": backends}).audit.output == "stderr"
    relative = validate_config({"audit": {"output": "audit.log"}, "backends": backends}).audit.output
    assert relative == Path("audit.log")  # taken from the config file's directory by load_config


async def test_a_full_disk_never_fails_a_record_and_is_counted_and_reported() -> None:
    log = make("/dev/full", readiness=True)
    log.start()
    assert log.not_ready_reason() is None
    for i in range(10):
        log.record(f"r{i}", "variable", "k", "found")  # never raises
    await wait_for(lambda: sample(log, "broker_audit_dropped_total", reason="ENOSPC") == 10, what="ENOSPC counted")
    assert sample(log, "broker_audit_failing") == 1
    assert log.not_ready_reason() == "audit stream cannot be written (ENOSPC)"
    await log.aclose()


async def test_a_closed_stream_is_counted_and_recovers_when_writes_work_again(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads stderr any more: writes fail with EPIPE
    log = make("stderr")
    log.streams = {"stderr": write_end}
    log.start()
    log.record("r1", "variable", "k", "found")
    await wait_for(lambda: sample(log, "broker_audit_dropped_total", reason="EPIPE") == 1, what="EPIPE counted")
    assert log.not_ready_reason() is None  # readiness is not tied to the stream unless configured
    out = tmp_path / "recovered"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    log.streams = {"stderr": fd}
    log.record("r2", "variable", "k", "found")
    assert [line["request_id"] for line in await lines(out, 1)] == ["r2"]
    await wait_for(lambda: sample(log, "broker_audit_failing") == 0, what="failing cleared")
    await log.aclose()
    os.close(write_end)
    os.close(fd)


async def test_a_full_queue_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    log = make(str(tmp_path / "a"), queue_size=100)  # not started: nothing drains the queue
    for i in range(150):
        log.record(f"r{i}", "variable", "k", "found")
    assert sample(log, "broker_audit_dropped_total", reason="queue_full") == 50
    log.start()
    await log.aclose()
    assert len(await lines(tmp_path / "a", 100)) == 100


async def test_a_rotated_file_is_followed(tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    log = make(str(out))
    log._checked_every = 0.0
    log.start()
    log.record("before", "variable", "k", "found")
    await lines(out, 1)
    out.rename(tmp_path / "audit.jsonl.1")
    log.record("after", "variable", "k", "found")
    assert [line["request_id"] for line in await lines(out, 1)] == ["after"]
    await log.aclose()


def test_asserted_values_are_printable_and_bounded() -> None:
    assert asserted_value(b"dag\x1b[31m\xff") == "dag?[31m\ufffd"
    assert len(asserted_value("x" * 1000)) == 250


async def test_a_verified_pod_identity_has_its_own_place(tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    log = make(str(out))
    log.start()
    pod = (("namespace", "airflow"), ("service_account", "worker"), ("pod", "worker-7"))
    log.record("r", "variable", "k", "found", caller=Caller("unix", uid=1, gid=2, pid=3, verified=pod))
    log.record("r2", "variable", "k", "found", caller=Caller("unix", uid=1, gid=2, pid=3))
    await log.aclose()
    first, second = await lines(out, 2)
    assert first["verified"] == {"namespace": "airflow", "service_account": "worker", "pod": "worker-7"}
    assert second["verified"] is None and first["caller"] == second["caller"]


async def test_every_line_is_valid_json_whatever_the_inputs(tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    log = make(str(out))
    log.start()
    log.record('a"b\\c\n', "variable", 'n"a\\me', "backend_error", team='t"\n', asserted={"dag_id": 'd"\\'})
    await log.aclose()
    (line,) = await lines(out, 1)
    assert (line["request_id"], line["name"], line["team"]) == ('a"b\\c\n', 'n"a\\me', 't"\n')
    assert line["asserted"] == {"dag_id": 'd"\\'}
