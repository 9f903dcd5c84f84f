"""No name resolves outside its configured prefix or path, in any real store: crafted variable names
(dot segments, encoded slashes and dots, NUL, control characters, very long names, hypothesis-generated
text) never read the secret planted in each store outside the variables layout."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers.stores import NESTED, OUTSIDE, Harness, value_of
from tests.support.figures import report

pytestmark = pytest.mark.integration

CRAFTED = [
    "..",
    ".",
    "...",
    "../outside",
    "..%2Foutside",
    "%2e%2e%2foutside",
    "%2E%2E/outside",
    "..%252Foutside",
    "x/../../outside",
    "..\\outside",
    "%2e%2e",
    "outside%00",
    "..%00",
    "%c0%ae%c0%ae%2foutside",
    "..;/outside",
    "/outside",
    "%2Foutside",
    "~/outside",
    "variables/../outside",
    "a" * 10_000,
    "%0d%0aX: y",
    "..%2F..%2Fconfig%2Foutside",
    "-outside",
    "--outside",
    "_outside",
]


@pytest.fixture(scope="module")
def brokers(harnesses: dict[str, Harness], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support.broker_process import BrokerProcess

    started = []
    for name, harness in harnesses.items():
        harness.proxy.set("pass")
        work = tmp_path_factory.mktemp(f"traversal-{name}")
        started.append(BrokerProcess({"backends": [harness.config()]}, work, env=harness.env or None).start())
    yield started
    for broker in started:
        broker.stop()


def never_outside(broker: Any, raw_name: str) -> int:
    status, body, _ = broker.request("GET", f"/v1/variables/{raw_name}", timeout=30)
    assert OUTSIDE not in json.dumps(body), raw_name
    assert status in (200, 400, 404, 414), (raw_name, status, body)
    return status


def test_crafted_names_stay_inside_the_layout(brokers: list[Any]) -> None:
    seen = 0
    for broker in brokers:
        for name in CRAFTED:
            never_outside(broker, quote(name, safe="%./\\;~"))  # sent as written; spaces encoded
            seen += 1
    report("traversal", f"{len(CRAFTED)} crafted names x {len(brokers)} real stores: none read outside the layout")
    assert seen == len(CRAFTED) * len(brokers)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(text=st.text(alphabet=st.sampled_from("./\\%2eEfF0o_-~:\x00\x7f"), min_size=1, max_size=24))
def test_generated_names_stay_inside_the_layout(brokers: list[Any], text: str) -> None:
    for broker in brokers:
        never_outside(broker, quote(text, safe="%./"))


def test_nested_ids_are_found_where_the_provider_finds_them(harnesses: dict[str, Harness], brokers: list[Any]) -> None:
    for name, broker in zip(harnesses, brokers, strict=True):
        status, body, _ = broker.request("GET", f"/v1/variables/{NESTED}", timeout=30)
        if name in ("gcp", "azure"):
            assert status == 404, name  # '/' cannot be part of their secret names: not looked up
        else:
            assert (status, body["value"]) == (200, value_of(name, NESTED)), name
        # the same id with an encoded separator, dot or empty segments is 400 for every store: tests/acceptance
