"""Turn what a store holds into the string Airflow accepts.

Connections become JSON with ``extra`` as a dict where possible: URIs need every reserved character in
the password percent-encoded, and query-string extras change type between Airflow's server side and its
task SDK, while JSON survives both. URIs are parsed with the same rules Airflow's ``Connection`` applies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from broker.backends.base import BackendError, Kind

CONNECTION_FIELDS = ("conn_type", "host", "login", "password", "schema", "port", "extra", "description")
_EXTRA_KEY = "__extra__"


def normalise(kind: Kind, value: str | Mapping[str, Any], where: str) -> str:
    """The string served for ``kind``. ``where`` names the source in error messages (never the value).

    Raises BackendError when a stored connection cannot be understood.
    """
    if kind is Kind.CONNECTION:
        return json.dumps(connection_fields(value, where), separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def provider_form(kind: Kind, value: str | Mapping[str, Any]) -> str | None:
    """The string the provider backend hands Airflow for this stored connection, or None when it is the
    normalised one or when Airflow would refuse it (keys such as ``conn_id`` or ``extra_dejson``, which
    Airflow's ``Connection`` rejects and the broker accepts).

    A URI is handed over verbatim, so Airflow parses it in its own context (the server's ORM
    ``Connection`` JSON-decodes query extras, Airflow 3.3's task SDK keeps them strings), exactly as with the
    provider; a JSON object is handed over as the store's own keys and values. Call it after
    ``normalise`` accepted the value: what cannot be understood is an error there.
    """
    if kind is not Kind.CONNECTION:
        return None
    mapping: Any = value
    if isinstance(value, str):
        if not value.strip().startswith("{"):
            return value
        mapping = json.loads(value)
    if not isinstance(mapping, Mapping) or not set(mapping) <= set(CONNECTION_FIELDS):
        return None
    return value if isinstance(value, str) else json.dumps(mapping, default=str)


def connection_fields(value: str | Mapping[str, Any], where: str) -> dict[str, Any]:
    """Airflow connection fields from a URI, a JSON string or a mapping. Raises BackendError."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                raise BackendError(f"{where}: connection value is neither valid JSON nor a URI") from None
            if not isinstance(parsed, dict):
                raise BackendError(f"{where}: connection JSON must be an object")
            return _from_mapping(parsed, where)
        return _from_uri(text, where)
    return _from_mapping(value, where)


def _from_mapping(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    fields = dict(data)
    fields.pop("conn_id", None)
    if "extra_dejson" in fields:
        if "extra" in fields:
            raise BackendError(f"{where}: connection has both extra and extra_dejson")
        fields["extra"] = fields.pop("extra_dejson")
    if "conn_uri" in fields:
        uri = fields.pop("conn_uri")
        if fields:
            raise BackendError(f"{where}: connection has conn_uri and other fields: {', '.join(sorted(fields))}")
        if not isinstance(uri, str):
            raise BackendError(f"{where}: conn_uri must be a string")
        return _from_uri(uri, where)
    unknown = sorted(set(fields) - set(CONNECTION_FIELDS))
    if unknown:
        raise BackendError(f"{where}: unknown connection field(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key in CONNECTION_FIELDS:
        item = fields.get(key)
        if item is None or (item == "" and key != "schema"):
            continue
        if key == "port":
            out[key] = _port(item, where)
        elif key == "extra":
            out[key] = _extra(item)
        else:
            out[key] = item if isinstance(item, str) else str(item)
    return out


def _port(value: Any, where: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise BackendError(f"{where}: connection port is not a number") from None
    if not 0 <= port <= 65535:
        raise BackendError(f"{where}: connection port out of range")
    return port


def _extra(value: Any) -> Any:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def _hostname(parts: Any) -> str:
    hostname = unquote(parts.hostname or "")
    if "/" in hostname:
        hostname = parts.netloc
        if "@" in hostname:
            hostname = hostname.rsplit("@", 1)[1]
        if ":" in hostname:
            hostname = hostname.split(":", 1)[0]
        hostname = unquote(hostname)
    return hostname


def _from_uri(uri: str, where: str) -> dict[str, Any]:
    bad = BackendError(f"{where}: connection value is not a valid connection URI")
    schemes = uri.count("://")
    if schemes == 0 or schemes > 2:
        raise bad
    with_protocol = schemes == 2
    try:
        first = urlsplit(uri)
        conn_type = first.scheme
        rest = uri.replace(f"{conn_type}://", "" if with_protocol else "//", 1)
        if with_protocol:
            head = rest.split("://", 1)[0]
            if "@" in head or ":" in head:
                raise bad
        parts = urlsplit(rest)
        port = parts.port
    except ValueError:
        raise bad from None
    if not conn_type:
        raise bad
    if conn_type == "postgresql":
        conn_type = "postgres"
    conn_type = conn_type.replace("-", "_")
    host = _hostname(parts)
    if with_protocol and parts.scheme:
        host = f"{parts.scheme}://{host}"
    out: dict[str, Any] = {"conn_type": conn_type}
    if host:
        out["host"] = host
    if parts.username:
        out["login"] = unquote(parts.username)
    if parts.password:
        out["password"] = unquote(parts.password)
    schema = parts.path[1:]
    if schema:
        out["schema"] = unquote(schema)
    if port is not None:
        out["port"] = port
    if parts.query:
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        out["extra"] = _extra(query[_EXTRA_KEY]) if _EXTRA_KEY in query else query
    return out
