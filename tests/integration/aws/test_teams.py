"""Multi-team (AIP-67) and nested ids on Secrets Manager and SSM, through the daemon and moto: the team's own
secret first, then the global one; ambiguous ids never looked up; a bound listener refuses other teams."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.aws.conftest import SSM_SECRET, VARIABLE, sm_backend, ssm_backend, static_env
from tests.servers.aws_proxy import AwsProxy

pytestmark = pytest.mark.integration


def value(broker: Any, path: str) -> tuple[int, Any]:
    status, body, _ = broker.request("GET", path)
    return status, body.get("value", body.get("error"))


def test_team_scoped_names_then_global(broker_factory: Any, proxy: AwsProxy) -> None:
    config = {"multi_team": True, "backends": [sm_backend(), ssm_backend()]}
    broker = broker_factory(config, env=static_env(proxy))
    assert value(broker, "/v1/variables/plain?team=alpha") == (200, "alpha-sm")
    assert value(broker, "/v1/variables/plain?team=beta") == (200, VARIABLE)  # no beta--plain: the global one
    assert value(broker, "/v1/variables/plain") == (200, VARIABLE)
    assert value(broker, "/v1/variables/ssm_var?team=alpha") == (200, "alpha-ssm")
    assert value(broker, "/v1/variables/ssm_var") == (200, SSM_SECRET)
    assert value(broker, "/v1/variables/team/sm_nested") == (200, "nested-sm")
    assert value(broker, "/v1/variables/team/ssm_nested") == (200, "nested-ssm")
    calls = sum(proxy.calls.values())
    assert value(broker, "/v1/variables/alpha--plain")[0] == 404  # could name team alpha's secret
    assert sum(proxy.calls.values()) == calls  # not looked up in either store


def test_a_bound_listener(broker_factory: Any, proxy: AwsProxy) -> None:
    config = {"multi_team": True, "listen": {"team": "alpha"}, "backends": [sm_backend()]}
    broker = broker_factory(config, env=static_env(proxy))
    for _ in range(3):  # the repeats are fresh hits, answered by the fast path
        assert value(broker, "/v1/variables/plain") == (200, "alpha-sm")
    assert value(broker, "/v1/variables/plain?team=beta") == (403, "forbidden")
