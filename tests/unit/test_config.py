"""Config validation: one bad-config fixture per rule, every error reported at once with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.backends.base import ConfigurationError
from broker.config import embedded_default, load_config, validate_config
from broker.configtypes import parse_duration

FIXTURES = sorted((Path(__file__).parent / "bad_configs").glob("*.yaml"))


def expectations(path: Path) -> list[str]:
    return [
        line.split("expect:", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("# expect:")
    ]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_bad_config_names_key_and_problem(path: Path) -> None:
    wanted = expectations(path)
    assert wanted, f"{path.name} has no '# expect:' line"
    with pytest.raises(ConfigurationError) as info:
        load_config(path)
    text = "\n".join(info.value.errors)
    for expected in wanted:
        assert expected in text, f"{expected!r} not in:\n{text}"


def test_several_errors_are_reported_together() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(Path(__file__).parent / "bad_configs" / "several_errors.yaml")
    assert len(info.value.errors) >= 4


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(30, 30.0), ("45", 45.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0), (1.5, 1.5)],
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


def test_embedded_default_is_valid() -> None:
    config = validate_config(embedded_default())
    assert str(config.listen.socket) == "broker.sock"
    assert config.metrics.listen == "127.0.0.1:9464"
    assert config.backends[0].type == "file"


def test_contract_example_shape_is_accepted(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 32)
    config = validate_config(
        {
            "listen": {
                "socket": "/run/broker/broker.sock",
                "socket_mode": "0660",
                "allowed_uids": [50000],
                "tcp": "[::1]:8201",
                "token_file": str(token),
            },
            "metrics": {"listen": "0.0.0.0:9464"},
            "cache": {"ttl": 300, "max_entries": 10000, "refresh_ahead": 0.75, "max_stale": 3600, "negative_ttl": 30},
            "prefetch": {"connections": ["postgres_default"], "variables": ["env_name"]},
            "backends": [{"name": "env", "type": "env", "ttl": "1m", "config_prefix": None}],
        }
    )
    assert config.listen.socket_mode == 0o660
    assert config.listen.tcp_address == ("::1", 8201)
    assert config.backends[0].ttl == 60.0


def test_cli_check_reports_every_error_with_exit_2(tmp_path: Path) -> None:
    bad = Path(__file__).parent / "bad_configs" / "several_errors.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "backends[1].type: unknown backend type 'nope'" in result.stderr
    assert "cache.ttl" in result.stderr


def test_cli_serve_refuses_bad_config(tmp_path: Path) -> None:
    bad = Path(__file__).parent / "bad_configs" / "non_loopback_tcp.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "listen.tcp: tcp must bind loopback only" in result.stderr


def test_broker_config_env_is_used(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backends: [{name: only-env, type: env}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--validate-only"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "BROKER_CONFIG": str(cfg)},
    )
    assert result.returncode == 0, result.stderr
    assert "only-env (env)" in result.stdout


def test_relative_paths_in_a_file_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "broker.yaml").write_text(
        "listen: {socket: ./run/broker.sock, tcp: '127.0.0.1:8201', token_file: token}\n"
        "backends:\n"
        "  - {name: files, type: file, connections_file_path: secrets/connections.json,"
        " variables_file_path: /abs/variables.yaml}\n"
        "  - name: vault\n"
        "    type: vault\n"
        "    url: http://127.0.0.1:8200\n"
        "    ca_cert: ../ca.pem\n"
        "    auth: {method: approle, role_id_file: ids/role, secret_id_file: ids/secret}\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("conf/broker.yaml"))
    assert config.listen.socket == conf / "run" / "broker.sock"
    assert config.listen.token_file == conf / "token"
    files, vault = config.backends
    assert getattr(files, "connections_file_path") == conf / "secrets" / "connections.json"
    assert getattr(files, "variables_file_path") == Path("/abs/variables.yaml")
    assert vault.ca_cert == conf / ".." / "ca.pem"
    auth = getattr(vault, "auth")
    assert (auth.role_id_file, auth.secret_id_file) == (conf / "ids" / "role", conf / "ids" / "secret")
    assert load_config(Path("conf/broker.yaml")) == config  # a reload compares equal


def test_the_embedded_default_keeps_paths_relative_to_the_cwd() -> None:
    config = load_config(None)
    assert config.listen.socket == Path("broker.sock")
    assert getattr(config.backends[0], "connections_file_path") == Path("secrets/connections")
