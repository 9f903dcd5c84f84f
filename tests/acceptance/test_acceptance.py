"""The acceptance suite: the same cases against every store, through one parametrised ``store`` fixture.

Each case runs once per store (file, env, Vault KV v1 and v2, Secrets Manager, SSM, GCP, Azure) and its test
id names the store, e.g. ``test_denied_is_forbidden_and_never_falls_through[gcp]``. A store that cannot
express a case is skipped for it with the reason given in ``CANNOT`` (tests/acceptance/conftest.py).

- found: a connection, a variable and a config value, served by the store they are in;
- not found: 404 ``not_found``, and a second lookup is answered from memory without a backend call;
- denied: the store refuses the read; the broker answers 403 and never asks the next backend;
- throttled: retried within the budget; a store that keeps throttling is 503, never "not found";
- garbage: a 200 that is not the store's answer (HTML, a JSON object of the wrong shape, a body past the
  bound) is an error, never "not found", and never remembered as a miss;
- crafted names: dot segments, empty segments, a leading '/', encoded separators and control characters
  are 400 before any backend is asked;
- expiry: the store stops honouring the broker's credential; the broker logs in again and serves.
"""

from __future__ import annotations

import json

import pytest

from tests.acceptance.conftest import CANNOT, FALLBACK, FOUND, GARBAGE_MODES, STORES, Store, password_of
from tests.support.broker_process import wait_for

pytestmark = pytest.mark.integration

# Names no store is ever asked for: sent as written (still percent-encoded) after /v1/{kind}/.
CRAFTED = (
    "..",
    ".",
    "a/../b",
    "../acc_var",
    "a/./b",
    "a//b",
    "/a",
    "//a",
    "a/",
    "%2Fa",
    "a%2Fb",
    "a%2fb",
    "a%5Cb",
    "..%2Facc_var",
    "%2e%2e",
    "%2E%2E/acc_var",
    "a/%2e%2e/b",
    "a%00b",
    "a%0Ab",
    "a%0D%0AX-Injected:%20y",
    "a%09b",
    "a%1Fb",
    "a%7Fb",
    "%c0%ae%c0%ae",
)


# The cases a store may be unable to express (the names ``Store.skip_unless`` is called with).
SKIPPABLE = ("denied", "throttled", *GARBAGE_MODES, "expiry")


def test_every_skip_names_a_real_store_and_case_and_gives_a_reason() -> None:
    for (store, case), reason in CANNOT.items():
        assert store in STORES and case in SKIPPABLE and len(reason) > 20, (store, case)
    networked = [s for s in STORES if s not in ("file", "env")]
    assert not [key for key in CANNOT if key[0] in networked], "every networked store expresses every case"


def get(store: Store, kind: str, name: str) -> tuple[int, dict[str, object]]:
    return store.broker.get(kind, name)


@pytest.mark.parametrize("kind", list(FOUND))
def test_found(store: Store, kind: str) -> None:
    status, body = get(store, kind, FOUND[kind])
    assert status == 200, body
    assert body["backend"] == store.name
    if kind == "connection":
        fields = json.loads(str(body["value"]))
        assert fields["conn_type"] == "postgres" and fields["host"] == f"db.{store.name}.test"
        assert (fields["login"], fields["password"], fields["port"]) == ("acc", password_of(store.name), 5432)
    else:
        assert body["value"] == store.value(kind, FOUND[kind])


def test_not_found_is_remembered(store: Store) -> None:
    before = store.calls()
    status, body = get(store, "variable", "acc_missing")
    assert (status, body["error"]) == (404, "not_found")
    assert store.calls() == before + 1
    assert store.calls(outcome="not_found") >= 1
    status, body = get(store, "variable", "acc_missing")
    assert (status, body["error"]) == (404, "not_found")
    assert store.calls() == before + 1, "the second lookup of a missing name reached the store"


def test_denied_is_forbidden_and_never_falls_through(store: Store) -> None:
    store.skip_unless("denied")
    assert store.deny is not None
    fallback = store.calls("fallback")
    with store.deny():
        status, body = get(store, "variable", "acc_denied")
    assert (status, body["error"]) == (403, "forbidden"), body
    assert FALLBACK not in json.dumps(body) and store.value("variable", "acc_denied") not in json.dumps(body)
    assert store.calls(outcome="denied") >= 1
    assert store.calls("fallback") == fallback, "a denied read fell through to the next backend"


def test_throttled_is_retried_and_never_not_found(store: Store) -> None:
    store.skip_unless("throttled")
    assert store.proxy is not None
    fallback = store.calls("fallback")
    throttled = store.calls(outcome="throttled")
    store.proxy.set("throttle", times=1)
    status, body = get(store, "variable", "acc_throttled_once")
    assert (status, body.get("value")) == (200, store.value("variable", "acc_throttled_once")), body
    assert store.calls(outcome="throttled") == throttled + 1  # one throttled attempt, then retried
    store.proxy.set("throttle")
    try:
        status, body = get(store, "variable", "acc_throttled")
    finally:
        store.proxy.set("pass")
    assert (status, body["error"]) == (503, "backend_unavailable"), body
    assert store.calls("fallback") == fallback, "a throttled read fell through to the next backend"
    status, body = get(store, "variable", "acc_throttled")  # not remembered as missing
    assert (status, body.get("value")) == (200, store.value("variable", "acc_throttled")), body


@pytest.mark.parametrize("mode", GARBAGE_MODES)
def test_garbage_answer_is_an_error_never_a_miss(store: Store, mode: str) -> None:
    store.skip_unless(mode)
    assert store.garble is not None
    name = f"acc_{mode}"
    fallback = store.calls("fallback")
    with store.garble(mode):
        status, body = get(store, "variable", name)
    assert status in (502, 503), body
    assert body["error"] in ("backend_error", "backend_unavailable"), body
    assert store.calls("fallback") == fallback, "an unreadable answer fell through to the next backend"
    # Not remembered as "not found" (negative_ttl is 300 s): the real answer comes through now.
    status, body = wait_for(lambda: (r := get(store, "variable", name))[0] == 200 and r, timeout=10, what=name)
    assert body["value"] == store.value("variable", name)


def test_crafted_names_are_refused_before_any_backend_call(store: Store) -> None:
    def seen() -> tuple[float, float, int | None]:
        return store.calls(), store.calls("fallback"), store.proxy.counts()[0] if store.proxy else None

    before = seen()
    for kind in ("variables", "connections", "config"):
        for raw in CRAFTED:
            status, body, _ = store.broker.request("GET", f"/v1/{kind}/{raw}")
            assert (status, body.get("error")) == (400, "bad_request"), (kind, raw, status, body)
    assert seen() == before, "a crafted name reached a backend"


def test_expired_credential_is_replaced(store: Store) -> None:
    store.skip_unless("expiry")
    assert store.expire is not None
    value = store.value("variable", "acc_expiry")
    assert get(store, "variable", "acc_expiry")[1].get("value") == value
    logins = store.logins()
    store.expire()
    assert store.broker.invalidate("variable", "acc_expiry") == 204
    status, body = get(store, "variable", "acc_expiry")
    assert (status, body.get("value")) == (200, value), body
    assert store.logins() == logins + 1, "the broker should log in again exactly once"
    if store.expiry_seen is not None:
        assert store.expiry_seen(), "the store never refused an expired credential: the case proved nothing"
