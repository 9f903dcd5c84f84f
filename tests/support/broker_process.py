"""Run ``broker serve`` as a real subprocess on a temp unix socket, and talk to it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from tests.support import leakcheck
from tests.support.net import free_port

KIND_PATH = {"connection": "connections", "variable": "variables", "config": "config"}


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class BrokerProcess:
    """A broker daemon for one test: ``start()``, requests, metrics, ``stop()`` by its own pid."""

    def __init__(
        self, config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.tmp_path = Path(tmp_path)
        self.config = json.loads(json.dumps(config))
        listen = self.config.setdefault("listen", {})
        listen.setdefault("socket", str(self.tmp_path / "broker.sock"))
        self.metrics_port = free_port()
        self.config.setdefault("metrics", {"listen": f"127.0.0.1:{self.metrics_port}"})
        if self.config["metrics"].get("listen"):
            self.metrics_port = int(self.config["metrics"]["listen"].rsplit(":", 1)[1])
        self.config_path = self.tmp_path / "broker.yaml"
        self.socket_path = str(listen["socket"])
        self.env = env
        self.cwd = cwd or self.tmp_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.tmp_path / "broker.log"
        self._log_fh: Any = None

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> BrokerProcess:
        self.write_config()
        if self._log_fh is not None:
            self._log_fh.close()
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_fh = open(self.log_path, "ab")
        leakcheck.SESSION.record_log(self.log_path)
        audit_output = str(self.config.get("audit", {}).get("output", ""))
        if audit_output.startswith("/") and not audit_output.startswith("/dev/"):
            leakcheck.SESSION.record_audit(Path(audit_output))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(self.config_path)],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return self.metrics_get("/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, what="broker /readyz")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        conn = UnixHTTPConnection(self.socket_path, timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status >= 400:
                leakcheck.SESSION.record_error(f"{method} {path[:80]}", raw)
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                data = {"_raw": raw.decode(errors="replace")}
            return resp.status, data, dict(resp.getheaders())
        finally:
            conn.close()

    def get(self, kind: str, name: str) -> tuple[int, dict[str, Any]]:
        status, data, _ = self.request("GET", f"/v1/{KIND_PATH[kind]}/{quote(name, safe='')}")
        return status, data

    def invalidate(self, kind: str | None = None, name: str | None = None) -> int:
        body = {k: v for k, v in (("kind", kind), ("name", name)) if v}
        return self.request("POST", "/v1/cache/invalidate", json.dumps(body).encode())[0]

    def metrics_get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def readyz_status(self) -> int | None:
        """/readyz's status, or None while the metrics listener is not up yet."""
        try:
            return self.metrics_get("/readyz")[0]
        except OSError:
            return None

    def metrics(self) -> str:
        return self.metrics_get("/metrics")[1]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, rest = head.partition("{")
            if metric != name:
                continue
            found = dict(
                (kv.split("=", 1)[0], kv.split("=", 1)[1].strip('"')) for kv in rest.rstrip("}").split(",") if "=" in kv
            )
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return self.proc.returncode

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
