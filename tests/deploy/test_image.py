"""Build the image with podman (runc, a debootstrap'ed bookworm base) and run it as Kubernetes would: as its
own non-root user, read-only root filesystem, no capabilities, the socket in a mounted directory. It serves a
secret on the socket, answers /readyz, and exits 0 on SIGTERM.

Skips, with the reason, where podman or root is absent, and fails instead under CI=true;
scripts/ci-install-deploy-tools.sh installs the tools.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy import podman as pm
from tests.deploy.manifests import REPO, base_broker_config
from tests.support.broker_process import BrokerProcess, wait_for
from tests.support.net import free_port

IMAGE = "localhost/credential-broker:test"
BROKER_UID = 65532
SECRET_VALUE = "image-secret-value"  # must never appear in the container's logs

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    pm.require()
    return pm.podman_env(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> Iterator[str]:
    """The image built from this tree on the debootstrap'ed base; prints how long each part took."""
    base, base_seconds = pm.ensure_base_image(podman_env)
    ca_bundle = os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    args = [
        "build",
        "--runtime",
        "runc",
        "--network",
        "host",
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        f"PIP_INDEX_URL={os.environ.get('PIP_INDEX_URL', 'https://pypi.org/simple')}",
        "--build-arg",
        "REVISION=test",
        "-t",
        IMAGE,
        "-f",
        str(REPO / "Dockerfile"),
    ]
    if Path(ca_bundle).is_file():
        # pip in the build stage trusts the host's CAs too (a TLS-inspecting proxy, a private mirror)
        args += ["-v", f"{ca_bundle}:/etc/ssl/host-ca.pem:ro", "--build-arg", "PIP_CERT=/etc/ssl/host-ca.pem"]
    started = time.monotonic()
    pm.podman(podman_env, *args, str(REPO), timeout=900)
    print(f"\nimage: base {base_seconds:.1f}s, build {time.monotonic() - started:.1f}s")
    yield IMAGE
    # dangling build-stage images from earlier trees; the current ones stay as the layer cache
    pm.podman(podman_env, "image", "prune", "--force", "--filter", "until=24h", check=False)


def test_image_metadata(image: str, podman_env: dict[str, str]) -> None:
    (info,) = json.loads(pm.podman(podman_env, "image", "inspect", image))
    config = info["Config"]
    assert config["User"] == f"{BROKER_UID}:{BROKER_UID}"
    assert config["Entrypoint"] == ["broker", "serve"]
    assert config["Cmd"] == ["--config", "/etc/broker/broker.yaml"]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "credential-broker"
    assert labels["org.opencontainers.image.revision"] == "test"
    assert labels["org.opencontainers.image.base.name"] == pm.BASE_IMAGE


INSPECT = r"""
import importlib.util, json, os, shutil, stat
tools = ["apt", "apt-get", "dpkg", "pip", "pip3", "gcc", "cc", "c++", "make", "ld", "as"]
setid = []
for top in ("/usr", "/bin", "/sbin", "/opt", "/etc"):
    for root, dirs, files in os.walk(top):
        for f in files:
            try:
                mode = os.lstat(os.path.join(root, f)).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                setid.append(os.path.join(root, f))
try:
    open("/probe-write", "w")
    writable = True
except OSError:
    writable = False
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "tools": [t for t in tools if shutil.which(t)],
    "modules": [m for m in ("pip", "ensurepip", "setuptools") if importlib.util.find_spec(m)],
    "setid": setid, "root_writable": writable,
}))
"""


def test_image_has_no_package_manager_compiler_or_setuid(image: str, podman_env: dict[str, str]) -> None:
    out = pm.podman(
        podman_env,
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--network",
        "none",
        "--read-only",
        "--read-only-tmpfs=false",
        "--entrypoint",
        "/opt/broker/bin/python",
        image,
        "-c",
        INSPECT,
    )
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["uid"] == BROKER_UID and facts["gid"] == BROKER_UID
    assert facts["tools"] == [], facts["tools"]
    assert facts["modules"] == [], facts["modules"]
    assert facts["setid"] == [], facts["setid"]
    assert facts["root_writable"] is False


def test_image_serves_read_only_as_non_root_and_stops_on_sigterm(
    image: str, podman_env: dict[str, str], tmp_path: Path
) -> None:
    # /etc/broker (read-only): broker.yaml from the base ConfigMap and the mounted secret files it names
    etc = tmp_path / "etc"
    (etc / "secrets").mkdir(parents=True)
    (etc / "secrets" / "variables.json").write_text(json.dumps({"image_var": SECRET_VALUE}))
    (etc / "secrets" / "connections.json").write_text("{}")
    (etc / "secrets" / "config.env").write_text("")
    config = base_broker_config()
    port = free_port()
    config["metrics"]["listen"] = f"127.0.0.1:{port}"  # host network: loopback only
    config["listen"]["allowed_uids"] = [os.getuid()]  # the test connects from the host as itself
    (etc / "broker.yaml").write_text(yaml.safe_dump(config))
    for path in (etc, etc / "secrets"):
        path.chmod(0o755)
    for path in (etc / "broker.yaml", *(etc / "secrets").iterdir()):
        path.chmod(0o644)
    # /run/broker: the only writable place, like the emptyDir in the pod
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, BROKER_UID, 0)
    run.chmod(0o770)

    name = f"broker-image-test-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "container.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                "podman",
                "run",
                "--rm",
                "--name",
                name,
                "--runtime",
                "runc",
                "--network",
                "host",
                "--read-only",
                "--read-only-tmpfs=false",  # no tmpfs on /tmp or /run: nothing writable but the mount
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "-v",
                f"{etc}:/etc/broker:ro",
                "-v",
                f"{run}:/run/broker",
                image,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=podman_env,
        )
    broker = BrokerProcess(
        {"listen": {"socket": str(run / "broker.sock")}, "metrics": {"listen": f"127.0.0.1:{port}"}}, tmp_path
    )
    broker.log_path = log_path
    try:
        started = time.monotonic()

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"container exited with {proc.returncode}:\n{log_path.read_text()}")
            return broker.readyz_status() == 200

        wait_for(ready, timeout=60, interval=0.1, what="the container's /readyz")
        print(f"\ncontainer ready in {time.monotonic() - started:.2f}s")

        status, body = broker.get("variable", "image_var")
        assert (status, body["value"], body["backend"]) == (200, SECRET_VALUE, "mounted")
        assert broker.get("variable", "absent")[0] == 404
        assert "broker_build_info" in broker.metrics()

        sock = os.stat(run / "broker.sock")
        assert stat.S_ISSOCK(sock.st_mode) and sock.st_uid == BROKER_UID
        assert stat.S_IMODE(sock.st_mode) == 0o660
        state = json.loads(pm.podman(podman_env, "inspect", name))[0]["State"]
        with open(f"/proc/{state['Pid']}/status") as fh:
            uids = next(line for line in fh if line.startswith("Uid:")).split()[1:]
        assert set(map(int, uids)) == {BROKER_UID}, uids  # real, effective, saved and fs uid
        assert sorted(os.listdir(run)) == ["broker.sock"]

        # podman proxies the signal to the broker, PID 1 in the container
        stop_started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
        print(f"stopped in {time.monotonic() - stop_started:.2f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
            pm.podman(podman_env, "rm", "--force", name, check=False)
    logs = log_path.read_text()
    assert SECRET_VALUE not in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert lines, logs
    assert not (run / "broker.sock").exists()
