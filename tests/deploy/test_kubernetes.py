"""Every kustomize variant renders, validates strictly for Kubernetes 1.29 to the newest bundled schema, and
holds what the schema cannot check: native sidecar, hardening, no port for the secrets API, the shared socket
volume, probe paths on the metrics port, identity settings per cloud, and a broker.yaml the CLI accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.deploy.manifests import (
    NON_NATIVE,
    OVERLAYS,
    REQUIRED_OVERLAYS,
    VARIANTS,
    all_containers,
    broker_yaml,
    container,
    kubernetes_versions,
    one,
    pod_spec,
    render,
)

BACKEND = "broker.airflow.BrokerSecretsBackend"


def test_every_required_overlay_exists_with_a_readme() -> None:
    assert REQUIRED_OVERLAYS <= set(OVERLAYS)
    from tests.deploy.manifests import KUSTOMIZE

    for name in OVERLAYS:
        assert (KUSTOMIZE / "overlays" / name / "README.md").is_file(), name


def test_schema_versions_span_1_29_to_the_newest_bundled() -> None:
    versions = kubernetes_versions()
    assert versions[0] == "1.29.0"
    assert versions[-1] == kubernetes_validate.latest_version()
    assert len(versions) >= 9  # 1.29 .. 1.37 with kubernetes-validate 1.37


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_validates_strictly_for_every_version(variant: str) -> None:
    docs = render(variant)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ConfigMap", "Deployment"}
    for version in kubernetes_versions():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{variant}: {doc['kind']} invalid for Kubernetes {version}: {exc.message}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_broker_runs_as_a_native_sidecar_unless_the_variant_says_otherwise(variant: str) -> None:
    spec = pod_spec(render(variant))
    broker = container(spec, "broker")
    if variant in NON_NATIVE:
        assert "restartPolicy" not in broker
        assert broker in spec["containers"] and not spec.get("initContainers")
    else:
        # first init container with restartPolicy Always: started before, and stopped after, Airflow
        assert broker["restartPolicy"] == "Always"
        assert spec["initContainers"][0] is broker or spec["initContainers"][0] == broker
    assert spec["terminationGracePeriodSeconds"] >= 30


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_contexts_are_hardened(variant: str) -> None:
    spec = pod_spec(render(variant))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    broker = container(spec, "broker")
    sc = broker["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc or sc["privileged"] is False
    resources = broker["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    airflow = container(spec, "airflow")
    assert airflow["securityContext"]["allowPrivilegeEscalation"] is False
    assert airflow["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_port_exposes_the_secrets_api(variant: str) -> None:
    docs = render(variant)
    spec = pod_spec(docs)
    config = broker_yaml(docs)
    assert config["listen"].get("tcp") is None, "the loopback TCP API stays off in the examples"
    metrics_port = int(config["metrics"]["listen"].rsplit(":", 1)[1])
    ports = [(c["name"], p["name"], p["containerPort"]) for c in all_containers(spec) for p in c.get("ports", [])]
    assert ports == [("broker", "metrics", metrics_port)]
    assert "hostNetwork" not in spec or spec["hostNetwork"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_use_real_paths_on_the_metrics_port(variant: str) -> None:
    docs = render(variant)
    broker = container(pod_spec(docs), "broker")
    metrics_port = int(broker_yaml(docs)["metrics"]["listen"].rsplit(":", 1)[1])
    named = {p["name"]: p["containerPort"] for p in broker["ports"]}
    expected = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = broker[probe]["httpGet"]
        assert get["path"] == path, probe  # liveness must not fail on a backend outage: /healthz, not /readyz
        assert named.get(get["port"], get["port"]) == metrics_port, probe


@pytest.mark.parametrize("variant", VARIANTS)
def test_socket_volume_is_shared_and_airflow_points_at_it(variant: str) -> None:
    docs = render(variant)
    spec = pod_spec(docs)
    config = broker_yaml(docs)
    socket_path = config["listen"]["socket"]
    socket_dir = str(Path(socket_path).parent)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["broker-socket"]["emptyDir"]["medium"] == "Memory"
    broker, airflow = container(spec, "broker"), container(spec, "airflow")
    for c in (broker, airflow):
        assert {"name": "broker-socket", "mountPath": socket_dir} in c["volumeMounts"], c["name"]
    # the socket admits the Airflow user only; the broker's group (0) is the Airflow image's group
    assert config["listen"]["allowed_uids"] == [airflow["securityContext"]["runAsUser"]]
    assert config["listen"]["socket_mode"] == "0660"
    assert broker["securityContext"]["runAsGroup"] == 0
    env = {e["name"]: e["value"] for e in airflow["env"]}
    assert env["AIRFLOW__SECRETS__BACKEND"] == env["AIRFLOW__WORKERS__SECRETS_BACKEND"] == BACKEND
    for key in ("AIRFLOW__SECRETS__BACKEND_KWARGS", "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"):
        assert json.loads(env[key])["socket_path"] == socket_path
    # the config is mounted read-only; credentials reach the broker only, never the Airflow container
    assert {"name": "broker-config", "mountPath": "/etc/broker", "readOnly": True} in broker["volumeMounts"]
    assert {m["name"] for m in airflow["volumeMounts"]} == {"broker-socket"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_vault_token_is_projected_with_its_own_audience(variant: str) -> None:
    spec = pod_spec(render(variant))
    volumes = {v["name"]: v for v in spec["volumes"]}
    (source,) = volumes["vault-token"]["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "vault" and token["expirationSeconds"] <= 3600
    mounts = {m["name"]: m for m in container(spec, "broker")["volumeMounts"]}
    assert mounts["vault-token"]["readOnly"] is True


IDENTITY: dict[str, dict[str, Any]] = {
    "aws-irsa": {
        "backend": "aws_secrets_manager",
        "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::"},
    },
    "aws-pod-identity": {"backend": "aws_secrets_manager", "annotations": {}},
    "gke-workload-identity": {
        "backend": "gcp_secret_manager",
        "annotations": {"iam.gke.io/gcp-service-account": "airflow-broker@"},
        "node_selector": {"iam.gke.io/gke-metadata-server-enabled": "true"},
    },
    "azure-workload-identity": {
        "backend": "azure_key_vault",
        "annotations": {"azure.workload.identity/client-id": ""},
        "pod_labels": {"azure.workload.identity/use": "true"},
        "pod_annotations": {"azure.workload.identity/skip-containers": "airflow"},
    },
    "vault-kubernetes": {"backend": "vault", "annotations": {}},
}


@pytest.mark.parametrize("overlay", sorted(IDENTITY))
def test_cloud_overlays_carry_their_identity_settings(overlay: str) -> None:
    want = IDENTITY[overlay]
    docs = render(f"overlays/{overlay}")
    sa = one(docs, "ServiceAccount")
    annotations = sa["metadata"].get("annotations", {})
    assert set(annotations) >= set(want["annotations"])
    for key, prefix in want["annotations"].items():
        assert annotations[key].startswith(prefix), key
    template = one(docs, "Deployment")["spec"]["template"]
    assert template["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    for key, value in want.get("pod_labels", {}).items():
        assert template["metadata"]["labels"][key] == value
    for key, value in want.get("pod_annotations", {}).items():
        assert template["metadata"]["annotations"][key] == value
    for key, value in want.get("node_selector", {}).items():
        assert template["spec"]["nodeSelector"][key] == value
    backends = broker_yaml(docs)["backends"]
    assert backends[0]["type"] == want["backend"]
    if overlay == "vault-kubernetes":
        token_mount = next(
            m["mountPath"] for m in container(template["spec"], "broker")["volumeMounts"] if m["name"] == "vault-token"
        )
        assert backends[0]["auth"] == {
            "method": "kubernetes",
            "role": "airflow",
            "token_path": f"{token_mount}/token",
        }


def test_every_configmap_passes_broker_check_validate_only(tmp_path: Path) -> None:
    """`broker check --validate-only` on each variant's broker.yaml, the CLI a user runs before deploying."""
    procs: dict[str, subprocess.Popen[str]] = {}
    for variant in VARIANTS:
        cfg = tmp_path / f"{variant.replace('/', '_')}.yaml"
        cfg.write_text(yaml.safe_dump(broker_yaml(render(variant))))
        procs[variant] = subprocess.Popen(
            [sys.executable, "-m", "broker", "check", "--config", str(cfg), "--validate-only"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    failures: list[str] = []
    for variant, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            assert out.startswith("config ok"), out
        else:
            failures.append(f"{variant} (exit {proc.returncode}): {err.strip()}")
    assert not failures, "\n".join(failures)


def test_validate_only_rejects_a_broken_configmap(tmp_path: Path) -> None:
    """The check above can fail: a typo in a key and a non-loopback TCP listener are both reported."""
    config = broker_yaml(render("base"))
    config["backends"][0]["connections_file"] = "/x"
    config["listen"]["tcp"] = "0.0.0.0:8080"
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--config", str(cfg), "--validate-only"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "backends[0].connections_file" in result.stderr and "listen.tcp" in result.stderr, result.stderr


def test_the_command_line_validator_agrees(tmp_path: Path) -> None:
    """`kubernetes-validate --strict`, as a user would run it, on every variant for the oldest and newest version;
    and it does reject an unknown field (strict mode is really on)."""
    files = []
    for variant in VARIANTS:
        path = tmp_path / f"{variant.replace('/', '_')}.yaml"
        path.write_text(yaml.safe_dump_all(render(variant)))
        files.append(str(path))
    cli = str(Path(sys.executable).parent / "kubernetes-validate")
    for version in (kubernetes_versions()[0], kubernetes_versions()[-1]):
        result = subprocess.run(
            [cli, "--strict", "--quiet", "-k", version, *files], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
    docs = render("base")
    pod_spec(docs)["initContainers"][0]["restartPolcy"] = "Always"
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([cli, "--strict", "--quiet", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "restartPolcy" in result.stdout + result.stderr


# Idle RSS measured per store type (benchmarks/footprint.py, docs/footprint.md), MiB, and what a full default cache
# (10,000 entries of about 0.8 KiB) and request buffers add on top.
IDLE_MIB = {"file": 53, "env": 53, "vault": 54, "aws_secrets_manager": 62, "aws_ssm": 64, "gcp_secret_manager": 69}
IDLE_MIB |= {"azure_key_vault": 71}
IDLE_SEVERAL_SDKS_MIB = 82  # AWS, Google and Azure stores in one chain
CACHE_AND_BUFFERS_MIB = 16
SDK = {"aws_secrets_manager": "aws", "aws_ssm": "aws", "gcp_secret_manager": "google", "azure_key_vault": "azure"}


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_is_sized_from_the_measured_footprint_of_its_stores(variant: str) -> None:
    docs = render(variant)
    resources = container(pod_spec(docs), "broker")["resources"]
    types = {b["type"] for b in broker_yaml(docs)["backends"]}
    several = len({SDK[t] for t in types if t in SDK}) > 1
    idle = IDLE_SEVERAL_SDKS_MIB if several else max(IDLE_MIB[t] for t in types)
    request, limit = mebibytes(resources["requests"]["memory"]), mebibytes(resources["limits"]["memory"])
    assert request >= idle + CACHE_AND_BUFFERS_MIB, (types, request)
    assert request <= idle + 3 * CACHE_AND_BUFFERS_MIB, "a request far above the need wastes a node's memory"
    assert limit >= 2 * request
    assert "cpu" not in resources.get("limits", {}), "a CPU limit throttles the start-up (about 0.5 s of CPU)"
