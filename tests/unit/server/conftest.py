"""Fixtures the server tests share."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def unix_pair() -> Iterator[socket.socket]:
    """One end of a connected unix socket pair (the peer is this process)."""
    a, b = socket.socketpair(socket.AF_UNIX)
    yield a
    a.close()
    b.close()
