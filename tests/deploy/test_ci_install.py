"""The CI's install of the image-test tools: apt is retried (bounded) when it fails, e.g. on a held lock;
under CI=true a missing tool fails the image test instead of skipping it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy import podman as pm
from tests.deploy.manifests import REPO

SCRIPT = REPO / "scripts" / "ci-install-deploy-tools.sh"

FAKE_APT = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/apt.log"
n=$(wc -l < "$FAKE_DIR/apt.log")
if [ "$n" -le "$FAILURES" ]; then
  echo "E: Could not get lock /var/lib/dpkg/lock-frontend" >&2
  exit 100
fi
if [[ " $* " == *" install "* ]]; then
  for tool in podman runc debootstrap; do
    printf '#!/bin/bash\\necho "%s version 1"\\n' "$tool" > "$FAKE_DIR/$tool"
    chmod +x "$FAKE_DIR/$tool"
  done
fi
"""


def run_install(tmp_path: Path, failures: int) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The script with PATH holding only fakes: apt-get failing ``failures`` times, then installing."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-get").write_text(FAKE_APT)
    (fake / "id").write_text("#!/bin/bash\necho 0\n")
    (fake / "kubectl").write_text("#!/bin/bash\necho kubectl\n")
    for name in ("apt-get", "id", "kubectl"):
        (fake / name).chmod(0o755)
    for tool in ("sleep", "wc", "head", "chmod"):
        real = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (fake / tool).symlink_to(real)
    env = {
        "PATH": str(fake),
        "FAKE_DIR": str(fake),
        "FAILURES": str(failures),
        "APT_ATTEMPTS": "3",
        "APT_RETRY_PAUSE": "0",
        "APT_LOCK_WAIT": "7",
    }
    # /usr/sbin and /sbin are appended by the script: a real runc there only means one tool fewer to install
    result = subprocess.run(["/bin/bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    log = fake / "apt.log"
    return result, log.read_text().splitlines() if log.exists() else []


def test_apt_is_retried_until_the_lock_is_free(tmp_path: Path) -> None:
    if any(Path(d, "podman").exists() for d in ("/usr/sbin", "/sbin")):
        pytest.skip("podman is in /usr/sbin: the script would find it and install nothing")
    result, calls = run_install(tmp_path, failures=2)
    assert result.returncode == 0, result.stderr
    assert "retrying" in result.stderr and "installed: podman version 1" in result.stdout
    assert len(calls) == 4  # update failed twice, then update and install
    assert all(c.startswith("-o DPkg::Lock::Timeout=7 ") for c in calls)


def test_apt_retries_are_bounded(tmp_path: Path) -> None:
    if any(Path(d, "podman").exists() for d in ("/usr/sbin", "/sbin")):
        pytest.skip("podman is in /usr/sbin: the script would find it and install nothing")
    result, calls = run_install(tmp_path, failures=100)
    assert result.returncode != 0
    assert len(calls) == 3 and "apt-get update failed 3 times" in result.stderr


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_image_test_fails_under_ci_instead_of_skipping(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(pm, "unavailable_reason", lambda: "podman is not installed")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="podman is not installed"):
        pm.require()
    monkeypatch.setattr(pm, "unavailable_reason", lambda: None)
    pm.require()
