"""``type: env``: variables of the broker's own environment (``AIRFLOW_CONN_*``, ``AIRFLOW_VAR_*``).

Lets a Kubernetes Secret be mounted into the sidecar only, never into the Airflow containers.
"""

from __future__ import annotations

import os
from typing import Literal

from broker.backends.base import Backend as BaseBackend
from broker.backends.base import BackendConfig, Kind, SecretNotFound, SecretValue, layout_key


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

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        value = os.environ.get(path)
        if value is None:
            raise SecretNotFound(f"{kind} not in the environment")
        return SecretValue(value)

    async def check(self) -> str:
        return "process environment"
