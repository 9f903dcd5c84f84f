"""The verifier's own rules on what the API server answered, and that no token ever shows in a repr or an
error message."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker.backends.base import BackendContext, Unauthorized
from broker.clock import FakeClock
from broker.metrics import Metrics
from broker.node.config import NodeConfig
from broker.node.verify import PodIdentity, TokenVerifier, bearer, token_claims

SECRET_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2VjcmV0LXNpZ25hdHVyZS1kbzNm"


def verifier(same_node: bool = True) -> TokenVerifier:
    config = NodeConfig.model_validate(
        {"same_node": same_node, "identities": [{"namespace": "a", "service_account": "b", "backends": ["v"]}]}
    )
    ctx = BackendContext(executor=ThreadPoolExecutor(max_workers=1), clock=FakeClock(), metrics=Metrics())
    return TokenVerifier(config, ctx, "node-a")


def review(**change: Any) -> dict[str, Any]:
    extra = {
        "authentication.kubernetes.io/pod-name": ["p"],
        "authentication.kubernetes.io/pod-uid": ["u"],
        "authentication.kubernetes.io/node-name": ["node-a"],
    }
    base: dict[str, Any] = {
        "authenticated": True,
        "audiences": ["broker"],
        "user": {"username": "system:serviceaccount:airflow:worker", "extra": extra},
    }
    return {**base, **change}


JUDGED = {
    "not_authenticated": (review(authenticated=False), "refused"),
    "audience_missing": (review(audiences=["vault"]), "audience"),
    "a_user_not_a_service_account": (review(user={"username": "alice", "extra": {}}), "service-account"),
    "no_pod": (review(user={"username": "system:serviceaccount:airflow:worker", "extra": {}}), "bound to a pod"),
    "other_node": (
        review(
            user={
                "username": "system:serviceaccount:airflow:worker",
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["p"],
                    "authentication.kubernetes.io/pod-uid": ["u"],
                    "authentication.kubernetes.io/node-name": ["node-b"],
                },
            }
        ),
        "another node",
    ),
}


@pytest.mark.parametrize("case", list(JUDGED))
def test_review_rules(case: str) -> None:
    answer, reason = JUDGED[case]
    with pytest.raises(Unauthorized, match=reason):
        verifier()._judge(answer)


def test_accepted_review() -> None:
    assert verifier()._judge(review()) == PodIdentity("airflow", "worker", "p", "u")


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Token " + SECRET_TOKEN, "Bearer " + "x" * 20_000, "Bearer not.a-jwt"],
)
def test_malformed_headers(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        token_claims(bearer(header))


def test_token_never_in_repr_or_errors() -> None:
    v = verifier()
    texts = [repr(v), repr(PodIdentity("airflow", "worker", "p", "u"))]
    for header in ("Token " + SECRET_TOKEN, "Bearer " + SECRET_TOKEN[:-3] + "%%%.x", "Bearer a.b"):
        with pytest.raises(Unauthorized) as caught:
            token_claims(bearer(header))
        texts.append(caught.value.message)
    for text in texts:
        assert "c2VjcmV0" not in text and "eyJ" not in text, text
