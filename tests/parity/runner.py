"""Run inside an Airflow venv: every case of a job through the provider backend and BrokerSecretsBackend.

``python runner.py JOB.json OUT.json``. The job lists groups (one provider backend and its kwargs, one
broker socket, the cases); for each case both backends are asked in this one process, and what Airflow
builds from each answer is recorded: the server context's ``airflow.models.Connection`` (through the
backend's own ``get_connection``, as Airflow's server side calls it) and, on Airflow 3, the task SDK's
``Connection`` (parsed from ``get_conn_value``'s string, as the task runner's backends do). Only the
standard library and what the Airflow venv holds: this file is not imported by the test process.

The google provider's ``CloudSecretManagerBackend`` runs as it is, with one substitution: the transport of
its Secret Manager client (``use_rest_transport``). The provider builds a gRPC client; no local server speaks
Secret Manager's gRPC API, and the local one (tests/servers/gcp.py) speaks its documented REST API, as the
broker does. So the client the provider builds is the same ``SecretManagerServiceClient`` with
``transport="rest"`` and the local server as ``api_endpoint`` (an ``https://`` URL: the REST transport keeps
a scheme it is given; the test CA comes from ``REQUESTS_CA_BUNDLE``). The REST transport differs from the
gRPC one in two ways that would change the provider's answers, and the substitute does what the gRPC
transport does instead:

- the secret version's name goes into the URL path as it is (an id with ``/`` does not even match the path
  template; ``?`` or ``#`` would end the path), where gRPC carries it verbatim in the message: the
  substitute percent-encodes each path variable, as the HTTP/JSON transcoding rules say a one-segment
  variable is, so the server reads the id gRPC would carry;
- a refusal raises by HTTP status (403 ``Forbidden``, 400 ``BadRequest``), where gRPC raises by the status
  code (``PermissionDenied``, ``InvalidArgument``, the exceptions the provider catches): the substitute
  raises the class of the ``error.status`` the server answered (after the client's own retries, which
  see the REST classes: no case here is a throttling or an outage).

Everything else is the provider's own code: the names it builds (prefixes, ``sep``, teams, the ids it
refuses), what it does with each error, its project id, and its credentials (google-auth's default chain,
here the local metadata server named by ``GCE_METADATA_HOST``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from typing import Any

FIELDS = ("conn_type", "host", "login", "password", "schema", "port", "description")


def load(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def outcome(call: Any) -> dict[str, Any]:
    """What Airflow's search sees: a value, nothing, a denial that stops it, or an error it moves past."""
    denied = None
    for module in ("airflow.sdk.exceptions", "airflow.exceptions"):
        try:
            denied = getattr(importlib.import_module(module), "AirflowSecretsBackendAccessDenied", None)
        except ImportError:
            continue
        if denied is not None:
            break
    try:
        value = call()
    except Exception as exc:
        if denied is not None and isinstance(exc, denied):
            return {"denied": True}
        return {"error": type(exc).__name__}
    if value is None:
        return {"none": True}
    return {"value": value}


def conn_fields(conn: Any) -> dict[str, Any]:
    out = {name: getattr(conn, name, None) for name in FIELDS}
    try:
        out["extra_dejson"] = conn.extra_dejson
    except Exception as exc:
        out["extra_dejson"] = f"<{type(exc).__name__}>"
    return json.loads(json.dumps(out, default=repr))


def ask(backend: Any, case: dict[str, Any], airflow3: bool, sdk: bool) -> dict[str, Any]:
    kind, key, team = case["kind"], case["id"], case.get("team")
    team_kw = {"team_name": team} if airflow3 and team is not None else {}
    if kind == "variable":
        return {"server": outcome(lambda: backend.get_variable(key, **team_kw))}
    if kind == "config":
        return {"server": outcome(lambda: backend.get_config(key))}
    server = outcome(lambda: backend.get_connection(key, **team_kw))
    if "value" in server:
        server["value"] = conn_fields(server["value"])
    result = {"server": server}
    if airflow3 and sdk:
        from airflow.sdk.definitions.connection import Connection as SdkConnection
        from airflow.secrets import BaseSecretsBackend

        raw = outcome(lambda: backend.get_conn_value(key, **team_kw))
        if "value" in raw:
            raw = outcome(lambda: BaseSecretsBackend._deserialize_connection_value(SdkConnection, key, raw["value"]))
            if "value" in raw:
                raw["value"] = conn_fields(raw["value"])
        result["sdk"] = raw
    return result


def use_rest_transport(endpoint: str) -> None:
    """Make the google provider's Secret Manager client speak REST to ``endpoint`` (see the module's docstring)."""
    from urllib.parse import quote

    import grpc
    from airflow.providers.google.cloud._internal_client import secret_manager_client
    from google.api_core import exceptions
    from google.cloud.secretmanager_v1 import SecretManagerServiceClient

    def grpc_error(exc: exceptions.GoogleAPICallError) -> Exception:
        try:
            status = exc.response.json()["error"]["status"]
        except Exception:
            return exc
        code = getattr(grpc.StatusCode, str(status), None)
        if code is None:
            return exc
        return exceptions.from_grpc_status(code, exc.message, response=exc.response)

    class RestSecretManagerServiceClient(SecretManagerServiceClient):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(transport="rest", client_options={"api_endpoint": endpoint}, **kwargs)

        def access_secret_version(self, request: dict[str, str], **kwargs: Any) -> Any:
            # projects/{project}/secrets/{secret}/versions/{version}, each variable percent-encoded
            head, _, version = request["name"].rpartition("/versions/")
            project, _, secret = head.removeprefix("projects/").partition("/secrets/")
            parts = [quote(part, safe="") for part in (project, secret, version)]
            name = "projects/{}/secrets/{}/versions/{}".format(*parts)
            try:
                return super().access_secret_version(request={"name": name}, **kwargs)
            except exceptions.GoogleAPICallError as exc:
                raise grpc_error(exc) from None

    secret_manager_client.SecretManagerServiceClient = RestSecretManagerServiceClient


def main() -> None:
    job = json.loads(open(sys.argv[1], encoding="utf-8").read())
    logging.disable(logging.CRITICAL)  # provider warnings are not what is compared
    import airflow

    airflow3 = airflow.__version__.startswith("3")
    from broker.airflow import BrokerSecretsBackend

    results = []
    seconds: dict[str, float] = {}
    for group in job["groups"]:
        started = time.monotonic()
        if group.get("airflow3_only") and not airflow3:
            continue
        if group.get("multi_team"):
            os.environ["AIRFLOW__CORE__MULTI_TEAM"] = "True"
        else:
            os.environ.pop("AIRFLOW__CORE__MULTI_TEAM", None)
        if group.get("rest_endpoint"):
            use_rest_transport(group["rest_endpoint"])
        provider = load(group["provider"])(**group["kwargs"])
        sdk = not group.get("server_only")
        broker = BrokerSecretsBackend(**group["broker_kwargs"])
        for case in group["cases"]:
            if case.get("team") is not None and not airflow3:
                continue
            results.append(
                {
                    "case": case,
                    "provider": ask(provider, case, airflow3, sdk),
                    "broker": ask(broker, case, airflow3, sdk),
                }
            )
        seconds[group["variant"]] = round(time.monotonic() - started, 2)
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        json.dump({"airflow": airflow.__version__, "results": results, "seconds": seconds}, fh)


if __name__ == "__main__":
    main()
