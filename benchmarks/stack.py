"""The servers a benchmark run needs, all on loopback and all stopped by their own pid.

OpenBao dev server with KV v2 data, JWT auth and the database secrets engine over a throwaway
PostgreSQL (a leased, dynamic secret); ``bao proxy`` as the caching peer; broker daemons; wrk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers.openbao import ROOT_TOKEN, OpenBao, bao_binary  # noqa: E402
from tests.servers.postgres import SUPERUSER_PASSWORD, Postgres, pg_bin  # noqa: E402
from tests.support.net import free_port  # noqa: E402

PY = sys.executable
HERE = Path(__file__).resolve().parent
TOKEN = "bench-token-0123456789abcdef"
KV_CONN = {
    "conn_type": "postgres",
    "host": "db.example",
    "login": "airflow",
    "password": "kv-password-bench",
    "port": "5432",
    "schema": "airflow",
    "extra": '{"sslmode": "require"}',
}
POLICY = """
path "secret/data/*" { capabilities = ["read"] }
path "database/creds/airflow" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = predicate()
            if last:
                return last
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------------------------------------- broker


class Daemon:
    """``broker serve`` (or another launcher) as a subprocess; ready when /readyz answers 200."""

    def __init__(self, work: Path, config: dict[str, Any], *, launcher: list[str] | None = None, tcp: bool = False):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.socket = str(work / "broker.sock")
        self.metrics_port = free_port()
        self.tcp_port = free_port() if tcp else None
        listen: dict[str, Any] = {"socket": self.socket, **config.pop("listen", {})}
        if tcp:
            token_file = work / "token"
            token_file.write_text(TOKEN)
            listen |= {"tcp": f"127.0.0.1:{self.tcp_port}", "token_file": str(token_file)}
        self.config = {"listen": listen, "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"}, **config}
        self.config.setdefault("logging", {"level": "WARNING"})
        self.config_path = work / "broker.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.launcher = launcher or [PY, "-m", "broker", "serve"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after = 0.0

    def start(self, timeout: float = 30.0, extra_args: list[str] | None = None) -> Daemon:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._log = open(self.work / "broker.log", "ab")  # noqa: SIM115 - lives as long as the daemon
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            [*self.launcher[:1], *(extra_args or []), *self.launcher[1:], "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.work,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"broker exited {self.proc.returncode}: {self.logs()[-3000:]}")
            try:
                return self.metrics_get("/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, "broker /readyz", interval=0.002)
        self.ready_after = time.perf_counter() - self.started_at
        return self

    def logs(self) -> str:
        return (self.work / "broker.log").read_text(errors="replace")

    def metrics_get(self, path: str) -> tuple[int, str]:
        status, body = http_get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5)
        return status, body.decode()

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics_get("/metrics")[1].splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, rest = head.partition("{")
            if metric != name:
                continue
            found = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if "=" in kv)
            if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
                total += float(value)
        return total

    def tcp_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.tcp_port}{path}"

    def get_tcp(self, path: str) -> tuple[int, dict[str, Any]]:
        status, body = http_get(self.tcp_url(path), {"X-Broker-Token": TOKEN})
        return status, json.loads(body or b"{}")

    def get_unix(self, path: str) -> tuple[int, dict[str, Any]]:
        from tests.support.broker_process import UnixHTTPConnection

        conn = UnixHTTPConnection(self.socket, 10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def rss_kib(self) -> int:
        assert self.proc is not None
        return rss_kib(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, 30)
        if getattr(self, "_log", None):
            self._log.close()


# ---------------------------------------------------------------------------------------------- OpenBao


class Vault:
    """OpenBao dev server + PostgreSQL + the database engine + JWT auth + KV data, and ``bao proxy``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.bao = OpenBao(work / "bao")
        self.pg: Postgres | None = None
        self.proxy_proc: subprocess.Popen[bytes] | None = None
        self.proxy_port = 0
        self.jwt_path = work / "jwt.token"
        self.has_database = pg_bin() is not None

    def start(self) -> Vault:
        import jwt as pyjwt
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.bao.start()
        c = self.bao.client()
        c.sys.create_or_update_policy("bench", POLICY)
        self.bao.kv2_put("connections/kv_conn", KV_CONN)
        for i in range(10):
            self.bao.kv2_put(f"connections/herd_{i}", KV_CONN)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        c.sys.enable_auth_method("jwt")
        c.write("auth/jwt/config", jwt_validation_pubkeys=[pub.decode()], bound_issuer="https://issuer.bench")
        c.write(
            "auth/jwt/role/airflow",
            role_type="jwt",
            user_claim="sub",
            bound_audiences=["vault"],
            token_policies=["bench"],
            token_ttl="2h",
        )
        now = int(time.time())
        claims = {
            "iss": "https://issuer.bench",
            "sub": "system:serviceaccount:airflow:airflow",
            "aud": "vault",
            "iat": now,
            "exp": now + 7200,
        }
        self.jwt_path.write_text(pyjwt.encode(claims, key, algorithm="RS256"))
        if self.has_database:
            self.pg = Postgres().start()
            c.sys.enable_secrets_engine("database")
            c.write(
                "database/config/pg",
                plugin_name="postgresql-database-plugin",
                allowed_roles=["airflow"],
                connection_url=(
                    f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{self.pg.port}/postgres?sslmode=disable"
                ),
                username="postgres",
                password=SUPERUSER_PASSWORD,
            )
            c.write(
                "database/roles/airflow",
                db_name="pg",
                default_ttl="1h",
                max_ttl="2h",
                creation_statements=[
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"
                ],
            )
        return self

    def start_proxy(self) -> int:
        """``bao proxy`` with auto-auth (jwt), a cache, and the auto-auth token on proxied requests."""
        self.proxy_port = free_port()
        home = self.work / "proxy"
        home.mkdir(exist_ok=True)
        hcl = f"""
vault {{ address = "{self.bao.url}" }}
auto_auth {{
  method "jwt" {{
    config = {{
      path = "{self.jwt_path}"
      role = "airflow"
      remove_jwt_after_reading = false
    }}
  }}
}}
cache {{}}
api_proxy {{ use_auto_auth_token = true }}
listener "tcp" {{
  address = "127.0.0.1:{self.proxy_port}"
  tls_disable = true
}}
"""
        (home / "proxy.hcl").write_text(hcl)
        env = {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "BAO_LOG_LEVEL": "warn"}
        self._proxy_log = open(home / "proxy.log", "ab")  # noqa: SIM115 - lives as long as the proxy
        self.proxy_proc = subprocess.Popen(
            [bao_binary(), "proxy", f"-config={home / 'proxy.hcl'}"],
            stdout=self._proxy_log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
        )
        wait_for(lambda: http_get(self.proxy_url("/v1/secret/data/connections/kv_conn"))[0] == 200, 30, "bao proxy")
        return self.proxy_port

    def proxy_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.proxy_port}{path}"

    def proxy_caches_dynamic(self) -> bool:
        """Two reads of the leased secret through the proxy give the same credential."""
        first = json.loads(http_get(self.proxy_url("/v1/database/creds/airflow"))[1])
        second = json.loads(http_get(self.proxy_url("/v1/database/creds/airflow"))[1])
        return bool(first["data"]["username"] == second["data"]["username"] and first.get("lease_id"))

    def broker_backend(self, **extra: Any) -> dict[str, Any]:
        backend: dict[str, Any] = {
            "name": "vault",
            "type": "vault",
            "url": self.bao.url,
            "auth": {"method": "jwt", "role": "airflow", "token_path": str(self.jwt_path)},
            "timeout": 5,
            **extra,
        }
        if self.pg is not None:
            backend["dynamic_connections"] = {
                "pg_dynamic": {
                    "path": "database/creds/airflow",
                    "fields": {
                        "conn_type": "postgres",
                        "host": "127.0.0.1",
                        "port": self.pg.port,
                        "schema": "postgres",
                        "login": "{{ username }}",
                        "password": "{{ password }}",
                    },
                }
            }
        return backend

    @property
    def root_token(self) -> str:
        return ROOT_TOKEN

    def stop(self) -> None:
        stop_process(self.proxy_proc)
        if getattr(self, "_proxy_log", None):
            self._proxy_log.close()
        self.bao.stop()
        if self.pg is not None:
            self.pg.stop()


# ---------------------------------------------------------------------------------------------- load tools


def ensure_wrk() -> str | None:
    """The wrk binary; installs the Debian package when running as root with apt, else None."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: installing the Debian package (apt-get install -y wrk)", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    return shutil.which("wrk")


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _to_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, connections: int, seconds: float, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One wrk run (one thread): req/s, p50, p99; refuses a run with errors or non-2xx answers."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _to_us(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _to_us(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if bad or errors:
        raise RuntimeError(f"wrk against {url}: {bad.group(0) if bad else ''} {errors.group(0) if errors else ''}")
    return {"rps": rps, "p50_us": p50, "p99_us": p99}


def loadgen(*args: str, timeout: float = 120) -> dict[str, Any]:
    out = subprocess.run(
        [PY, str(HERE / "loadgen.py"), *args], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def trivial_server(path: str) -> Iterator[None]:
    proc = subprocess.Popen(
        [PY, str(HERE / "loadgen.py"), "trivial-server", "--unix", path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield
    finally:
        stop_process(proc)  # type: ignore[arg-type]


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over repeated runs (and the spread of req/s)."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key in ("rps", "p50_us", "p99_us"):
        out[key] = round(statistics.median(r[key] for r in runs), 1)
    out["rps_min"] = round(min(r["rps"] for r in runs), 1)
    out["rps_max"] = round(max(r["rps"] for r in runs), 1)
    return out


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """``moto_server`` on a free loopback port; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(PY).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(endpoint + "/moto-api/")[0] == 200, 30, "moto server")
        yield endpoint
    finally:
        stop_process(proc)  # type: ignore[arg-type]
