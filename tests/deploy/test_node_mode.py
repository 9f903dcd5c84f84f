"""The node-mode overlay and Helm values: every object (and the task pod template) validates strictly for
Kubernetes 1.29 to the newest bundled schema; the broker's RBAC is TokenReview only; the CSI driver is
ephemeral-only under the project's own name; task pods need no hostPath and carry a short-lived token of
the broker's audience; the ConfigMap passes ``broker check --validate-only``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.deploy.manifests import DEPLOY, KUSTOMIZE, NODE_MODE, REPO, broker_yaml, kubernetes_versions, render

DRIVER = "csi.broker.local"
SOCKET = "/run/broker/broker.sock"
TEMPLATE = KUSTOMIZE / NODE_MODE / "task-pod-template.yaml"
BACKEND = "broker.airflow.BrokerSecretsBackend"


def objects() -> list[dict[str, Any]]:
    return render(NODE_MODE)


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def task_pod() -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(TEMPLATE.read_text())
    return pod


def helm_node_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((DEPLOY / "helm" / "values-node-mode.yaml").read_text())
    return values


def helm_task_pod() -> dict[str, Any]:
    """The task pod as the chart's pod_template_file builds it from workers.*."""
    workers = helm_node_values()["workers"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "airflow-task"},
        "spec": {
            "serviceAccountName": workers["serviceAccount"]["name"],
            "containers": [
                {
                    "name": "base",
                    "image": "apache/airflow:3.3.2",
                    "env": workers["env"],
                    "volumeMounts": workers["extraVolumeMounts"],
                }
            ],
            "volumes": workers["extraVolumes"],
        },
    }


def test_objects_validate_strictly_for_every_version() -> None:
    docs = [*objects(), task_pod(), helm_task_pod()]
    kinds = sorted(d["kind"] for d in docs)
    want = ["ServiceAccount", "ServiceAccount", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "DaemonSet"]
    assert kinds == sorted([*want, "CSIDriver", "Pod", "Pod"])
    for version in kubernetes_versions():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} invalid for Kubernetes {version}: {exc.message}")


def test_broker_rbac_is_tokenreview_only() -> None:
    docs = objects()
    bindings = [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert [b["roleRef"]["name"] for b in bindings] == ["system:auth-delegator"]
    assert bindings[0]["subjects"] == [
        {"kind": "ServiceAccount", "name": "credential-broker-node", "namespace": "credential-broker"}
    ]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    spec = named(docs, "DaemonSet", "credential-broker-node")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "credential-broker-node"
    csi = named(docs, "DaemonSet", "credential-broker-csi")["spec"]["template"]["spec"]
    assert csi["automountServiceAccountToken"] is False


def test_broker_daemonset_serves_the_socket_directory_the_driver_mounts() -> None:
    docs = objects()
    spec = named(docs, "DaemonSet", "credential-broker-node")["spec"]["template"]["spec"]
    (broker,) = spec["containers"]
    sc = broker["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in sc
    env = {e["name"]: e for e in broker["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in broker["volumeMounts"]}
    host_dir = volumes["broker-socket-dir"]["hostPath"]["path"]
    config = broker_yaml(docs)
    assert config["listen"]["socket"] == f"{mounts['broker-socket-dir']}/broker.sock" == SOCKET
    assert config["listen"].get("tcp") is None and config["listen"]["socket_mode"] == "0666"
    assert [p["containerPort"] for p in broker["ports"]] == [int(config["metrics"]["listen"].rsplit(":", 1)[1])]
    # the CSI plugin publishes the same node directory, under our own driver name
    csi = named(docs, "DaemonSet", "credential-broker-csi")["spec"]["template"]["spec"]
    plugin = next(c for c in csi["containers"] if c["name"] == "csi-driver")
    args = plugin["args"]
    csi_volumes = {v["name"]: v for v in csi["volumes"]}
    socket_dir = args[args.index("-workload-api-socket-dir") + 1]
    source = next(m for m in plugin["volumeMounts"] if m["mountPath"] == socket_dir)
    assert source["readOnly"] is True
    assert csi_volumes[source["name"]]["hostPath"]["path"] == host_dir
    assert args[args.index("-plugin-name") + 1] == DRIVER
    driver = named(docs, "CSIDriver", DRIVER)["spec"]
    assert driver["volumeLifecycleModes"] == ["Ephemeral"] and driver["attachRequired"] is False


@pytest.mark.parametrize("pod", [task_pod, helm_task_pod], ids=["pod_template_file", "helm"])
def test_task_pod_needs_no_hostpath_and_carries_a_short_token(pod: Any) -> None:
    spec = pod()["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not [v for v in spec["volumes"] if "hostPath" in v]  # fits the restricted Pod Security Standard
    assert volumes["broker-socket"]["csi"] == {"driver": DRIVER, "readOnly": True}
    (source,) = volumes["broker-token"]["projected"]["sources"]
    token = source["serviceAccountToken"]
    config = broker_yaml(objects())
    assert token["audience"] == config["node"]["audience"] == "broker"
    assert token["expirationSeconds"] == 600
    (base,) = spec["containers"]
    mounts = {m["name"]: m for m in base["volumeMounts"]}
    assert mounts["broker-socket"]["mountPath"] == str(Path(SOCKET).parent) and mounts["broker-socket"]["readOnly"]
    # the client's default token path is this mount's file
    from broker.client import DEFAULT_POD_TOKEN

    assert f"{mounts['broker-token']['mountPath']}/{token['path']}" == DEFAULT_POD_TOKEN
    env = {e["name"]: e["value"] for e in base["env"]}
    assert env["AIRFLOW__SECRETS__BACKEND"] == env["AIRFLOW__WORKERS__SECRETS_BACKEND"] == BACKEND
    for key in ("AIRFLOW__SECRETS__BACKEND_KWARGS", "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"):
        kwargs = json.loads(env[key])
        assert kwargs["socket_path"] == SOCKET and kwargs["node_mode"] is True
    identities = {(i["namespace"], i["service_account"]) for i in config["node"]["identities"]}
    assert ("airflow", spec["serviceAccountName"]) in identities


def test_helm_values_use_only_keys_the_chart_knows() -> None:
    values = helm_node_values()
    assert set(values) <= {"executor", "workers"}  # the chart's values.schema.json refuses unknown top-level keys
    assert values["executor"] == "KubernetesExecutor"
    assert set(values["workers"]) <= {"serviceAccount", "env", "extraVolumes", "extraVolumeMounts"}


def test_configmap_passes_broker_check_validate_only(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump(broker_yaml(objects())))
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check", "--config", str(cfg), "--validate-only"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "NODE_NAME": "node-a"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config ok")


def test_no_foreign_csi_driver_name_anywhere() -> None:
    """The driver name is the project's own, in docs, deploy and tests alike."""
    foreign = "csi.airflow." + "apache.org"
    hits = [
        str(p.relative_to(REPO))
        for top in ("docs", "deploy", "tests", "README.md")
        for p in ([REPO / top] if (REPO / top).is_file() else (REPO / top).rglob("*"))
        if p.is_file() and p.suffix in {".md", ".yaml", ".py", ".json"} and foreign in p.read_text(errors="ignore")
    ]
    assert hits == []
