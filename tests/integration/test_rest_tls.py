"""TLS to a REST store (``broker.backends.rest.make_session``) against a real HTTPS server on loopback: always
verified, against the system store unless ``ca_cert`` names the CA to trust instead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from broker.backends.rest import make_session
from tests.servers.cloud import LoopbackServer, QuietHandler, TestCA


class Answer(QuietHandler):
    def do_GET(self) -> None:
        self.send_json(200, {"ok": True})


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def store(ca: TestCA) -> Iterator[str]:
    server = LoopbackServer(Answer, tls=ca.server_context())
    yield server.url
    server.stop()


async def test_a_store_outside_the_system_store_is_refused_without_ca_cert(store: str) -> None:
    async with make_session(store, None, {}) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"{store}/v1/x")


async def test_ca_cert_names_the_ca_to_trust(store: str, ca: TestCA) -> None:
    async with make_session(store, Path(ca.ca_path), {}) as session, session.get(f"{store}/v1/x") as answer:
        assert answer.status == 200 and await answer.json() == {"ok": True}


async def test_ca_cert_replaces_the_system_store(store: str, tmp_path: Path) -> None:
    other = TestCA(tmp_path / "other")
    async with make_session(store, Path(other.ca_path), {}) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"{store}/v1/x")
