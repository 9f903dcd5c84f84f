"""Google Secret Manager: the names apache-airflow-providers-google's CloudSecretManagerBackend asks for, as a
table, against the broker's layout (``candidates``) and config checks.

tests/parity/test_parity.py runs the provider side by side with the broker and compares the answers; where
both answer None it cannot tell which names were asked (an id Secret Manager cannot hold is sent by the
provider and refused, and never sent by the broker), nor does it start a backend on a bad prefix. The table
below says that. It was read from apache-airflow-providers-google 22.8.0
(``cloud/secrets/secret_manager.py`` and ``cloud/_internal_client/secret_manager_client.py``) with
Airflow 3.3.2's ``BaseSecretsBackend.build_path``:

- a secret id is ``f"{prefix}{sep}{id}"``: no separator stripped, no character replaced, and an empty prefix
  keeps the separator (``"-id"``); a null prefix turns the kind off;
- with ``[core] multi_team`` on and a team given, ``f"{prefix}{sep}{team}--{id}"`` (team and id verbatim) is
  asked first, then the global name; config lookups never carry a team;
- with ``multi_team`` on, a connection or variable id containing ``--`` is not looked up at all, with or
  without a team; a config id is never refused;
- every id is sent as built: one Secret Manager cannot hold (outside ``[A-Za-z0-9_-]``, over 255 characters)
  is answered INVALID_ARGUMENT, which the provider returns as None. The broker does not send those: same
  answer, no call. So the broker's names are the provider's valid ones, in the provider's order;
- at start-up ``connections_prefix + sep`` must match ``^[a-zA-Z0-9-_]*$`` (else AirflowException), checked
  only when ``connections_prefix`` is not None; the variables and config prefixes are not checked;
- ``project_id`` from the kwargs wins over the credentials' project; with neither the backend does not start.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker.backends import load_type
from broker.backends.base import BackendContext, BackendError, ConfigurationError, Kind
from broker.clock import FakeClock
from broker.config import validate_config
from broker.metrics import Metrics

C, V, K = Kind.CONNECTION, Kind.VARIABLE, Kind.CONFIG
GCP = {"name": "g", "type": "gcp_secret_manager", "project_id": "airflow-prod"}
VALID = re.compile(r"[A-Za-z0-9_-]{1,255}")  # Secret Manager's secret ids
LONG = "x" * 240

# (kwargs, kind, id, team, multi_team) -> the secret ids the provider asks for, in order
PROVIDER_NAMES: list[tuple[dict[str, Any], Kind, str, str | None, bool, list[str]]] = [
    ({}, C, "postgres_default", None, False, ["airflow-connections-postgres_default"]),
    ({}, V, "my_var", None, False, ["airflow-variables-my_var"]),
    ({}, K, "sql_alchemy_conn", None, False, ["airflow-config-sql_alchemy_conn"]),
    ({}, C, "My-Conn_1", None, False, ["airflow-connections-My-Conn_1"]),
    ({"connections_prefix": "airflow-connections-"}, C, "x", None, False, ["airflow-connections--x"]),
    ({"variables_prefix": ""}, V, "x", None, False, ["-x"]),
    ({"variables_prefix": "", "sep": ""}, V, "x", None, False, ["x"]),
    ({"sep": "_", "variables_prefix": "team"}, V, "x", None, False, ["team_x"]),
    ({"sep": "__", "connections_prefix": "af"}, C, "db", None, False, ["af__db"]),
    ({"variables_prefix": None}, V, "x", None, False, []),
    ({"config_prefix": None}, K, "x", None, False, []),
    # every id is sent; the ones Secret Manager cannot hold come back INVALID_ARGUMENT, as None
    ({}, V, "dotted.name", None, False, ["airflow-variables-dotted.name"]),
    ({}, V, "team/db", None, False, ["airflow-variables-team/db"]),
    ({}, C, "a:b", None, False, ["airflow-connections-a:b"]),
    ({}, V, LONG, None, False, [f"airflow-variables-{LONG}"]),
    ({"variables_prefix": "airflow/variables"}, V, "x", None, False, ["airflow/variables-x"]),
    ({"config_prefix": "cfg.prefix"}, K, "x", None, False, ["cfg.prefix-x"]),
    # multi-team: the team's name first, then the global one
    ({}, C, "db", "team1", True, ["airflow-connections-team1--db", "airflow-connections-db"]),
    ({}, V, "my_var", "team_a", True, ["airflow-variables-team_a--my_var", "airflow-variables-my_var"]),
    ({"sep": "_", "variables_prefix": "v"}, V, "x", "t-1", True, ["v_t-1--x", "v_x"]),
    ({"variables_prefix": ""}, V, "x", "team1", True, ["-team1--x", "-x"]),
    ({}, K, "k", "team1", True, ["airflow-config-k"]),  # config has no team
    ({}, C, "db", None, True, ["airflow-connections-db"]),
    ({}, V, "dotted.x", "team1", True, ["airflow-variables-team1--dotted.x", "airflow-variables-dotted.x"]),
    ({}, V, "a" * 230, "team1", True, [f"airflow-variables-team1--{'a' * 230}", f"airflow-variables-{'a' * 230}"]),
    # ids that spell the team separator: refused for connections and variables, never for config
    ({}, C, "a--b", None, True, []),
    ({}, C, "a--b", "team1", True, []),
    ({}, V, "a--b", "team1", True, []),
    ({}, V, "x---y", None, True, []),
    ({}, V, "a__b", "team1", True, ["airflow-variables-team1--a__b", "airflow-variables-a__b"]),  # verbatim
    ({}, K, "a--b", None, True, ["airflow-config-a--b"]),
    ({}, V, "a--b", None, False, ["airflow-variables-a--b"]),  # multi_team off: no refusal
]


def backend(config: dict[str, Any]) -> Any:
    cls = load_type(config["type"])
    ctx = BackendContext(ThreadPoolExecutor(1), FakeClock(), Metrics())
    return cls(cls.config_model.model_validate(config), ctx)


@pytest.mark.parametrize(("kwargs", "kind", "name", "team", "multi", "names"), PROVIDER_NAMES)
def test_broker_asks_for_the_providers_valid_names(
    kwargs: dict[str, Any], kind: Kind, name: str, team: str | None, multi: bool, names: list[str]
) -> None:
    got = backend({**GCP, **kwargs}).candidates(kind, name, team, multi_team=multi)
    assert got == [n for n in names if VALID.fullmatch(n)]


@pytest.mark.parametrize(
    ("kwargs", "starts"),
    [
        ({}, True),
        ({"connections_prefix": "airflow/connections"}, False),
        ({"connections_prefix": "ok", "sep": "/"}, False),
        ({"connections_prefix": ""}, True),
        ({"connections_prefix": None, "sep": "/"}, True),  # only a set connections prefix is checked
        ({"variables_prefix": "airflow/variables"}, True),
        ({"config_prefix": "a.b"}, True),
    ],
)
def test_start_up_checks_the_connections_prefix_only(kwargs: dict[str, Any], starts: bool) -> None:
    document = {"backends": [{**GCP, **kwargs}]}
    if starts:
        validate_config(document)
    else:
        with pytest.raises(ConfigurationError) as info:
            validate_config(document)
        assert info.value.errors == [
            "backends[0].connections_prefix: with sep, must use only letters, digits, '-' and '_' "
            "(Secret Manager secret ids)"
        ]


@pytest.mark.parametrize("project", ["airflow-prod", "example.com:airflow-prod", "123456789012"])
def test_project_id_from_the_kwargs_wins_over_the_credentials(project: str) -> None:
    gcp = backend({**GCP, "project_id": project})
    gcp.identity.project_id = "from-credentials"
    assert gcp._project() == project


def test_project_id_from_the_credentials_else_no_start() -> None:
    gcp = backend({"name": "g", "type": "gcp_secret_manager"})
    with pytest.raises(BackendError, match="project_id is not set"):
        gcp._project()
    gcp.identity.project_id = "from-credentials"
    assert gcp._project() == "from-credentials"


def test_an_unusable_variables_prefix_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", "broker.backend.gcp"):
        config = validate_config({"backends": [{**GCP, "variables_prefix": "airflow/variables"}]})
    assert [r.key for r in caplog.records] == ["variables_prefix"]  # type: ignore[attr-defined]
    gcp = backend(config.backends[0].model_dump())
    assert gcp.candidates(V, "x") == []
