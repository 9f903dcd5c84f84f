"""One broker per store for the acceptance suite, like aiocache's backend-parametrised suites.

``store`` is a module-scoped fixture parametrised over every store type: file, env, Vault KV v1 and v2,
Secrets Manager, SSM, GCP Secret Manager and Azure Key Vault. The networked stores are the session's real
servers behind their fault proxies (``tests/servers/stores.py``, shared with the fault, garbage and
traversal suites); each gets the same keys planted in its own layout and one broker whose chain is the
store, then a ``file`` backend named ``fallback`` holding every key a failure case asks for (so a failure
that fell through would be seen). A ``Store`` says how to make its store misbehave in each case's way, with
the store's own means: its fault proxy (throttling, garbage answers, AWS's denial and expired-token answers),
a Vault policy, the local clouds' IAM refusals and token books.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.servers.fault_proxy import FaultProxy
from tests.servers.openbao import OpenBao, approle, approle_auth, live_tokens
from tests.servers.stores import Harness
from tests.support.broker_process import BrokerProcess
from tests.support.leakcheck import plant

STORES = ("file", "env", "vault-kv1", "vault-kv2", "sm", "ssm", "gcp", "azure")
HARNESS = {"vault-kv1": "vault-kv1", "vault-kv2": "vault", "sm": "sm", "ssm": "ssm", "gcp": "gcp", "azure": "azure"}
FOUND = {"connection": "acc_conn", "variable": "acc_var", "config": "acc_cfg"}
GARBAGE_MODES = ("garbage", "shape", "oversize")
# Variables each failure case asks for: planted in the store, and in the fallback backend behind it.
FAILING = ("acc_denied", "acc_throttled", *(f"acc_{mode}" for mode in GARBAGE_MODES))
PLANTED = ("acc_throttled_once", "acc_expiry", *FAILING)
FALLBACK = "fallback-value-never-served-5b0e"

# Stores that cannot express a case, and why: the case is skipped for them with this reason, never silently.
CANNOT: dict[tuple[str, str], str] = {
    ("file", "denied"): "a file the broker can read has no per-secret permission that could refuse a read",
    ("env", "denied"): "the process environment has no permissions: every variable the broker sees is readable",
    ("file", "throttled"): "a local file has no request quota",
    ("env", "throttled"): "the process environment has no request quota",
    ("env", "garbage"): "every environment string is a valid value: there is no answer to misread",
    ("env", "shape"): "every environment string is a valid value: there is no answer to misread",
    ("env", "oversize"): "every environment string is a valid value: there is no answer to misread",
    ("file", "oversize"): "a file is the operator's own, read whole from local disk: no answer-size bound applies",
    ("file", "expiry"): "reading a local file takes no credential: nothing expires",
    ("env", "expiry"): "reading the process environment takes no credential: nothing expires",
}

VAULT_POLICY = """
path "{data}/*" {{ capabilities = ["read"] }}
path "{data}/variables/acc_denied" {{ capabilities = ["deny"] }}
"""
ROLE_ARN = "arn:aws:iam::123456789012:role/airflow-broker"


def value_of(store: str, kind: str, name: str) -> str:
    return f"acc-{store}-{kind}-{name}-value-3f9a"


def password_of(store: str) -> str:
    return f"p@ss/w:rd#-acc-{store}-6d1b"


def connection_uri(store: str) -> str:
    return f"postgres://acc:{quote(password_of(store), safe='')}@db.{store}.test:5432/acc"


def planted(store: str) -> dict[tuple[str, str], str]:
    """(kind, Airflow id) -> the value each store holds."""
    out = {("connection", "acc_conn"): connection_uri(store)}
    out[("variable", "acc_var")] = value_of(store, "variable", "acc_var")
    out[("config", "acc_cfg")] = value_of(store, "config", "acc_cfg")
    for name in PLANTED:
        out[("variable", name)] = value_of(store, "variable", name)
    return out


@dataclass
class Store:
    """One store and the broker in front of it, with the store's own way of misbehaving in each case."""

    name: str
    broker: BrokerProcess
    proxy: FaultProxy | None = None
    deny: Callable[[], contextlib.AbstractContextManager[None]] | None = None
    expire: Callable[[], None] | None = None
    expiry_seen: Callable[[], bool] | None = None  # the store refused an expired credential, when it can say
    garble: Callable[[str], contextlib.AbstractContextManager[None]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def value(self, kind: str, name: str) -> str:
        return value_of(self.name, kind, name)

    def calls(self, backend: str | None = None, **labels: str) -> float:
        """Fetches the broker made to ``backend`` (this store's by default), from its own metrics."""
        return self.broker.metric(
            "broker_backend_calls_total", backend=backend or self.name, operation="fetch", **labels
        )

    def logins(self) -> float:
        return self.broker.metric("broker_logins_total", backend=self.name, outcome="ok")

    def skip_unless(self, case: str) -> None:
        reason = CANNOT.get((self.name, case))
        if reason:
            pytest.skip(f"{self.name} cannot express {case!r}: {reason}")


@contextlib.contextmanager
def proxy_fault(proxy: FaultProxy, mode: str, times: int | None = None) -> Iterator[None]:
    proxy.set(mode, times)
    try:
        yield
    finally:
        proxy.set("pass")


def _dump(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def _fallback(work: Path) -> dict[str, Any]:
    variables = _dump(work / "fallback-variables.json", dict.fromkeys(FAILING, FALLBACK))
    return {"name": "fallback", "type": "file", "variables_file_path": str(variables)}


def _config(backend: dict[str, Any], work: Path) -> dict[str, Any]:
    # Misses remembered long enough to see a second lookup served from memory; one retry so a one-shot
    # throttle is retried and a persistent one answered within a few seconds; no circuit trips mid-suite.
    backend = {"timeout": 3, "retries": 1, "circuit_breaker": {"threshold": 100}, **backend}
    return {"cache": {"ttl": 300, "negative_ttl": 300, "max_stale": 300}, "backends": [backend, _fallback(work)]}


def _split(values: dict[tuple[str, str], str], kind: str) -> dict[str, str]:
    return {name: value for (k, name), value in values.items() if k == kind}


def _file_store(work: Path) -> Store:
    values = planted("file")
    paths = {kind: _dump(work / f"{kind}.json", _split(values, kind)) for kind in ("connection", "variable", "config")}
    backend = {
        "name": "file",
        "type": "file",
        "connections_file_path": str(paths["connection"]),
        "variables_file_path": str(paths["variable"]),
        "config_file_path": str(paths["config"]),
    }
    broker = BrokerProcess(_config(backend, work), work)
    good = paths["variable"].read_text()
    spoiled = {"garbage": "<html><body>Please sign in</body></html>", "shape": json.dumps(["acc_garbage"])}

    @contextlib.contextmanager
    def garble(mode: str) -> Iterator[None]:
        # a file whose text is not its format (garbage) or a document of the wrong shape (a list)
        paths["variable"].write_text(spoiled[mode])
        try:
            yield
        finally:
            paths["variable"].write_text(good)

    return Store("file", broker, garble=garble)


def _env_store(work: Path) -> Store:
    values = planted("env")
    env = dict(os.environ)
    prefixes = {"connection": "AIRFLOW_CONN_", "variable": "AIRFLOW_VAR_", "config": "BROKER_CFG_"}
    for (kind, name), value in values.items():
        env[prefixes[kind] + name.upper()] = value
    backend = {"name": "env", "type": "env", "config_prefix": "BROKER_CFG_"}
    return Store("env", BrokerProcess(_config(backend, work), work, env=env))


def _vault_approle(bao: OpenBao, data_path: str, files: Path) -> dict[str, str]:
    """An AppRole whose policy reads Airflow's layout except ``variables/acc_denied``: the role's files."""
    client = bao.client()
    client.sys.create_or_update_policy("acceptance", VAULT_POLICY.format(data=data_path))
    approle(client, "acceptance", ["acceptance"], "1h", "2h", files)
    return approle_auth(files, "acceptance")


def _revoke_approle_tokens(bao: OpenBao) -> None:
    """The broker's Vault token stops being honoured, as when it expires under it (OpenBao answers 403)."""
    root = bao.client()
    for accessor, token in live_tokens(root):
        if token.get("path", "").startswith("auth/approle"):
            root.auth.token.revoke_accessor(accessor)


def _networked_store(name: str, harness: Harness, work: Path) -> Store:
    assert harness.put is not None
    for (kind, key), value in planted(name).items():
        harness.put(kind, key, value)
    backend = harness.config(name=name)
    env = dict(harness.env) if harness.env else None
    deny: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    expire: Callable[[], None]
    expiry_seen: Callable[[], bool] | None = None
    if name.startswith("vault"):
        bao: OpenBao = harness.admin
        data = "kv1" if name == "vault-kv1" else "secret/data"
        backend["auth"] = _vault_approle(bao, data, work)

        def expire() -> None:
            _revoke_approle_tokens(bao)

    elif name in ("sm", "ssm"):
        # IRSA, the pod's real path: the web identity token exchanged at STS (moto, behind the same proxy)
        token = work / "web-identity-token"
        token.write_text("eyJhbGciOiJSUzI1NiJ9.acceptance-service-account-token.sig")
        assert env is not None
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(key, None)
        env |= {
            "AWS_ROLE_ARN": ROLE_ARN,
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
            "AWS_ROLE_SESSION_NAME": "acceptance",
            "AWS_ENDPOINT_URL": harness.proxy.url,
        }

        def deny() -> contextlib.AbstractContextManager[None]:
            return proxy_fault(harness.proxy, "deny")

        def expire() -> None:
            harness.proxy.set("expired", times=1)  # AWS's answer to a session token past its expiry

    else:
        cloud = harness.admin.cloud
        denied = "airflow-variables-acc_denied" if name == "gcp" else "airflow-variables-acc-denied"
        cloud.denied.add(denied)

        def expire() -> None:
            cloud.tokens.expire_all()  # the store refuses them as expired from now on

        def expiry_seen() -> bool:
            with cloud.lock:
                return bool(cloud.refused["token-expired"] > 0)

    broker = BrokerProcess(_config(backend, work), work, env=env)

    def garble(mode: str) -> contextlib.AbstractContextManager[None]:
        return proxy_fault(harness.proxy, mode)

    return Store(name, broker, proxy=harness.proxy, deny=deny, expire=expire, expiry_seen=expiry_seen, garble=garble)


@pytest.fixture(scope="module", params=STORES)
def store(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    harnesses: dict[str, Harness],
    kv1_harness: Harness,
) -> Iterator[Store]:
    name: str = request.param
    work = tmp_path_factory.mktemp(f"acceptance-{name}")
    if name == "file":
        made = _file_store(work)
    elif name == "env":
        made = _env_store(work)
    else:
        harness = kv1_harness if name == "vault-kv1" else harnesses[HARNESS[name]]
        harness.proxy.set("pass")
        made = _networked_store(name, harness, work)
    try:
        made.broker.start()
        yield made
    finally:
        if made.proxy is not None:
            made.proxy.set("pass")
        made.broker.stop()


plant("acceptance", FALLBACK, *(v for s in STORES for v in planted(s).values()), *map(password_of, STORES))
