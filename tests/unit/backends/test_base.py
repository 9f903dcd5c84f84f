"""The store base class (``broker.backends.base.Backend``): ``locate`` and ``candidates`` each default to the
other, so a store writes one of them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from broker.backends.base import Backend, BackendConfig, BackendContext, Kind, SecretValue
from broker.clock import FakeClock
from broker.metrics import Metrics


class Store(Backend):
    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        raise AssertionError("not read")


class ByCandidates(Store):
    def candidates(self, kind: Kind, name: str, team: str | None = None, *, multi_team: bool = False) -> list[str]:
        return [f"{team}/{name}", name] if team else [name]


class ByLocate(Store):
    def locate(self, kind: Kind, name: str) -> str | None:
        return None if name == "off" else f"p/{name}"


def build(cls: type[Backend]) -> Backend:
    with ThreadPoolExecutor(1) as pool:
        return cls(BackendConfig(name="s", type="file"), BackendContext(pool, FakeClock(), Metrics()))


def test_locate_is_the_first_candidate_for_no_team() -> None:
    store = build(ByCandidates)
    assert store.locate(Kind.VARIABLE, "x") == "x"
    assert store.candidates(Kind.VARIABLE, "x", "t") == ["t/x", "x"]


def test_candidates_are_the_one_located_path() -> None:
    store = build(ByLocate)
    assert store.candidates(Kind.VARIABLE, "x", "t") == ["p/x"]
    assert store.candidates(Kind.VARIABLE, "off") == []


def test_a_store_that_writes_neither_is_refused() -> None:
    with pytest.raises(TypeError, match="must define locate or candidates"):
        build(Store)
