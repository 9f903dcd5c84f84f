"""``type: fake``: an in-memory store on our own Backend base class, for unit tests of the core (reloads, leases,
lifecycles). Register it with ``use_fake_store(monkeypatch)``; every instance records what the core did to it.

Values are ``values`` of its config; with ``lease`` set, each read grants a renewable lease of that many seconds.
With ``start_blocks``, ``start`` waits for ``release`` (set by the test), and with ``fetch_blocks`` each read
waits for ``answer``; ``start_failures`` failed logins come
first. A call made to a closed backend is recorded in ``after_close`` (the core must never make one).
"""

from __future__ import annotations

import asyncio
from typing import ClassVar, Literal

import pytest

from broker.backends import REGISTRY
from broker.backends import base as _base
from broker.backends.base import BackendConfig, BackendContext, BackendUnavailable, Kind, Lease, SecretValue
from broker.configtypes import Duration


class FakeConfig(BackendConfig):
    uses_tls: ClassVar[bool] = False
    type: Literal["fake"]
    values: dict[str, str] = {}
    lease: Duration | None = None
    start_blocks: bool = False
    fetch_blocks: bool = False
    start_failures: int = 0
    setting: str = ""  # changes nothing but the config


class Backend(_base.Backend):
    config_model = FakeConfig
    config: FakeConfig

    def __init__(self, config: BackendConfig, ctx: BackendContext) -> None:
        assert isinstance(config, FakeConfig)
        super().__init__(config, ctx)
        self.release = asyncio.Event()
        self.answer = asyncio.Event()
        self.starts = 0  # start calls begun
        self.starting = 0  # start calls under way now
        self.most_starting = 0  # the most start calls ever under way at once
        self.started = False
        self.closes = 0
        self.fetches: list[str] = []
        self.revoked: list[str] = []
        self.after_close: list[str] = []
        self._serial = 0

    def _use(self, what: str) -> None:
        if self.closes:
            self.after_close.append(what)

    def locate(self, kind: Kind, name: str) -> str | None:
        return name

    async def start(self) -> None:
        self._use("start")
        self.starts += 1
        self.starting += 1
        self.most_starting = max(self.most_starting, self.starting)
        try:
            if self.config.start_blocks:
                await self.release.wait()
            if self.starts <= self.config.start_failures:
                raise BackendUnavailable(f"fake {self.name}: login refused for now")
        finally:
            self.starting -= 1
        self.started = True

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        self._use("fetch")
        self.fetches.append(path)
        if self.config.fetch_blocks:
            await self.answer.wait()
            self._use("fetch answered")
        value = self.config.values.get(path)
        if value is None:
            raise _base.SecretNotFound(f"fake {self.name}: {path} not found")
        lease = None
        if self.config.lease is not None:
            self._serial += 1
            lease = Lease(f"fake/{self.name}/{path}/{self._serial}", self.config.lease, True, self.ctx.clock.now())
        return SecretValue(value, version=str(self._serial), lease=lease)

    async def renew(self, lease: Lease, increment: float | None = None) -> Lease:
        self._use("renew")
        return Lease(lease.lease_id, lease.duration, True, self.ctx.clock.now())

    async def revoke(self, lease: Lease) -> None:
        self._use("revoke")
        self.revoked.append(lease.lease_id)

    async def aclose(self) -> None:
        self.closes += 1


def use_fake_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``type: fake`` a backend type for the test."""
    monkeypatch.setitem(REGISTRY, "fake", __name__)
