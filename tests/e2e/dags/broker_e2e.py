"""A DAG whose top-level code and task read secrets through Airflow's normal APIs (Airflow 2.10 and 3.x)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

try:  # Airflow 3
    from airflow.sdk import BaseHook, Variable, dag, task
except ImportError:  # Airflow 2.10
    from airflow.decorators import dag, task
    from airflow.hooks.base import BaseHook
    from airflow.models import Variable


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def outcome(read: Callable[[], Any]) -> Any:
    """What a lookup gave the task: its value, or the name of the exception it raised."""
    try:
        return read()
    except Exception as exc:
        return {"raised": type(exc).__name__}


# Top-level lookup: runs at every parse of this file.
TOP_LEVEL = Variable.get("e2e_plain")


@dag(dag_id="broker_e2e", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def broker_e2e() -> None:
    @task
    def read_secrets() -> None:
        conn = BaseHook.get_connection("e2e_pg")
        result = {
            "top_level": digest(TOP_LEVEL),
            "variable": digest(Variable.get("e2e_plain")),
            "password": digest(conn.password or ""),
            "host": conn.host,
            "port": conn.port,
            "extra": conn.extra_dejson,
            # A URI with query extras, parsed by the task's own Connection class.
            "uri_extra": BaseHook.get_connection("e2e_uri_extras").extra_dejson,
            # Ids the broker answers 403 for (the store refuses them); Airflow's environment has both.
            "denied_variable": outcome(lambda: Variable.get("e2e_denied")),
            "denied_host": outcome(lambda: BaseHook.get_connection("e2e_denied").host),
        }
        with open(os.environ["BROKER_E2E_OUT"], "w") as fh:
            json.dump(result, fh)

    read_secrets()


broker_e2e()
