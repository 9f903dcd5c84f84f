"""A real OpenBao (KV v2) and a directory of files for the load and signal tests; helpers to read /proc."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.openbao import ROOT_TOKEN, OpenBao
from tests.support.leakcheck import plant

HOT_KEYS = 50
plant("load", *(f"load-vault-value-{i}-3f9a" for i in range(HOT_KEYS)))
plant("load", *(f"load-file-value-{i}-b21c" for i in range(HOT_KEYS)))


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    server = OpenBao(tmp_path_factory.mktemp("load-bao")).start()
    for i in range(HOT_KEYS):
        server.kv2_put(f"variables/kv{i}", {"value": f"load-vault-value-{i}-3f9a"})
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


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
