"""Values for the official Apache Airflow chart: the sidecar in every component that reads secrets, the
socket volume mounted everywhere, Airflow pointed at the broker, and pod parts that validate strictly."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.deploy.manifests import base_broker_config, helm_values, kubernetes_versions

COMPONENTS = ("scheduler", "dagProcessor", "triggerer", "workers", "apiServer")
SOCKET = "/run/broker/broker.sock"


def sidecar(values: dict[str, Any], component: str) -> dict[str, Any]:
    (found,) = [c for c in values[component]["extraInitContainers"] if c["name"] == "broker"]
    assert isinstance(found, dict)
    return found


def test_only_keys_the_chart_knows_at_the_top_level() -> None:
    # the chart's values.schema.json refuses unknown top-level keys (so no YAML-anchor holder key)
    assert set(helm_values()) <= {"labels", "airflowPodAnnotations", "volumes", "volumeMounts", "config", *COMPONENTS}


@pytest.mark.parametrize("component", COMPONENTS)
def test_sidecar_in_every_component(component: str) -> None:
    values = helm_values()
    broker = sidecar(values, component)
    assert broker == sidecar(values, "scheduler")
    assert broker["restartPolicy"] == "Always"
    sc = broker["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["name"]: m["mountPath"] for m in broker["volumeMounts"]}
    assert mounts["broker-socket"] == "/run/broker" and mounts["broker-config"] == "/etc/broker"
    assert [p["containerPort"] for p in broker["ports"]] == [9464]
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert broker[probe]["httpGet"] == {"path": path, "port": 9464}


def test_socket_volume_and_airflow_config() -> None:
    values = helm_values()
    volumes = {v["name"]: v for v in values["volumes"]}
    assert volumes["broker-socket"]["emptyDir"]["medium"] == "Memory"
    assert volumes["vault-token"]["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "vault"
    assert values["volumeMounts"] == [{"name": "broker-socket", "mountPath": "/run/broker"}]
    secrets, workers = values["config"]["secrets"], values["config"]["workers"]
    assert secrets["backend"] == workers["secrets_backend"] == "broker.airflow.BrokerSecretsBackend"
    assert json.loads(secrets["backend_kwargs"])["socket_path"] == SOCKET
    assert json.loads(workers["secrets_backend_kwargs"])["socket_path"] == SOCKET
    # the ConfigMap the values mount must use the same socket the Airflow config names
    assert base_broker_config()["listen"]["socket"] == SOCKET


def test_pod_parts_validate_strictly_for_every_version() -> None:
    """The sidecar, volumes and mounts as the chart places them in a pod, validated like a rendered pod."""
    values = helm_values()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "airflow-worker"},
        "spec": {
            "initContainers": values["workers"]["extraInitContainers"],
            "containers": [{"name": "worker", "image": "apache/airflow:3.3.2", "volumeMounts": values["volumeMounts"]}],
            "volumes": values["volumes"],
        },
    }
    for version in kubernetes_versions():
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"Kubernetes {version}: {exc.message}")


@pytest.mark.parametrize("component", COMPONENTS)
def test_sidecar_memory_is_sized_from_the_measured_footprint(component: str) -> None:
    from tests.deploy.test_kubernetes import CACHE_AND_BUFFERS_MIB, IDLE_MIB, mebibytes

    resources = sidecar(helm_values(), component)["resources"]
    types = {b["type"] for b in base_broker_config()["backends"]} | {"vault"}  # the values mount a Vault token
    idle = max(IDLE_MIB.get(t, 0) for t in types)
    request, limit = mebibytes(resources["requests"]["memory"]), mebibytes(resources["limits"]["memory"])
    assert idle + CACHE_AND_BUFFERS_MIB <= request <= idle + 3 * CACHE_AND_BUFFERS_MIB
    assert limit >= 2 * request
    assert "cpu" not in resources["limits"]
