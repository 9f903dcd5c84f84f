"""A real OpenBao (KV v2) and a directory of files for the load and signal tests; helpers to read /proc."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.openbao import ROOT_TOKEN, OpenBao
from tests.support.leakcheck import plant

HOT_KEYS = 50
COLD_KEYS = 800  # in OpenBao; more than the load can keep fresh with a 2 s TTL, so most reads of them are misses
plant("load", *(f"load-vault-value-{i}-3f9a" for i in range(HOT_KEYS)))
plant("load", *(f"load-file-value-{i}-b21c" for i in range(HOT_KEYS)))
plant("load", *(f"load-cold-value-{i}-7d40" for i in range(COLD_KEYS)))


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    server = OpenBao(tmp_path_factory.mktemp("load-bao")).start()
    for i in range(HOT_KEYS):
        server.kv2_put(f"variables/kv{i}", {"value": f"load-vault-value-{i}-3f9a"})
    for i in range(COLD_KEYS):
        server.kv2_put(f"variables/cold{i}", {"value": f"load-cold-value-{i}-7d40"})
    try:
        yield server
    finally:
        server.stop()


def vault_backend(bao: OpenBao, tmp_path: Path) -> dict[str, object]:
    token = tmp_path / "vault.token"
    token.write_text(ROOT_TOKEN)
    return {"name": "vault", "type": "vault", "url": bao.url, "auth": {"method": "token", "token_file": str(token)}}


def files_backend(tmp_path: Path) -> dict[str, object]:
    variables = {f"file{i}": f"load-file-value-{i}-b21c" for i in range(HOT_KEYS)}
    path = tmp_path / "variables.json"
    path.write_text(json.dumps(variables))
    return {"name": "files", "type": "file", "variables_file_path": str(path)}


def _socket_inodes(pid: int, table: str, column: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
    except FileNotFoundError:
        return set()
    return {fields[column] for fields in (line.split() for line in lines) if len(fields) > column}


def fd_kinds(pid: int) -> Counter[str]:
    """The process's open descriptors by kind: ``unix`` and ``tcp`` sockets, ``pipe``, ``anon`` and ``file``."""
    unix = _socket_inodes(pid, "unix", 6)
    tcp = _socket_inodes(pid, "tcp", 9) | _socket_inodes(pid, "tcp6", 9)
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            inode = target[len("socket:[") : -1]
            kinds["unix" if inode in unix else "tcp" if inode in tcp else "socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("anon_inode:"):
            kinds["anon"] += 1
        else:
            kinds["file"] += 1
    return kinds


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
