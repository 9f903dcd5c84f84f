"""Real Apache Airflow installs (with the provider secrets backends) for tests/e2e and tests/parity, each
in its own venv, cached between runs.

The cache lives outside the checkout (``$BROKER_E2E_CACHE``, default ``~/.cache/broker-e2e``) and is keyed
by the Airflow version and the pins below; a fresh machine builds it on first use. The broker goes in with
``--no-deps``: Airflow's side needs only the standard library and Airflow.

A third, minimal venv holds Airflow 3.1 (the last release without ``AirflowSecretsBackendAccessDenied``)
with no providers, for the few e2e tests of what that version does (tests/e2e/test_airflow31.py).

``python -m tests.e2e.venvs`` builds every venv, two at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_VERSIONS = {"2": "2.10.5", "3": "3.3.2"}
AIRFLOW_31 = "3.1.8"
# Installed with Airflow: the provider backends tests/parity compares against (the hashicorp provider
# with its deps; boto3, the Azure SDK and the Secret Manager client for the amazon, microsoft-azure and
# google providers, which go in below with --no-deps: their full dependency sets would pull in half of the
# registry). The google provider's secrets backend imports, at import time, its common hook module too:
# httplib2's auth glue, the discovery client and gcloud-aio-auth come for that import alone.
_SDKS = ["boto3>=1.42.93", "asgiref", "inflection", "jmespath", "azure-identity", "azure-keyvault-secrets", "msrest"]
_GOOGLE_SDKS = [
    "google-cloud-secret-manager>=2.27.0",
    "google-auth-httplib2",
    "google-api-python-client",
    "gcloud-aio-auth",
]
EXTRA_PINS: dict[str, list[str]] = {
    "2.10.5": ["apache-airflow-providers-hashicorp==4.3.4", *_SDKS, *_GOOGLE_SDKS],
    "3.3.2": ["apache-airflow-providers-hashicorp==4.8.4", *_SDKS, *_GOOGLE_SDKS],
    AIRFLOW_31: [],
}
# google 19.0.0 is the last release for Airflow 2.10.
NO_DEPS_PINS: dict[str, list[str]] = {
    "2.10.5": [
        "apache-airflow-providers-amazon==9.15.0",
        "apache-airflow-providers-microsoft-azure==12.8.1",
        "apache-airflow-providers-google==19.0.0",
    ],
    "3.3.2": [
        "apache-airflow-providers-amazon==9.39.0",
        "apache-airflow-providers-microsoft-azure==15.2.1",
        "apache-airflow-providers-google==22.8.0",
    ],
    AIRFLOW_31: [],
}


# Reinstalling the broker builds from the one checkout (its build/ directory): one build at a time, in
# this process (threads) and across processes (the file lock below).
_INSTALL = threading.Lock()


def cache_root() -> Path:
    return Path(os.environ.get("BROKER_E2E_CACHE") or Path.home() / ".cache" / "broker-e2e")


def venv_path(version: str) -> Path:
    pins = f"{EXTRA_PINS[version]}|{NO_DEPS_PINS[version]}"
    key = hashlib.sha256(f"{version}|{pins}|{sys.version_info[:2]}".encode()).hexdigest()[:10]
    return cache_root() / f"airflow-{version}-{key}"


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as fh:
        fh.write(f"$ {' '.join(cmd)}\n".encode())
        fh.flush()
        result = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed; see {log}:\n{log.read_text(errors='replace')[-3000:]}")


def ensure_airflow(version: str) -> Path:
    """The venv's python for ``version``, building the venv if needed; the broker is reinstalled every time."""
    venv = venv_path(version)
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    log = venv.parent / f"{venv.name}.log"
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sessions build once
        if not (venv / ".complete").exists():
            started = time.monotonic()
            _run([sys.executable, "-m", "venv", "--clear", str(venv)], log)
            _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], log)
            _run(
                [str(python), "-m", "pip", "install", "--quiet", f"apache-airflow=={version}", *EXTRA_PINS[version]],
                log,
            )
            if NO_DEPS_PINS[version]:
                _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *NO_DEPS_PINS[version]], log)
            (venv / ".complete").write_text(f"built in {time.monotonic() - started:.0f}s\n")
        with _INSTALL, open(venv.parent / "install.lock", "w") as install:
            fcntl.flock(install, fcntl.LOCK_EX)  # and across processes (CI builds in the background)
            _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(REPO)], log)
    return python


if __name__ == "__main__":
    # Two at a time: the 3.1 venv, needed last (tests/e2e/test_airflow31.py), starts when one of the
    # others is done, so it does not slow the builds the first tests wait for.
    with ThreadPoolExecutor(2) as pool:
        for python in pool.map(ensure_airflow, [*AIRFLOW_VERSIONS.values(), AIRFLOW_31]):
            print(python)
