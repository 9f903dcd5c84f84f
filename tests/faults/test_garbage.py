"""A store, or a proxy in front of it, answering 200 with something that is not the store's answer: an HTML
page, a body larger than any secret, or a JSON object of the wrong shape. On every networked store (Vault KV v1
and v2, Secrets Manager, SSM, GCP, Azure) that is a failure (502/503), never "not found", and never remembered
as one: the key is served as soon as the store answers properly again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.conftest import Harness, value_of
from tests.support.broker_process import wait_for

pytestmark = pytest.mark.integration

STORES = ("vault", "vault-kv1", "sm", "ssm", "gcp", "azure")


@pytest.fixture(params=STORES)
def harness(request: pytest.FixtureRequest, harnesses: dict[str, Harness], kv1_harness: Harness) -> Harness:
    return kv1_harness if request.param == "vault-kv1" else harnesses[request.param]


@pytest.mark.parametrize("mode", ["garbage", "oversize", "shape"])
def test_unreadable_success_is_a_failure_never_not_found(broker_factory: Any, harness: Harness, mode: str) -> None:
    store = harness.name
    config = {
        "cache": {"ttl": 300, "negative_ttl": 300},
        "backends": [harness.config(timeout=2, retries=0, circuit_breaker={"threshold": 50})],
    }
    broker = broker_factory(config, env=harness.env or None)
    harness.proxy.set(mode)
    try:
        status, body = broker.get("variable", "k0")
        assert status in (502, 503), f"{store}/{mode}: answered {status} {body}"
        assert body["error"] in ("backend_error", "backend_unavailable"), (store, mode, body)
    finally:
        harness.proxy.set("pass")
    # Not remembered as "not found" (negative_ttl is 300 s): the real answer comes through at once.
    status, body = wait_for(lambda: (r := broker.get("variable", "k0"))[0] == 200 and r, timeout=20, what=store)
    assert body["value"] == value_of(store, "k0"), (store, body)
