"""Secrets are never written to disk: a broker serving a secret many times, reloading and stopping, with its
working directory, HOME and TMPDIR pointed at empty directories, leaves no file there but its socket, and holds
no regular file open for writing except the log it was given."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support.broker_process import BrokerProcess, wait_for
from tests.support.leakcheck import plant

VALUE = "never-on-disk-secret-value-2a7f"
plant("no-disk", VALUE)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


def writable_regular_files(pid: int) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith("/") and flags & WRITE_FLAGS and Path(target).is_file():
            found.append(target)
    return found


def test_nothing_but_the_log_is_written(tmp_path: Path) -> None:
    home, tmp, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for d in (home, tmp, cwd):
        d.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache")}
    env["AIRFLOW_VAR_DISK_CHECK"] = VALUE
    work = tmp_path / "b"
    work.mkdir()
    config = {"listen": {"socket": str(cwd / "broker.sock")}, "backends": [{"name": "env", "type": "env"}]}
    broker = BrokerProcess(config, work, env=env, cwd=cwd).start()
    try:
        for _ in range(200):
            assert broker.get("variable", "disk_check")[1]["value"] == VALUE
        assert broker.proc is not None
        assert set(writable_regular_files(broker.proc.pid)) == {str(broker.log_path)}  # stdout and stderr
        broker.signal(signal.SIGHUP)
        wait_for(lambda: broker.metric("broker_config_reloads_total", outcome="ok") == 1, 10, what="reload")
    finally:
        assert broker.stop() == 0
    leftovers = [p for d in (home, tmp, cwd) for p in d.rglob("*")]
    assert leftovers == [], leftovers
    assert VALUE not in broker.logs()
