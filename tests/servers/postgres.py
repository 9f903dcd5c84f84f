"""A throwaway PostgreSQL cluster on loopback, run as the ``postgres`` user when the tests run as root."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.net import free_port

if TYPE_CHECKING:
    from tests.servers.openbao import OpenBao

PG_BIN_CANDIDATES = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14)]
SUPERUSER_PASSWORD = "pg-superuser-test-password"


def pg_bin() -> Path | None:
    for candidate in PG_BIN_CANDIDATES:
        if (candidate / "initdb").exists():
            return candidate
    return None


class Postgres:
    def __init__(self, workdir: Path | None = None) -> None:
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries are not installed")
        # A directory of its own under /tmp: the postgres user cannot traverse pytest's private temp dirs.
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="broker-test-pg-"))
        self.data = self.workdir / "data"
        self.sockdir = self.workdir / "sock"
        self.port = free_port()
        self.started = False

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr[-1500:]}")

    def start(self) -> Postgres:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        pwfile = self.workdir / "pw"
        pwfile.write_text(SUPERUSER_PASSWORD)
        if os.geteuid() == 0:
            uid = pwd.getpwnam("postgres").pw_uid
            for path in (self.workdir, self.sockdir, pwfile):
                os.chown(path, uid, -1)
            os.chmod(self.workdir, 0o755)
        assert self.bin is not None
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "-A",
            "scram-sha-256",
            "--no-sync",
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.workdir / "pg.log"),
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockdir} -c fsync=off",
            "start",
        )
        self.started = True
        return self

    def dsn(self, user: str = "postgres", password: str = SUPERUSER_PASSWORD, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} password={password} dbname={db} connect_timeout=5"

    def stop(self) -> None:
        if self.started and self.bin is not None:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def dynamic_postgres(bao: OpenBao, *, default_ttl: str, max_ttl: str) -> Iterator[Postgres]:
    """A PostgreSQL cluster behind OpenBao's database engine: role ``airflow`` at ``database/creds/airflow``
    issues a login role per lease (``VALID UNTIL`` the lease's end) and drops it on revocation."""
    if pg_bin() is None:
        pytest.fail("PostgreSQL server binaries are missing: the test extra's system packages are required")
    pg = Postgres().start()
    try:
        c = bao.client()
        c.sys.enable_secrets_engine("database")
        c.write(
            "database/config/pg",
            plugin_name="postgresql-database-plugin",
            allowed_roles=["airflow"],
            connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres?sslmode=disable",
            username="postgres",
            password=SUPERUSER_PASSWORD,
        )
        c.write(
            "database/roles/airflow",
            db_name="pg",
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            creation_statements=[
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"
            ],
        )
        yield pg
    finally:
        pg.stop()
