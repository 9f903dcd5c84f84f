"""The documented differences between the broker and the provider backends, machine-readable.

Each entry is one row of the parity table in docs/airflow.md (``## Parity with the provider backends``,
the row names the id in backticks) and a rule that recognises a case it explains. A difference the suite
finds that no rule explains fails tests/parity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Result = dict[str, Any]


@dataclass(frozen=True)
class Difference:
    id: str
    reason: str
    applies: Callable[[dict[str, Any], Result, Result], bool]


def _sides(result: Result) -> list[Result]:
    return [side for side in (result.get("server"), result.get("sdk")) if side is not None]


def view(result: Result) -> Result:
    """What Airflow's search does with an answer: any exception other than a denial moves it on alike."""
    return {side: ({"error": True} if "error" in got else got) for side, got in result.items()}


def _all(result: Result, what: str) -> bool:
    return all(what in side for side in _sides(result))


def _differing_fields(provider: Result, broker: Result) -> set[str]:
    out: set[str] = set()
    for p, b in zip(_sides(provider), _sides(broker), strict=True):
        if "value" not in p or "value" not in b or not isinstance(p["value"], dict):
            return {"<outcome>"}
        out |= {k for k in p["value"] if p["value"][k] != b["value"].get(k)}
    return out


def _airflow2_vault_build(case: dict[str, Any], provider: Result, broker: Result) -> bool:
    # hashicorp 4.3 on Airflow 2 builds Connection(uri=...) / Connection(**fields) itself: no strip of the
    # URI, no int() of a string port. Through the broker Airflow's own deserialize_connection does both.
    if not case["airflow"].startswith("2.") or not case["store"].startswith("vault"):
        return False
    return _unstripped_or_string_port(provider, broker)


def _file_build(case: dict[str, Any], provider: Result, broker: Result) -> bool:
    # LocalFilesystemBackend builds the ORM Connection itself on every Airflow version, as above.
    return case["store"] == "file" and _unstripped_or_string_port(provider, broker)


def _unstripped_or_string_port(provider: Result, broker: Result) -> bool:
    fields = _differing_fields(provider, broker)
    if not fields or not fields <= {"host", "port"}:
        return False
    p, b = provider["server"]["value"], broker["server"]["value"]
    return all(str(p[k]).strip() == str(b[k]) for k in fields)


DIFFERENCES: list[Difference] = [
    Difference(
        "conn-id-key",
        "a stored connection with a conn_id key: Airflow's Connection refuses it (TypeError, the search moves "
        "on); the broker drops the key and serves the connection",
        lambda c, p, b: c["kind"] == "connection" and "conn_id" in c["shape"] and _all(p, "error") and _all(b, "value"),
    ),
    Difference(
        "vault-non-string-value",
        "a Vault variable or config whose value is not a string: the provider hands Airflow the object; the "
        "broker its JSON text",
        lambda c, p, b: c["shape"].startswith("vault-") and _all(p, "value") and _all(b, "value"),
    ),
    Difference(
        "vault-no-value-key",
        "a Vault variable or config secret without a value key: the provider answers None (as if absent); the "
        "broker reports a store error, never a miss",
        lambda c, p, b: (
            c["kind"] != "connection" and c["shape"].startswith("json:") and _all(p, "none") and _all(b, "error")
        ),
    ),
    Difference(
        "airflow2-vault-connection-build",
        "Airflow 2 with the hashicorp provider: the provider builds the Connection itself (a URI not stripped, a "
        "string port kept a string); through the broker Airflow's deserialize_connection strips and int()s",
        _airflow2_vault_build,
    ),
    Difference(
        "azure-invalid-name",
        "Airflow 2 with microsoft-azure 12.8 (the last for Airflow 2.10): a name Key Vault cannot hold is sent and "
        "Key Vault's 400 raises (Airflow logs an ERROR and moves on); the broker does not look it up, as the "
        "current provider does not",
        lambda c, p, b: (
            c["store"] == "azure" and c["airflow"].startswith("2.") and _all(p, "error") and _all(b, "none")
        ),
    ),
    Difference(
        "store-denial-stops-search",
        "a secret the store refuses to the pod (Key Vault 403: RBAC denial, disabled secret): the provider raises a "
        "store error and Airflow moves on; the broker answers 403, which on Airflow 3.2+ raises "
        "AirflowSecretsBackendAccessDenied and stops the search",
        lambda c, p, b: c["shape"] in ("denied", "disabled") and _all(p, "error") and _all(b, "denied"),
    ),
    Difference(
        "store-failure-not-missing",
        "a Secret Manager secret IAM refuses to the pod: the provider answers None (it catches PermissionDenied), "
        "as if absent; the broker answers 403: AirflowSecretsBackendAccessDenied on Airflow 3.2+, which stops the "
        "search, a client error on 2.10",
        lambda c, p, b: (
            c["store"] == "gcp"
            and c["shape"] == "denied"
            and _all(p, "none")
            and all("denied" in side or "error" in side for side in _sides(b))
        ),
    ),
    Difference(
        "file-connection-build",
        "Airflow's LocalFilesystemBackend builds the Connection itself (a URI not stripped, a string port kept a "
        "string); through the broker Airflow's deserialize_connection strips and int()s",
        _file_build,
    ),
    Difference(
        "file-one-bad-entry",
        "a secrets file with one entry Airflow's Connection refuses: LocalFilesystemBackend fails every lookup in "
        "that file; the broker serves the other entries and answers a store error for that one",
        lambda c, p, b: c["shape"] == "beside-bad-entry" and _all(p, "error") and _all(b, "value"),
    ),
    Difference(
        "id-leaves-the-layout",
        "an id that climbs out of the configured path (x/../up): the provider's HTTP client resolves it to a "
        "secret outside the layout; the broker refuses the id",
        lambda c, p, b: c["shape"] == "traversal" and _all(p, "value") and _all(b, "none"),
    ),
]


def explain(case: dict[str, Any], provider: Result, broker: Result) -> str | None:
    """The id of the documented difference that explains this case (``case["airflow"]`` set), or None."""
    for difference in DIFFERENCES:
        if difference.applies(case, provider, broker):
            return difference.id
    return None
