from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers.stores import fault_ca, harnesses, kv1_harness  # noqa: F401 - session fixtures, shared
from tests.support.broker_process import BrokerProcess

# Tests never reach outside loopback: scrub proxies that could route test traffic elsewhere.
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost,::1"


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Any]:
    """Start brokers as subprocesses; every one is stopped by its own pid at teardown."""
    started: list[BrokerProcess] = []

    def make(
        config: dict[str, Any], env: dict[str, str] | None = None, start: bool = True, cwd: Path | None = None
    ) -> BrokerProcess:
        sub = tmp_path / f"broker{len(started)}"
        sub.mkdir()
        proc = BrokerProcess(config, sub, env=env, cwd=cwd)
        started.append(proc)
        if start:
            proc.start()
        return proc

    yield make
    for proc in started:
        proc.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session-wide leak check: every broker log and error body of the run against every planted value."""
    from tests.support.figures import report
    from tests.support.leakcheck import SESSION

    if not SESSION.logs:
        return  # no broker ran (e.g. only unit tests were selected)
    if not SESSION.planted:
        report("leak check", "FAILED: brokers ran but no secret value was planted, the check would prove nothing")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    found = SESSION.scan()
    groups = len(set(SESSION.planted.values()))
    scope = (
        f"{len(SESSION.logs)} log files, {len(SESSION.audits)} audit streams and "
        f"{len(SESSION.error_bodies)} error bodies"
    )
    if found:
        report("leak check", f"FAILED: planted secret values found in {scope}: " + "; ".join(found[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        report(
            "leak check",
            f"{scope} scanned for {len(SESSION.originals)} planted values (and their URI-encoded forms) "
            f"from {groups} fixture groups: none found",
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the load, fault and fuzz tests measured, so every run's output carries the figures."""
    from tests.support.figures import FIGURES

    if FIGURES:
        terminalreporter.section("measured figures")
        for section, text in FIGURES:
            terminalreporter.write_line(f"{section}: {text}")
