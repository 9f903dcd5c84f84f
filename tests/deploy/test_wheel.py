"""The image's install steps proven outside a container: build the wheel from this tree, install it into a
clean venv, and run its console script on the kustomize base's ConfigMap adapted to temp paths."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

from tests.deploy.manifests import REPO, base_broker_config
from tests.support.broker_process import BrokerProcess
from tests.support.net import free_port


def test_wheel_installs_into_a_clean_venv_and_serves(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(REPO)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = dist.glob("credential_broker-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True, timeout=600, capture_output=True
    )

    # the base ConfigMap's broker.yaml, with its paths moved under tmp_path and the metrics port made free
    config = base_broker_config()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "connections.json").write_text('{"pg": "postgresql://u:p@db:5432/x"}')
    (secrets / "variables.json").write_text('{"from_wheel": "ok"}')
    (secrets / "config.env").write_text("")
    config["listen"]["socket"] = str(tmp_path / "run" / "broker.sock")
    config["listen"]["allowed_uids"] = [os.getuid()]
    config["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    for backend in config["backends"]:
        for key in ("connections_file_path", "variables_file_path", "config_file_path"):
            if key in backend:
                backend[key] = str(secrets / Path(backend[key]).name)
    (tmp_path / "run").mkdir()
    broker = BrokerProcess(config, tmp_path / "run")
    broker.write_config()
    # the console script installed from the wheel, not this checkout: a bare environment, cwd outside the repo
    log = (tmp_path / "run" / "broker.log").open("wb")
    broker.proc = subprocess.Popen(
        [str(env_dir / "bin" / "broker"), "serve", "--config", str(broker.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={"PATH": str(env_dir / "bin"), "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=tmp_path,
    )
    try:
        broker.wait_ready(30)
        assert broker.metrics_get("/readyz")[0] == 200
        assert broker.get("variable", "from_wheel")[1]["value"] == "ok"
        assert broker.get("connection", "pg")[0] == 200
    finally:
        code = broker.stop()
        log.close()
    assert code == 0, broker.logs()
    installed = subprocess.run(
        [str(python), "-c", "import broker; print(broker.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={"PATH": str(env_dir / "bin")},
    ).stdout
    assert installed.startswith(str(env_dir)), installed
