"""Build and run the image for real with podman and runc, on a base image made offline with debootstrap.

Nothing is pulled from an image registry: the base is a Debian bookworm minbase root filesystem (python3,
python3-venv, ca-certificates) made once with debootstrap, kept as a tarball in a cache directory outside
the repository, and imported into podman's store. Only the image's own pip install reaches a package index.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BASE_IMAGE = "localhost/broker-test-base:bookworm-minbase"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
DEFAULT_CACHE = Path("/var/cache/broker-test-images")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def cache_dir() -> Path:
    """The directory that keeps the base root filesystem tarball between runs."""
    return Path(os.environ.get("BROKER_TEST_IMAGE_CACHE", str(DEFAULT_CACHE)))


def unavailable_reason() -> str | None:
    """Why the image cannot be built and run here, or None when it can."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (scripts/ci-install-deploy-tools.sh installs it)"
    if os.geteuid() != 0:
        # debootstrap, rootful podman and the socket's peer credentials all assume root on the host
        return "the image test runs podman as root; this user is not root"
    if not (cache_dir() / "rootfs.tar").exists() and shutil.which("debootstrap") is None:
        if not Path("/usr/sbin/debootstrap").exists():
            return "debootstrap is not installed and no cached base root filesystem exists"
    return None


def require() -> None:
    """Skip (with the reason) where the image cannot be built and run; under CI=true fail instead, so a
    green CI means the image was built and run."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"image test cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(f"image test skipped: {reason}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def podman_env(workdir: Path) -> dict[str, str]:
    """The environment for every podman call: runc, and no default ulimits (the sandbox refuses them)."""
    conf = workdir / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(conf)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return env


def podman(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> str:
    """Run one podman command and return its stdout.

    Raises AssertionError with podman's stderr when ``check`` and it fails.
    """
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:2])} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def ensure_base_image(env: dict[str, str]) -> tuple[str, float]:
    """Import the debootstrap'ed base into podman (making the root filesystem first if not cached).

    Returns the image name and the seconds spent. Raises AssertionError when debootstrap or the import fails.
    """
    started = time.monotonic()
    if _image_exists(env):
        return BASE_IMAGE, time.monotonic() - started
    cache = cache_dir()
    tarball = cache / "rootfs.tar"
    with _locked(cache / ".lock"):
        if not tarball.exists():
            _debootstrap(tarball)
        if not _image_exists(env):
            with open(tarball, "rb") as fh:
                result = subprocess.run(
                    ["podman", "import", "-", BASE_IMAGE],
                    stdin=fh,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    env=env,
                )
            if result.returncode != 0:
                raise AssertionError(f"podman import failed:\n{result.stderr[-4000:]}")
    return BASE_IMAGE, time.monotonic() - started


def _image_exists(env: dict[str, str]) -> bool:
    return subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env, timeout=60).returncode == 0


def _debootstrap(tarball: Path) -> None:
    mirror = os.environ.get("BROKER_TEST_DEBIAN_MIRROR", DEFAULT_MIRROR)
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="rootfs.") as tmp:
        root = Path(tmp) / "root"
        result = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(root), mirror],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise AssertionError(f"debootstrap failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr}")
        # the package caches and lists are dead weight in an image
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / sub).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = tarball.with_suffix(".tar.partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=300)
        partial.replace(tarball)
