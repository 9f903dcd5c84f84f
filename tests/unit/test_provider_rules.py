"""The provider backends' naming rules, store by store: path lists, ``mount_point: null``, teams (AIP-67) and
the ids each provider refuses as ambiguous (no I/O: ``candidates`` only)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker.backends import load_type
from broker.backends.base import BackendContext, Kind
from broker.clock import FakeClock
from broker.metrics import Metrics

C, V, K = Kind.CONNECTION, Kind.VARIABLE, Kind.CONFIG
VAULT = {"name": "v", "type": "vault", "url": "http://127.0.0.1:8200", "auth": {"method": "kubernetes", "role": "r"}}
SM = {"name": "sm", "type": "aws_secrets_manager", "region_name": "eu-west-1"}
SSM = {"name": "ssm", "type": "aws_ssm", "region_name": "eu-west-1"}
GCP = {"name": "g", "type": "gcp_secret_manager", "project_id": "airflow-prod"}
AZURE = {"name": "a", "type": "azure_key_vault", "vault_url": "https://my-vault.vault.azure.net/"}


def backend(config: dict[str, Any]) -> Any:
    cls = load_type(config["type"])
    ctx = BackendContext(ThreadPoolExecutor(1), FakeClock(), Metrics())
    return cls(cls.config_model.model_validate(config), ctx)


def paths(base: dict[str, Any], overrides: dict[str, Any], kind: Kind, name: str, team: str | None, multi: bool) -> Any:
    return backend({**base, **overrides}).candidates(kind, name, team, multi_team=multi)


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "team", "multi", "expected"),
    [
        # path lists (hashicorp 4.8): a string or a list, tried in order; trailing '/' stripped
        ({}, C, "db", None, False, ["connections/db"]),
        (
            {"connections_path": ["connections/team1/", "connections"]},
            C,
            "db",
            None,
            False,
            ["connections/team1/db", "connections/db"],
        ),
        ({"variables_path": []}, V, "x", None, False, []),  # an empty list: nothing to try
        ({"variables_path": None}, V, "x", None, False, []),  # null turns the kind off
        ({"config_path": ""}, K, "x", None, False, ["x"]),  # an empty path: the id alone
        ({"global_secrets_path": "common/"}, V, "x", None, False, ["variables/x", "common/x"]),
        ({"variables_path": None, "global_secrets_path": "common"}, V, "x", None, False, ["common/x"]),
        # mount_point null: the mount is the first segment of the id; an id without one is not looked up
        ({"mount_point": None}, C, "kv1/db", None, False, ["kv1/connections/db"]),
        ({"mount_point": None}, C, "db", None, False, []),
        ({"mount_point": ""}, V, "kv1/a/b", None, False, ["kv1/variables/a/b"]),
        # nested ids are found as the provider finds them
        ({}, V, "team/db", None, False, ["variables/team/db"]),
        # multi-team: a team reads {path}/{team}/{id} for every path (never the team-agnostic one)
        ({}, C, "db", "t1", True, ["connections/t1/db"]),
        ({"connections_path": ["a", "b"]}, C, "db", "t1", True, ["a/t1/db", "b/t1/db"]),
        ({"connections_path": ""}, C, "db", "t1", True, ["t1/db"]),
        ({"mount_point": None}, C, "kv1/db", "t1", True, ["kv1/connections/t1/db"]),
        ({}, K, "k", "t1", True, ["config/k"]),  # config has no team
        ({}, C, "db", "t1", False, ["connections/db"]),  # multi_team off: the team is ignored
        ({"use_team_secrets_path": False}, C, "db", "t1", True, ["connections/db"]),
        # a '/' in a key read with no team could reach a team's namespace: refused in multi-team mode
        ({}, V, "t1/db", None, True, []),
        ({}, V, "t1/db", "t1", True, ["variables/t1/t1/db"]),
        ({"use_team_secrets_path": False}, V, "t1/db", None, True, ["variables/t1/db"]),
        ({"mount_point": None}, V, "kv1/db", None, True, ["kv1/variables/db"]),  # the '/' is the mount's
        ({}, K, "a/b", None, True, ["config/a/b"]),
    ],
)
def test_vault(overrides: dict[str, Any], kind: Kind, name: str, team: Any, multi: bool, expected: list[str]) -> None:
    assert paths(VAULT, overrides, kind, name, team, multi) == expected


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "team", "multi", "expected"),
    [
        ({}, C, "db", None, False, ["airflow/connections/db"]),
        ({}, C, "team/db", None, False, ["airflow/connections/team/db"]),
        ({}, C, "db", "t1", True, ["airflow/connections/t1--db", "airflow/connections/db"]),
        ({}, C, "db", "t1", False, ["airflow/connections/t1--db", "airflow/connections/db"]),  # as the provider
        ({}, K, "k", "t1", True, ["airflow/config/k"]),
        ({"variables_prefix": ""}, V, "x", "t1", True, ["x"]),  # no prefix: no team name
        ({}, V, "a--b", None, True, []),  # ambiguous with team "a"
        ({}, V, "a--b", "t1", True, []),
        ({}, K, "a--b", None, True, []),
        ({}, V, "a--b", None, False, ["airflow/variables/a--b"]),
        ({"sep": "_", "variables_prefix": "p__"}, V, "x", "t1", True, ["p_t1--x", "p_x"]),
        ({"variables_lookup_pattern": "^ok"}, V, "no", "t1", True, []),
    ],
)
def test_secrets_manager(overrides: Any, kind: Kind, name: str, team: Any, multi: bool, expected: Any) -> None:
    assert paths(SM, overrides, kind, name, team, multi) == expected


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "team", "multi", "expected"),
    [
        ({}, C, "db", None, False, ["/airflow/connections/db"]),
        ({}, C, "team/db", None, False, ["/airflow/connections/team/db"]),
        ({}, C, "db", "t1", True, ["/airflow/connections/t1--db", "/airflow/connections/db"]),
        ({"variables_prefix": ""}, V, "x", "t1", True, ["/t1--x", "/x"]),
        ({"variables_prefix": "vars/"}, V, "x", None, True, ["/vars/x"]),
        ({}, K, "k", "t1", True, ["/airflow/config/k"]),
        ({}, V, "a--b", None, True, []),
        ({}, K, "a--b", None, True, []),
    ],
)
def test_ssm(overrides: Any, kind: Kind, name: str, team: Any, multi: bool, expected: Any) -> None:
    assert paths(SSM, overrides, kind, name, team, multi) == expected


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "team", "multi", "expected"),
    [
        ({}, C, "db", "t1", True, ["airflow-connections-t1--db", "airflow-connections-db"]),
        ({}, C, "my_db", "t_1", True, ["airflow-connections-t_1--my_db", "airflow-connections-my_db"]),
        ({}, K, "k", "t1", True, ["airflow-config-k"]),
        ({}, K, "a--b", None, True, ["airflow-config-a--b"]),  # config ids are never refused
        ({}, V, "a--b", None, True, []),
        ({}, V, "team/db", None, False, []),  # '/' cannot be in a secret id: not looked up
    ],
)
def test_gcp(overrides: Any, kind: Kind, name: str, team: Any, multi: bool, expected: Any) -> None:
    assert paths(GCP, overrides, kind, name, team, multi) == expected


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "team", "multi", "expected"),
    [
        ({}, C, "my_db", "t_1", True, ["airflow-connections-t-1--my-db", "airflow-connections-my-db"]),
        ({}, K, "k", "t1", True, ["airflow-config-k"]),
        ({}, V, "a--b", None, True, []),
        ({}, V, "a__b", None, True, []),  # becomes a--b once '_' is replaced
        ({}, K, "a__b", None, True, []),
        ({}, V, "a__b", None, False, ["airflow-variables-a--b"]),
        ({"variables_prefix": ""}, V, "x", "t1", True, ["t1--x", "x"]),
    ],
)
def test_azure(overrides: Any, kind: Kind, name: str, team: Any, multi: bool, expected: Any) -> None:
    assert paths(AZURE, overrides, kind, name, team, multi) == expected


def test_locate_is_the_first_team_agnostic_candidate() -> None:
    vault = backend({**VAULT, "connections_path": ["a", "b"]})
    assert vault.locate(C, "db") == "a/db"
    assert backend({**VAULT, "connections_path": []}).locate(C, "db") is None


def test_verbatim_vault_kwargs_load(caplog: pytest.LogCaptureFixture) -> None:
    from broker.config import validate_config

    kwargs = {
        "url": "http://127.0.0.1:8200",
        "auth_type": "kubernetes",
        "auth_mount_point": "k8s",
        "kubernetes_role": "airflow",
        "kubernetes_jwt_path": "/var/run/secrets/vault/token",
        "mount_point": None,
        "connections_path": ["connections/team1", "connections"],
        "global_secrets_path": "common",
    }
    with caplog.at_level("WARNING", "broker.config"):
        config = validate_config({"backends": [{"name": "v", "type": "vault", **kwargs}]})
    vault: Any = config.backends[0]
    assert (vault.auth.method, vault.auth.mount, vault.auth.role) == ("kubernetes", "k8s", "airflow")
    assert str(vault.auth.token_path) == "/var/run/secrets/vault/token"
    assert vault.mount_point is None and vault.connections_path == ["connections/team1", "connections"]
    assert [r.key for r in caplog.records] == ["backends[0].global_secrets_path"]  # type: ignore[attr-defined]


def test_aws_iam_auth_type_and_ignored_kwargs_warn_once_each(caplog: pytest.LogCaptureFixture) -> None:
    from broker.config import validate_config

    sm = {"name": "a", "type": "aws_secrets_manager", "full_url_mode": False, "are_secret_values_urlencoded": True}
    vault = {**VAULT, "auth": None, "auth_type": "aws_iam", "kubernetes_role": "r", "region": "eu-west-1"}
    del vault["auth"]
    with caplog.at_level("WARNING", "broker.config"):
        config = validate_config({"backends": [sm, vault]})
    keys = [r.key for r in caplog.records]  # type: ignore[attr-defined]
    assert keys == ["backends[0].full_url_mode", "backends[0].are_secret_values_urlencoded"]
    assert all("True" not in r.getMessage() for r in caplog.records)  # never the value
    auth: Any = config.backends[1].auth  # type: ignore[attr-defined]
    assert (auth.method, auth.aws_region) == ("aws", "eu-west-1")


def test_azure_secret_client_kwargs(caplog: pytest.LogCaptureFixture) -> None:
    """The provider hands unknown kwargs to the SDK's SecretClient: its transport settings load with a
    warning each, and connection_verify (TLS verification off, or a CA) names ca_cert instead."""
    from broker.backends.base import ConfigurationError
    from broker.config import validate_config

    kwargs = {"retry_total": 3, "logging_enable": True, "connection_timeout": 10, "api_version": "7.4"}
    with caplog.at_level("WARNING", "broker.config"):
        config = validate_config({"backends": [{**AZURE, **kwargs}]})
    keys = [r.key for r in caplog.records]  # type: ignore[attr-defined]
    assert keys == ["backends[0].retry_total", "backends[0].logging_enable", "backends[0].connection_timeout"]
    assert config.backends[0].api_version == "7.4"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError) as info:
        validate_config({"backends": [{**AZURE, "connection_verify": False}]})
    assert info.value.errors == [
        "backends[0].connection_verify: not read by the broker: use ca_cert: PATH (TLS is always verified)"
    ]


ENV = {"name": "e", "type": "env"}


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "team", "multi", "expected"),
    [
        ({}, C, "my_db", None, False, ["AIRFLOW_CONN_MY_DB"]),
        ({}, V, "key", None, True, ["AIRFLOW_VAR_KEY"]),
        # Airflow 3.2+ EnvironmentVariablesBackend: AIRFLOW_CONN__{TEAM}___{ID} first, then the global name
        ({}, C, "my_db", "team_1", True, ["team:AIRFLOW_CONN__TEAM_1___MY_DB", "AIRFLOW_CONN_MY_DB"]),
        ({}, V, "key", "Team-A", True, ["team:AIRFLOW_VAR__TEAM-A___KEY", "AIRFLOW_VAR_KEY"]),
        ({"variables_prefix": "MY_"}, V, "key", "t1x", True, ["team:MY__T1X___KEY", "MY_KEY"]),
        ({"config_prefix": "CFG_"}, K, "key", "team1", True, ["CFG_KEY"]),  # config has no team
        ({}, K, "key", None, True, []),  # no config prefix: off, as in Airflow
        # an id with the team separator could spell another team's name: not looked up in multi-team mode
        ({}, C, "a___b", None, True, []),
        ({}, V, "a___b", "team1", True, []),
        ({}, V, "a____b", None, True, []),
        ({}, V, "a___b", None, False, ["AIRFLOW_VAR_A___B"]),
        ({"config_prefix": "CFG_"}, K, "a___b", None, True, ["CFG_A___B"]),
        ({"connections_prefix": None}, C, "db", "team1", True, []),
    ],
)
def test_env(overrides: Any, kind: Kind, name: str, team: Any, multi: bool, expected: Any) -> None:
    assert paths(ENV, overrides, kind, name, team, multi) == expected


async def test_env_team_variable_first_and_an_empty_one_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.backends.guard import Guard
    from broker.resolver import NotFoundAnywhere, Resolver

    env = backend(ENV)
    resolver = Resolver([Guard(env, env.ctx.metrics)], 300, 3600, multi_team=True)
    monkeypatch.setenv("AIRFLOW_VAR_KEY", "global")
    monkeypatch.setenv("AIRFLOW_VAR__TEAM1___KEY", "team1's")
    monkeypatch.setenv("AIRFLOW_VAR__TEAM2___KEY", "")  # empty: Airflow reads the global one
    monkeypatch.setenv("AIRFLOW_VAR_EMPTY", "")  # an empty global variable is an empty value
    assert (await resolver.resolve(V, "key", "team1")).value == "team1's"
    assert (await resolver.resolve(V, "key", "team2")).value == "global"
    assert (await resolver.resolve(V, "key", "team3")).value == "global"
    assert (await resolver.resolve(V, "key")).value == "global"
    assert (await resolver.resolve(V, "empty", "team1")).value == ""
    monkeypatch.setenv("AIRFLOW_VAR_A___B", "ambiguous")
    with pytest.raises(NotFoundAnywhere):
        await resolver.resolve(V, "a___b")


def test_local_filesystem_kwargs_copy_verbatim(tmp_path: Any) -> None:
    from broker.config import validate_config
    from broker.migrate import migrate

    kwargs = {"connections_file_path": "/s/c.json", "variables_file_path": "/s/v.env", "configs_file_path": "/s/k.yaml"}
    config: Any = validate_config({"backends": [{"name": "f", "type": "file", **kwargs}]}).backends[0]
    assert str(config.config_file_path) == "/s/k.yaml"
    cfg = tmp_path / "airflow.cfg"
    backend = "airflow.secrets.local_filesystem.LocalFilesystemBackend"
    cfg.write_text(f"[secrets]\nbackend = {backend}\nbackend_kwargs = {__import__('json').dumps(kwargs)}\n")
    written = migrate(cfg, {}).config["backends"][0]
    assert written["config_file_path"] == "/s/k.yaml" and "configs_file_path" not in written
    validate_config(migrate(cfg, {}).config)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=1\nb= spaced \n\n# comment\n  # indented comment\n", {"a": ["1"], "b": [" spaced "]}),
        (" k =v\n", {" k ": ["v"]}),  # key as written: Airflow's lookup of "k" does not find it either
        ("a=1\na=2\n", {"a": ["1", "2"]}),  # a duplicate is an error for that id only, at lookup
        ("a=x=y\n", {"a": ["x=y"]}),
    ],
)
def test_env_files_read_as_airflow_reads_them(tmp_path: Any, text: str, expected: dict[str, list[str]]) -> None:
    from broker.backends.file import parse_secret_file

    path = tmp_path / "variables.env"
    path.write_text(text)
    assert parse_secret_file(path) == expected


@pytest.mark.parametrize("text", ["a=1\n   \n", "a=\n", "=v\n", "no equals sign\n"])
def test_an_env_line_airflow_refuses_fails_the_file(tmp_path: Any, text: str) -> None:
    from broker.backends.base import BackendError
    from broker.backends.file import parse_secret_file

    path = tmp_path / "variables.env"
    path.write_text(text)
    with pytest.raises(BackendError, match="invalid line"):
        parse_secret_file(path)
