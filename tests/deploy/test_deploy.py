"""Deployment files: overlays render and validate strictly, hold what the schema cannot check, the image
recipe is lint-clean, monitoring uses only metrics the broker really exports, the wheel installs and serves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.config import validate_config
from tests.support.broker_process import BrokerProcess
from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE = REPO / "deploy" / "kubernetes"
VARIANTS = [
    "base",
    "overlays/aws-irsa",
    "overlays/aws-pod-identity",
    "overlays/vault-kubernetes",
    "overlays/no-native-sidecar",
]
SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
K8S_VERSIONS = sorted(
    {
        m.group(1)
        for p in SCHEMA_DIR.iterdir()
        if (m := re.match(r"v(1\.(\d+)\.\d+)-", p.name)) and int(m.group(1).split(".")[1]) >= 29
    },
    key=lambda v: int(v.split(".")[1]),
)


def render(variant: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZE / variant)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def broker_container(spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "broker")


def broker_yaml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("broker-config"))
    data: dict[str, Any] = yaml.safe_load(cm["data"]["broker.yaml"])
    return data


def test_schema_versions_cover_1_29_onwards() -> None:
    assert K8S_VERSIONS[0] == "1.29.0" and len(K8S_VERSIONS) >= 5


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_validates_strictly(variant: str) -> None:
    docs = render(variant)
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_what_the_schema_cannot_check(variant: str) -> None:
    docs = render(variant)
    spec = pod_spec(docs)
    broker = broker_container(spec)
    native = variant != "overlays/no-native-sidecar"
    assert (broker.get("restartPolicy") == "Always") is native
    assert (broker in spec.get("initContainers", [])) is native
    sc = broker["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault" and sc["runAsUser"] != 0
    assert broker["resources"]["limits"]["memory"] and broker["resources"]["requests"]["cpu"]
    config = broker_yaml(docs)
    validate_config(config)  # the same validation as `broker check --validate-only`
    metrics_port = int(config["metrics"]["listen"].rsplit(":", 1)[1])
    ports = {
        p["name"]: p["containerPort"]
        for c in spec.get("initContainers", []) + spec["containers"]
        for p in c.get("ports", [])
    }
    assert ports == {"metrics": metrics_port}  # no container port exposes the secrets API
    assert "tcp" not in config["listen"] or config["listen"]["tcp"] is None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = broker[probe]["httpGet"]
        assert get["path"] in ("/healthz", "/readyz") and get["port"] in ("metrics", metrics_port)
    socket_dir = str(Path(config["listen"]["socket"]).parent)
    volume = next(v for v in spec["volumes"] if v["name"] == "broker-socket")
    assert volume["emptyDir"]["medium"] == "Memory"
    airflow = next(c for c in spec["containers"] if c["name"] == "airflow")
    for container in (broker, airflow):
        assert {"name": "broker-socket", "mountPath": socket_dir} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in airflow["env"]}
    assert (
        env["AIRFLOW__SECRETS__BACKEND"]
        == env["AIRFLOW__WORKERS__SECRETS_BACKEND"]
        == "broker.airflow.BrokerSecretsBackend"
    )
    assert json.loads(env["AIRFLOW__SECRETS__BACKEND_KWARGS"])["socket_path"] == config["listen"]["socket"]
    token = next(v for v in spec["volumes"] if v["name"] == "vault-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "vault"


def test_cloud_overlays_carry_their_identity_settings() -> None:
    irsa = render("overlays/aws-irsa")
    sa = next(d for d in irsa if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert broker_yaml(irsa)["backends"][0]["type"] == "aws_secrets_manager"
    vault = broker_yaml(render("overlays/vault-kubernetes"))["backends"][0]
    assert vault["auth"] == {"method": "kubernetes", "role": "airflow", "token_path": "/var/run/secrets/vault/token"}


def test_cli_validate_only_accepts_every_configmap(tmp_path: Path) -> None:
    for variant in VARIANTS:
        cfg = tmp_path / f"{variant.replace('/', '_')}.yaml"
        cfg.write_text(yaml.safe_dump(broker_yaml(render(variant))))
        result = subprocess.run(
            [sys.executable, "-m", "broker", "check", "--config", str(cfg), "--validate-only"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


def test_helm_values_add_the_sidecar_everywhere() -> None:
    values = yaml.safe_load((REPO / "deploy" / "helm" / "values-broker.yaml").read_text())
    for component in ("scheduler", "dagProcessor", "triggerer", "workers", "apiServer"):
        (sidecar,) = values[component]["extraInitContainers"]
        assert sidecar["name"] == "broker" and sidecar["restartPolicy"] == "Always"
        assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "broker-socket", "mountPath": "/run/broker"} in values["volumeMounts"]
    assert values["config"]["secrets"]["backend"] == values["config"]["workers"]["secrets_backend"]
    assert json.loads(values["config"]["secrets"]["backend_kwargs"])["socket_path"] == "/run/broker/broker.sock"


def test_dockerfile_is_lint_clean_and_non_root() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "USER 65532:65532" in text and 'ENTRYPOINT ["broker", "serve"]' in text
    assert "ARG BASE=" in text and "org.opencontainers.image.title" in text


def monitoring_metric_names() -> set[str]:
    text = (REPO / "deploy" / "monitoring" / "prometheus-rules.yaml").read_text()
    text += (REPO / "deploy" / "monitoring" / "grafana-dashboard.json").read_text()
    return set(re.findall(r"\bbroker_[a-z_]+", text))


def test_monitoring_uses_only_exported_metrics(tmp_path: Path) -> None:
    files = tmp_path / "secrets"
    files.mkdir()
    (files / "v.json").write_text('{"k": "v"}')
    (tmp_path / "b").mkdir()
    broker = BrokerProcess(
        {"backends": [{"name": "f", "type": "file", "variables_file_path": str(files / "v.json")}]}, tmp_path / "b"
    ).start()
    try:
        broker.get("variable", "k")
        scraped = broker.metrics()
    finally:
        broker.stop()
    exported = {line.split(" ")[2] for line in scraped.splitlines() if line.startswith("# TYPE ")}
    samples = set()
    for name in exported:
        samples |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_info"}
    used = monitoring_metric_names()
    assert used, "no metric referenced"
    assert used <= samples, sorted(used - samples)


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
    config = broker_yaml(render("base"))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "connections.json").write_text("{}")
    (secrets / "variables.json").write_text('{"from_wheel": "ok"}')
    (secrets / "config.env").write_text("")
    config["listen"] = {"socket": str(tmp_path / "broker.sock")}
    config["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    for backend in config["backends"]:
        for key in ("connections_file_path", "variables_file_path", "config_file_path"):
            if key in backend:
                backend[key] = str(secrets / Path(backend[key]).name)
    (tmp_path / "run").mkdir()
    broker = BrokerProcess(config, tmp_path / "run")
    broker.write_config()
    # the console script installed from the wheel, not this checkout
    broker.proc = subprocess.Popen(
        [str(env_dir / "bin" / "broker"), "serve", "--config", str(broker.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"PATH": str(env_dir / "bin")},
        cwd=tmp_path,
    )
    try:
        broker.wait_ready(30)
        assert broker.get("variable", "from_wheel")[1]["value"] == "ok"
    finally:
        assert broker.stop() == 0
