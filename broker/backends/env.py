"""``type: env``: variables of the broker's own environment (``AIRFLOW_CONN_*``, ``AIRFLOW_VAR_*``).

Lets a Kubernetes Secret be mounted into the sidecar only, never into the Airflow containers. Names are
Airflow's ``EnvironmentVariablesBackend``'s: ``{prefix}{ID}`` with the id upper-cased. In multi-team mode a
team ``T`` reads ``{prefix}_{T}___{ID}`` (``AIRFLOW_CONN__TEAM1___DB``, both upper-cased) first, then the
global name; an empty team variable counts as unset, as in Airflow; a connection or variable id containing
``___`` is not looked up (it could spell another team's name). Config is read with no team.
"""

from __future__ import annotations

import os
from typing import Literal

from broker.backends.base import Backend as BaseBackend
from broker.backends.base import BackendConfig, Kind, SecretNotFound, SecretValue, layout_key

# Separates the team from the id in a team's variable name (Airflow 3.2+: AIRFLOW_CONN__<TEAM>___<ID>).
ENV_TEAM_SEP = "___"
# Marks a team's name among the candidates: an empty team variable is not found (Airflow falls back to the
# global one), while an empty global variable is an empty value. Never part of a variable name.
_TEAM = "team:"


class EnvConfig(BackendConfig):
    uses_tls = False
    type: Literal["env"]
    connections_prefix: str | None = "AIRFLOW_CONN_"
    variables_prefix: str | None = "AIRFLOW_VAR_"
    config_prefix: str | None = None


class Backend(BaseBackend):
    config_model = EnvConfig
    config: EnvConfig

    def locate(self, kind: Kind, name: str) -> str | None:
        prefix = layout_key(self.config, kind, "prefix")
        return None if prefix is None else prefix + name.upper()

    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        path = self.locate(kind, name)
        if path is None:
            return []
        if kind is Kind.CONFIG:
            return [path]
        if multi_team and ENV_TEAM_SEP in name:
            return []  # the name built from this id could be another team's variable
        prefix = layout_key(self.config, kind, "prefix")
        team_path = [f"{_TEAM}{prefix}_{team.upper()}{ENV_TEAM_SEP}{name.upper()}"] if team else []
        return [*team_path, path]

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        """The variable's value. Raises SecretNotFound when it is unset (or an empty team variable)."""
        team = path.startswith(_TEAM)
        value = os.environ.get(path.removeprefix(_TEAM))
        if value is None or (team and not value):
            raise SecretNotFound(f"{kind} not in the environment")
        return SecretValue(value)

    async def check(self) -> str:
        return "process environment"
