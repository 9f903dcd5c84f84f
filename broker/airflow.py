"""``BrokerSecretsBackend``: Airflow's secrets backend that asks the broker sidecar.

Importable with the standard library and Airflow only. Configure it as ``[secrets] backend`` (and on
Airflow 3 also ``[workers] secrets_backend``) with ``backend_kwargs`` like
``{"socket_path": "/run/broker/broker.sock"}``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from airflow.secrets import BaseSecretsBackend

from broker.client import (
    DEFAULT_POD_TOKEN,
    DEFAULT_SOCKET,
    BrokerAccessDeniedError,
    BrokerClient,
    BrokerClientError,
    airflow_context,
)

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 5.0
CONNECTION_FORMATS = ("provider", "json")
# Where Airflow keeps the exception that stops its search of the secrets backends (an authoritative
# deny), newest first: the task SDK since 3.2 (Airflow 3.3 imports it from there on both sides).
# Airflow 2.10 and 3.1 have none: every exception a backend raises moves the search on.
ACCESS_DENIED_MODULES = ("airflow.sdk.exceptions", "airflow.exceptions")


def access_denied_class() -> type[Exception] | None:
    """This Airflow's ``AirflowSecretsBackendAccessDenied``, or None where it has none (2.10, 3.1)."""
    for module in ACCESS_DENIED_MODULES:
        try:
            found = getattr(importlib.import_module(module), "AirflowSecretsBackendAccessDenied", None)
        except ImportError:
            continue
        if isinstance(found, type) and issubclass(found, Exception):
            return found
    return None


def _as_float(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        log.warning("broker backend: timeout %r is not a number; using %s", value, default)
        return default
    return number if number > 0 else default


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _map_index() -> str | None:
    """The running task's map index from Airflow's current task context, when there is one."""
    try:
        try:
            from airflow.sdk import get_current_context
        except ImportError:  # Airflow 2
            from airflow.operators.python import get_current_context
        index = getattr(get_current_context().get("ti"), "map_index", None)
    except Exception:  # noqa: BLE001 - no task context here (parsing, scheduler, API server)
        return None
    return str(index) if isinstance(index, int) else None


def task_context() -> dict[str, str]:
    """What the audit trail is told about the calling task: Airflow's context variables and map index."""
    context = airflow_context()
    if "X-Airflow-Task-Id" in context:
        index = _map_index()
        if index is not None:
            context["X-Airflow-Map-Index"] = index
    return context


class BrokerSecretsBackend(BaseSecretsBackend):  # type: ignore[misc,unused-ignore]
    """Connections, variables and config values from the broker sidecar.

    The constructor does no I/O (Airflow builds one for every config lookup) and never raises: Airflow
    passes per-key overrides as strings, which are coerced here.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        url: str | None = None,
        token_file: str | None = None,
        timeout: float | str = DEFAULT_TIMEOUT,
        *,
        node_mode: bool | str = False,
        pod_token_file: str | None = None,
        connection_format: str = "provider",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        # Node mode (one broker per node): every request carries the pod's projected token.
        self.pod_token_file = _as_str(pod_token_file) or (DEFAULT_POD_TOKEN if _as_bool(node_mode) else None)
        self.socket_path = _as_str(socket_path) or DEFAULT_SOCKET
        self.url = _as_str(url)
        self.token_file = _as_str(token_file)
        self.timeout = _as_float(timeout, DEFAULT_TIMEOUT)
        # "provider": connections as the provider backend would hand them to Airflow (a stored URI as
        # the URI, parsed by Airflow in its own context); "json": the broker's normalised JSON.
        fmt = _as_str(connection_format) or "provider"
        if fmt not in CONNECTION_FORMATS:
            log.warning("broker backend: connection_format %r is not provider or json; using provider", fmt)
            fmt = "provider"
        self.connection_format = fmt
        self.ignored_kwargs = sorted(kwargs)
        self._client: BrokerClient | None = None

    def _broker(self) -> BrokerClient:
        if self._client is None:
            token = None
            if self.url and self.token_file:
                try:
                    with open(self.token_file, encoding="utf-8") as fh:
                        token = fh.read().strip()
                except OSError as exc:
                    raise BrokerClientError(
                        f"cannot read broker token file {self.token_file}: {exc.strerror}"
                    ) from None
            self._client = BrokerClient(
                socket_path=self.socket_path,
                url=self.url,
                token=token,
                timeout=self.timeout,
                pod_token_file=self.pod_token_file,
                context=task_context,
            )
        return self._client

    def _get(self, kind: str, name: str, team: str | None = None) -> str | None:
        try:
            return self._broker().get(kind, name, team, provider_form=self.connection_format == "provider")
        except BrokerAccessDeniedError as exc:
            log.warning("broker denied %s %r: %s", kind, name, exc)
            denied = access_denied_class()
            if denied is not None:
                raise denied(str(exc)) from None
            raise
        except BrokerClientError as exc:
            if exc.code == "bad_request":
                # The broker refuses ids that cannot exist in any of its stores; let Airflow look elsewhere.
                log.debug("broker refused %s %r: %s", kind, name, exc)
                return None
            # Airflow 3 logs connection-lookup errors only at DEBUG: say it here so operators see it.
            log.warning("broker lookup of %s %r failed: %s", kind, name, exc)
            raise

    def get_conn_value(self, conn_id: str, team_name: str | None = None) -> str | None:
        return self._get("connection", conn_id, team_name or None)

    def get_variable(self, key: str, team_name: str | None = None) -> str | None:
        return self._get("variable", key, team_name or None)

    def get_config(self, key: str) -> str | None:
        return self._get("config", key)
