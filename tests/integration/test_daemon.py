"""The daemon as a real subprocess: client, CLI, listeners, access control, reload, drain, bad input."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.client import BrokerClient, BrokerUnavailableError
from tests.support.broker_process import UnixHTTPConnection, wait_for
from tests.support.leakcheck import plant
from tests.support.net import free_port

PASSWORD = "p@ss/w:rd#-planted-9f3a"
VARIABLE = "planted-variable-value-51c2"
CONFIG_VALUE = "planted-config-value-77de"
PLANTED = [PASSWORD, VARIABLE, CONFIG_VALUE]
plant("daemon", *PLANTED)


def write_secrets(root: Path, variable: str = VARIABLE) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "connections.json").write_text(
        json.dumps(
            {
                "pg": {
                    "conn_type": "postgres",
                    "host": "db",
                    "login": "u",
                    "password": PASSWORD,
                    "port": 5432,
                    "extra": {"sslmode": "require", "nested": {"a": [1, 2]}},
                },
                "uri_conn": "mysql://u:p%40ss@h:3306/s",
            }
        )
    )
    (root / "variables.yaml").write_text(yaml.safe_dump({"plain": variable, "json_var": {"a": 1}}))
    (root / "config.env").write_text(f"sql_alchemy_conn_secret={CONFIG_VALUE}\n")
    return {
        "name": "files",
        "type": "file",
        "connections_file_path": str(root / "connections.json"),
        "variables_file_path": str(root / "variables.yaml"),
        "config_file_path": str(root / "config.env"),
    }


@pytest.fixture
def files_backend(tmp_path: Path) -> dict[str, Any]:
    return write_secrets(tmp_path / "secrets")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def assert_no_planted_values(text: str) -> None:
    for value in PLANTED:
        assert value not in text


def test_client_and_cli_against_the_daemon(broker_factory: Any, files_backend: dict[str, Any]) -> None:
    broker = broker_factory({"backends": [files_backend]})
    client = BrokerClient(socket_path=broker.socket_path)
    conn = json.loads(client.get("connection", "pg") or "")
    assert conn == {
        "conn_type": "postgres",
        "host": "db",
        "login": "u",
        "password": PASSWORD,
        "port": 5432,
        "extra": {"sslmode": "require", "nested": {"a": [1, 2]}},
    }
    assert json.loads(client.get("connection", "uri_conn") or "")["password"] == "p@ss"
    assert client.get("variable", "plain") == VARIABLE
    assert json.loads(client.get("variable", "json_var") or "") == {"a": 1}
    assert client.get("config", "sql_alchemy_conn_secret") == CONFIG_VALUE
    assert client.get("variable", "absent") is None

    found = cli("get", "variable", "plain", "--socket", broker.socket_path)
    assert (found.returncode, found.stdout) == (0, VARIABLE + "\n")
    missing = cli("get", "connection", "absent", "--socket", broker.socket_path)
    assert missing.returncode == 1 and "not found" in missing.stderr
    unreachable = cli("get", "variable", "plain", "--socket", str(broker.tmp_path / "nope.sock"))
    assert unreachable.returncode == 2 and "nope.sock" in unreachable.stderr

    status, body, headers = broker.request("GET", "/v1/variables/plain")
    assert status == 200 and body["cache"] == "hit" and body["backend"] == "files"
    assert headers["Cache-Control"] == "no-store" and headers["X-Broker-Cache"] == "hit"
    assert broker.metric("broker_backend_calls_total", backend="files", operation="fetch", outcome="ok") >= 4
    assert broker.metric("broker_requests_total", kind="variable", outcome="hit") >= 1
    assert broker.invalidate("variable", "plain") == 204
    assert broker.get("variable", "plain")[1]["cache"] == "miss"
    assert broker.invalidate() == 204
    assert_no_planted_values(broker.logs())
    assert_no_planted_values(broker.metrics())


def test_unreachable_broker_raises_from_client(tmp_path: Path) -> None:
    client = BrokerClient(socket_path=str(tmp_path / "absent.sock"), timeout=1)
    with pytest.raises(BrokerUnavailableError, match=r"absent\.sock"):
        client.get("variable", "x")


def test_tcp_listener_token_and_forwarding(broker_factory: Any, files_backend: dict[str, Any], tmp_path: Path) -> None:
    token = "t" * 40
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    port = free_port()
    broker = broker_factory(
        {"listen": {"tcp": f"127.0.0.1:{port}", "token_file": str(token_file)}, "backends": [files_backend]}
    )

    def get(headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v1/variables/plain", headers=headers)
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        return resp.status, data

    assert get({"X-Broker-Token": token})[0] == 200
    assert get({"X-Broker-Token": token})[1]["value"] == VARIABLE
    assert get({"X-Broker-Token": "wrong" * 8})[0] == 401
    assert get({})[1]["error"] == "unauthorized"
    assert get({"X-Broker-Token": token, "X-Forwarded-For": "10.0.0.1"})[0] == 400
    assert get({"X-Broker-Token": token, "Forwarded": "for=10.0.0.1"})[1]["error"] == "bad_request"
    assert BrokerClient(url=f"http://127.0.0.1:{port}", token=token).get("variable", "plain") == VARIABLE
    via_cli = cli("get", "variable", "plain", "--url", f"http://127.0.0.1:{port}", "--token-file", str(token_file))
    assert via_cli.returncode == 0 and via_cli.stdout.strip() == VARIABLE
    assert broker.metric("broker_rejected_total", reason="unauthorized") == 2


def test_peer_uid_allowlist(broker_factory: Any, files_backend: dict[str, Any]) -> None:
    me = os.getuid()
    denied = broker_factory({"listen": {"allowed_uids": [me + 12345]}, "backends": [files_backend]})
    status, body = denied.get("variable", "plain")
    assert (status, body["error"]) == (403, "forbidden")
    allowed = broker_factory(
        {"listen": {"allowed_uids": [me + 12345], "allowed_gids": [os.getgid()]}, "backends": [files_backend]}
    )
    assert allowed.get("variable", "plain")[0] == 200


@pytest.mark.parametrize(
    "listen",
    [
        {"peer_teams": [{"uid": os.getuid(), "team": "alpha"}]},
        {"team": "gamma", "peer_teams": [{"gid": os.getgid(), "team": "alpha"}]},
        {"team": "gamma", "peer_teams": [{"uid": os.getuid(), "team": "alpha"}, {"gid": os.getgid(), "team": "beta"}]},
    ],
    ids=["by uid", "by gid over the listener's team", "uid over gid"],
)
def test_peer_teams_bind_this_process_by_its_uid_or_gid(
    broker_factory: Any, files_backend: dict[str, Any], listen: dict[str, Any]
) -> None:
    broker = broker_factory({"multi_team": True, "listen": listen, "backends": [files_backend]})
    for path in ("/v1/variables/plain", "/v1/variables/plain?team=alpha", "/v1/variables/plain"):
        status, body, _ = broker.request("GET", path)
        assert (status, body["value"]) == (200, VARIABLE), path
    for other in ("beta", "gamma"):
        status, body, _ = broker.request("GET", f"/v1/variables/plain?team={other}")
        assert (status, body["error"]) == (403, "forbidden"), other
    # One load for the bound team (the file backend reads the same value for every team), then the fast
    # path's own hits, the same way with no team and with the bound one.
    assert broker.metric("broker_requests_total", kind="variable", outcome="miss") == 1
    assert broker.metric("broker_requests_total", kind="variable", outcome="hit") == 2
    assert broker.metric("broker_rejected_total", reason="team_denied") == 2
    assert broker.logs().count("request for another team refused") == 2


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_socket_mode_whatever_the_umask(broker_factory: Any, files_backend: dict[str, Any], umask: int) -> None:
    old = os.umask(umask)
    try:
        broker = broker_factory({"listen": {"socket_mode": "0660"}, "backends": [files_backend]})
    finally:
        os.umask(old)
    mode = os.stat(broker.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


def test_stale_socket_replaced_and_regular_file_refused(
    broker_factory: Any, files_backend: dict[str, Any], tmp_path: Path
) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    broker = broker_factory({"listen": {"socket": str(stale)}, "backends": [files_backend]})
    assert broker.get("variable", "plain")[0] == 200
    regular = tmp_path / "regular.sock"
    regular.write_text("keep me")
    other = broker_factory({"listen": {"socket": str(regular)}, "backends": [files_backend]}, start=False)
    other.start(wait_ready=False)
    assert other.proc is not None and other.proc.wait(30) == 2
    assert regular.read_text() == "keep me"
    assert "not a socket" in other.logs()


def test_sighup_reload_keeps_unchanged_backends_entries(broker_factory: Any, tmp_path: Path) -> None:
    first = write_secrets(tmp_path / "one")
    second = write_secrets(tmp_path / "two", variable="second-backend-value")
    second["name"] = "second"
    os.environ["AIRFLOW_VAR_FROM_ENV"] = "env-value"
    try:
        broker = broker_factory({"backends": [first, {"name": "env", "type": "env"}]})
    finally:
        del os.environ["AIRFLOW_VAR_FROM_ENV"]
    assert broker.get("variable", "plain")[1]["value"] == VARIABLE
    assert broker.get("variable", "from_env")[1]["value"] == "env-value"
    calls = broker.metric("broker_backend_calls_total", operation="fetch")

    # A bad reload keeps the running config.
    good = dict(broker.config)
    broker.config_path.write_text("backends: [{name: x, type: nope}]\n")
    broker.signal(signal.SIGHUP)
    wait_for(lambda: broker.metric("broker_config_reloads_total", outcome="invalid") == 1, what="invalid reload")
    assert "reload refused" in broker.logs()
    assert broker.get("variable", "plain")[1]["cache"] == "hit"

    # Change only the second backend: the first backend's entries survive, the env entry is dropped.
    broker.write_config({**good, "backends": [first, second]})
    broker.signal(signal.SIGHUP)
    wait_for(lambda: broker.metric("broker_config_reloads_total", outcome="ok") == 1, what="reload")
    assert broker.get("variable", "plain")[1]["cache"] == "hit"
    assert broker.metric("broker_backend_calls_total", operation="fetch") == calls
    assert broker.get("variable", "from_env")[0] == 404

    # Put the changed backend first: entries of the old first backend can be shadowed, so they go.
    broker.write_config({**good, "backends": [second, first]})
    broker.signal(signal.SIGHUP)
    wait_for(lambda: broker.metric("broker_config_reloads_total", outcome="ok") == 2, what="reload")
    assert broker.get("variable", "plain")[1]["value"] == "second-backend-value"


def test_sigterm_drains_and_exits_zero(broker_factory: Any, files_backend: dict[str, Any]) -> None:
    broker = broker_factory({"backends": [files_backend]})
    results: list[Any] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                conn = UnixHTTPConnection(broker.socket_path, 5)
                conn.connect()
            except OSError:
                results.append("refused")  # the listener is closed: a clean refusal, not a lost request
                return
            try:
                conn.request("GET", "/v1/variables/plain")
                results.append(conn.getresponse().status)
            except Exception as exc:  # a reset mid-request would land here
                results.append(repr(exc))
            finally:
                conn.close()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) > 200, what="load")
    broker.signal(signal.SIGTERM)
    assert broker.proc.wait(30) == 0
    stop.set()
    for t in threads:
        t.join(10)
    bad = [r for r in results if r not in (200, "refused")]
    assert not bad, bad[:5]
    assert not os.path.exists(broker.socket_path)
    assert '"msg": "stopped"' in broker.logs()


BAD_REQUESTS = [
    ("GET", "/v1/variables/" + "a" * 10_000, 400, "bad_request"),
    ("GET", "/v1/variables/a%2F..%2Fb", 400, "bad_request"),
    ("GET", "/v1/variables/%2e%2e", 400, "bad_request"),
    ("GET", "/v1/variables/a%00b", 400, "bad_request"),
    ("GET", "/v1/variables/%ff%fe", 400, "bad_request"),
    ("GET", "/v1/variables/a/b", 404, "not_found"),
    ("GET", "/v1/secrets/x", 404, "not_found"),
    ("GET", "/nope", 404, "not_found"),
    ("DELETE", "/v1/variables/plain", 405, "method_not_allowed"),
    ("GET", "/v1/cache/invalidate", 405, "method_not_allowed"),
    ("POST", "/v1/cache/invalidate", 400, "bad_request", b"{not json"),
    ("POST", "/v1/cache/invalidate", 400, "bad_request", b'{"kind": "secret"}'),
    ("POST", "/v1/cache/invalidate", 400, "bad_request", b'{"name": "x"}'),
    ("POST", "/v1/cache/invalidate", 400, "bad_request", b'{"kind": "variable", "name": "../x"}'),
    ("POST", "/v1/cache/invalidate", 400, "bad_request", b'{"extra": 1}'),
    ("POST", "/v1/cache/invalidate", 413, "bad_request", b"{" + b" " * 20_000 + b"}"),
]


def test_malformed_and_oversized_requests_get_json_4xx(broker_factory: Any, files_backend: dict[str, Any]) -> None:
    broker = broker_factory({"backends": [files_backend]})
    for method, path, status, code, *body in BAD_REQUESTS:
        got, data, headers = broker.request(method, path, body=body[0] if body else None)
        assert (got, data.get("error")) == (status, code), (method, path[:40])
        assert headers.get("Content-Type", "").startswith("application/json")
    assert broker.proc.poll() is None
    assert broker.get("variable", "plain")[0] == 200


def test_airflow_client_imports_with_stdlib_and_airflow_only(tmp_path: Path) -> None:
    """broker.airflow against a minimal stand-in for Airflow's base class, with site-packages disabled."""
    stub = tmp_path / "stub" / "airflow" / "secrets"
    stub.mkdir(parents=True)
    (stub.parent / "__init__.py").write_text("")
    (stub / "__init__.py").write_text("class BaseSecretsBackend:\n    def __init__(self, **kw):\n        pass\n")
    repo = Path(__file__).resolve().parents[2]
    code = (
        "import sys; sys.path[:0] = [{!r}, {!r}]\n"
        "from broker.airflow import BrokerSecretsBackend\n"
        "b = BrokerSecretsBackend(socket_path='/nonexistent.sock', timeout='0.5', extra_kw='x')\n"
        "assert b.timeout == 0.5\n"
        "heavy = ('aiohttp', 'pydantic', 'yaml', 'cachetools', 'prometheus_client')\n"
        "mods = [m for m in sys.modules if m.split('.')[0] in heavy]\n"
        "assert not mods, mods\n"
        "print('ok')\n"
    ).format(str(tmp_path / "stub"), str(repo))
    result = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_check_command(tmp_path: Path, files_backend: dict[str, Any]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backends": [files_backend, {"name": "env", "type": "env"}]}))
    ok = cli("check", "--config", str(cfg))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok    files (file)" in ok.stdout and "ok    env (env)" in ok.stdout
    broken = dict(files_backend, variables_file_path=str(tmp_path / "missing.json"))
    cfg.write_text(yaml.safe_dump({"backends": [broken]}))
    bad = cli("check", "--config", str(cfg))
    assert bad.returncode == 2 and "FAIL  files (file)" in bad.stdout


def test_check_warns_when_a_file_backend_can_serve_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    nothing = {"name": "files", "type": "file", "connections_file_path": str(tmp_path / "absent" / "connections")}
    cfg.write_text(yaml.safe_dump({"backends": [nothing, {"name": "env", "type": "env"}]}))
    lenient = cli("check", "--config", str(cfg))
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert f"WARN  files (file): serves nothing: none of its files exists ({tmp_path}/absent/connections{{" in (
        lenient.stdout
    )
    assert "WARN  env" not in lenient.stdout and "--strict makes them fail" in lenient.stdout
    strict = cli("check", "--strict", "--config", str(cfg))
    assert strict.returncode == 2 and "WARN  files (file)" in strict.stdout
    cfg.write_text(yaml.safe_dump({"backends": [{"name": "files", "type": "file"}]}))
    unset = cli("check", "--strict", "--config", str(cfg))
    assert unset.returncode == 2 and "serves nothing: no connections_file_path" in unset.stdout


def test_relative_paths_in_a_config_file_resolve_against_its_directory(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    for cwd in (repo, tmp_path):
        result = subprocess.run(
            [sys.executable, "-m", "broker", "check", "--strict", "--config", str(repo / "examples" / "broker.yaml")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"files: {repo}/examples/secrets/connections.json" in result.stdout
    relative = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--strict", "--config", "examples/broker.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo,
    )
    assert relative.returncode == 0, relative.stdout + relative.stderr


def test_check_from_another_directory_takes_every_path_from_the_config_files_directory(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    write_secrets(conf / "secrets")
    (conf / "keys").mkdir()
    (conf / "keys" / "api-token").write_text("t" * 32)
    (conf / "keys" / "names.key").write_text("k" * 32)
    (conf / "audit").mkdir()
    (conf / "broker.yaml").write_text(
        yaml.safe_dump(
            {
                "listen": {
                    "socket": "run/broker.sock",
                    "tcp": f"127.0.0.1:{free_port()}",
                    "token_file": "keys/api-token",
                },
                "audit": {"enabled": True, "output": "audit/reads.jsonl", "name_hmac_key_file": "keys/names.key"},
                "backends": [{"name": "files", "type": "file", "connections_file_path": "secrets/connections.json"}],
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", "check", "--strict", "--config", str(conf / "broker.yaml")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=elsewhere,
        )

    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (
        f"ok    listen.token_file: {conf}/keys/api-token",
        f"ok    audit.name_hmac_key_file: {conf}/keys/names.key",
        f"ok    audit.output: {conf}/audit/reads.jsonl",
        f"files: {conf}/secrets/connections.json",
    ):
        assert line in result.stdout, result.stdout
    (conf / "audit").rmdir()
    missing = check()
    assert missing.returncode == 2
    assert f"WARN  audit.output: cannot write {conf}/audit/reads.jsonl" in missing.stdout


def test_busy_listeners_are_named_and_log_no_stray_stop(
    broker_factory: Any, files_backend: dict[str, Any], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    tcp = f"127.0.0.1:{free_port()}"
    first = broker_factory({"listen": {"tcp": tcp, "token_file": str(token)}, "backends": [files_backend]})
    busy_metrics = f"127.0.0.1:{first.metrics_port}"
    cases = [
        (
            {"listen": {"socket": first.socket_path}},
            f"API socket (listen.socket) {first.socket_path}: address already in use",
        ),
        (
            {"listen": {"socket": str(tmp_path / "b.sock"), "tcp": tcp, "token_file": str(token)}},
            f"API TCP listener (listen.tcp) {tcp}: cannot listen: Address already in use",
        ),
        (
            {"listen": {"socket": str(tmp_path / "c.sock")}, "metrics": {"listen": busy_metrics}},
            f"metrics listener (metrics.listen) {busy_metrics}: cannot listen: Address already in use",
        ),
    ]
    for config, message in cases:
        second = broker_factory({**config, "backends": [files_backend]}, start=False)
        second.start(wait_ready=False)
        assert second.proc is not None and second.proc.wait(30) == 2
        logs = second.logs()
        assert message in logs, logs
        assert '"stopped"' not in logs and "Traceback" not in logs, logs
    assert first.get("variable", "plain")[0] == 200
    assert not (tmp_path / "b.sock").exists() and not (tmp_path / "c.sock").exists()


def test_version() -> None:
    result = cli("version")
    assert result.returncode == 0 and result.stdout.startswith("broker ")


def test_started_and_stopped_quickly_enough_to_be_a_sidecar(broker_factory: Any, files_backend: dict[str, Any]) -> None:
    started = time.monotonic()
    broker = broker_factory({"backends": [files_backend]})
    assert broker.proc.poll() is None
    assert broker.stop() == 0
    assert time.monotonic() - started < 60


def test_header_timeout_and_connection_cap(broker_factory: Any, files_backend: dict[str, Any]) -> None:
    broker = broker_factory({"listen": {"header_timeout": 0.5, "max_connections": 4}, "backends": [files_backend]})
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(broker.socket_path)
    slow.sendall(b"GET /v1/variables/plain HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    slow.settimeout(10)
    assert slow.recv(1024) == b""  # closed by the broker, not by us
    slow.close()
    held = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX)
        s.connect(broker.socket_path)
        held.append(s)
    extra = socket.socket(socket.AF_UNIX)
    extra.connect(broker.socket_path)
    extra.settimeout(10)
    answer = extra.recv(4096)
    extra.close()
    assert answer.startswith(b"HTTP/1.1 503") and b'"overloaded"' in answer
    for s in held:
        s.close()

    def served() -> bool:
        try:
            return broker.get("variable", "plain")[0] == 200
        except OSError:  # still refused while the closed connections are being counted down
            return False

    wait_for(served, what="capacity back")
    assert broker.metric("broker_rejected_total", reason="header_timeout") >= 1
    assert broker.metric("broker_rejected_total", reason="connection_cap") >= 1


def test_backend_error_path_leaks_nothing(broker_factory: Any, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    secret = "leaky-secret-in-bad-uri-4411"
    (root / "connections.json").write_text(
        json.dumps(
            {
                "bad_uri": f"not a uri {secret}",
                "bad_field": {"conn_type": "x", "hostname": secret},
                "good": {"conn_type": "x", "password": PASSWORD},
            }
        )
    )
    (root / "variables.env").write_text(f"ok={VARIABLE}\nthis line has no equals {secret}\n")
    broker = broker_factory(
        {
            "backends": [
                {
                    "name": "broken",
                    "type": "file",
                    "connections_file_path": str(root / "connections.json"),
                    "variables_file_path": str(root / "variables.env"),
                }
            ]
        },
        start=False,
    )
    broker.start(wait_ready=False)  # the variables file is malformed: start-up retries, readiness says why
    wait_for(lambda: broker.readyz_status() == 503, what="not ready")
    status, body, _ = broker.request("GET", "/readyz")
    assert status == 503 and any("broken" in r for r in body["reasons"])
    answers = [
        broker.get("connection", "bad_uri"),
        broker.get("connection", "bad_field"),
        broker.get("variable", "ok"),
        broker.get("connection", "good"),
    ]
    assert [a[0] for a in answers] == [502, 502, 502, 200]
    assert answers[0][1]["error"] == "backend_error" and "bad_uri" in answers[0][1]["message"]
    everything = json.dumps(answers[:3]) + broker.logs() + broker.metrics()
    for value in (secret, PASSWORD, VARIABLE):
        assert value not in everything


EQUIVALENCE_REQUESTS = [
    b"GET /v1/variables/plain HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/variables/plain HTTP/1.1\r\nHost: x\r\nX-Request-Id: fixed-id\r\n\r\n",
    b"GET /v1/connections/pg HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/variables/absent HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/variables/a%2F..%2Fb HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/variables/%ff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /v1/variables/plain HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/variables/plain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /v1/variables/plain HTTP/1.0\r\n\r\n",
    b"GET /v1/variables/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GARBAGE\r\n\r\n",
]


def _raw_exchange(path: str, request: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.sendall(request + b"GET /v1/variables/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    s.close()
    return b"".join(chunks)


def _normalised(raw: bytes) -> list[tuple[str, dict[str, str], str]]:
    out = []
    rest = raw
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(headers.get("Content-Length", "0"))
        body, rest = rest[:length], rest[length:]
        for volatile in ("Date", "X-Request-Id", "Server", "Connection", "Keep-Alive"):
            if volatile in headers and not (volatile == "X-Request-Id" and headers[volatile] == "fixed-id"):
                headers.pop(volatile)
        text = re.sub(rb'"age":\d+', b'"age":0', body).decode(errors="replace")
        text = text.replace('"cache":"miss"', '"cache":"hit"')
        headers["X-Broker-Cache"] = headers.get("X-Broker-Cache", "").replace("miss", "hit")
        out.append((lines[0], {k: v for k, v in headers.items() if k != "Content-Type" or "json" in v}, text))
    return out


def test_fast_path_answers_exactly_like_the_application(broker_factory: Any, files_backend: dict[str, Any]) -> None:
    fast = broker_factory({"listen": {"fast_path": True}, "backends": [files_backend]})
    plain = broker_factory({"listen": {"fast_path": False}, "backends": [files_backend]})
    for broker in (fast, plain):  # warm both caches so the fast path has hits to serve
        broker.get("variable", "plain")
        broker.get("connection", "pg")
    for request in EQUIVALENCE_REQUESTS:
        try:
            got_plain = _normalised(_raw_exchange(plain.socket_path, request))
        except TimeoutError:
            raise AssertionError(f"plain timed out on {request!r}") from None
        try:
            got_fast = _normalised(_raw_exchange(fast.socket_path, request))
        except TimeoutError:
            raise AssertionError(f"fast timed out on {request!r}") from None
        assert got_fast == got_plain, request
    assert fast.metric("broker_requests_total", kind="variable", outcome="hit") >= 5
