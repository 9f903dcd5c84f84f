"""The session-wide leak check can fail: it finds a planted value (plain or URI-encoded) in a log or an error
body, reports the label and place but never the value, and stays quiet when nothing leaked."""

from __future__ import annotations

from pathlib import Path

from tests.support.leakcheck import LeakCheck


def test_scanner_finds_planted_values_and_never_prints_them(tmp_path: Path) -> None:
    check = LeakCheck()
    check.plant("fixture-a", "p@ss/w:rd#-leak-1234")
    clean = tmp_path / "clean.log"
    clean.write_text('{"msg": "lookup", "name": "pg"}\n')
    check.record_log(clean)
    check.record_error("GET /v1/variables/x", b'{"error": "not_found"}')
    assert check.scan() == []

    leaky = tmp_path / "leaky.log"
    leaky.write_text('{"msg": "oops", "uri": "postgres://u:p%40ss%2Fw%3Ard%23-leak-1234@db"}\n')
    check.record_log(leaky)
    check.record_error("GET /v1/variables/y", b'{"error": "backend_error", "message": "p@ss/w:rd#-leak-1234"}')
    found = check.scan()
    assert found == [f"fixture-a in log {leaky}", "fixture-a in the error body of GET /v1/variables/y"]
    assert not any("leak-1234" in line for line in found)


def test_scanner_reads_audit_streams_too(tmp_path: Path) -> None:
    check = LeakCheck()
    check.plant("fixture-b", "audit-leak-value-5678")
    stream = tmp_path / "audit.jsonl"
    stream.write_text('{"type": "audit", "name": "pg", "outcome": "found"}\n')
    check.record_audit(stream)
    assert check.scan() == []
    stream.write_text('{"type": "audit", "name": "audit-leak-value-5678"}\n')
    assert check.scan() == [f"fixture-b in audit stream {stream}"]
