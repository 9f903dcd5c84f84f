"""Alert rules, PodMonitor and dashboard parse, and use only metric names and labels a live broker exports;
the probe paths the manifests name answer on a live broker's metrics listener."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from broker.metrics import Metrics, SharedGauge
from tests.deploy.manifests import DEPLOY, VARIANTS, container, helm_values, pod_spec, render
from tests.support.broker_process import BrokerProcess

MONITORING = DEPLOY / "monitoring"
METRIC = re.compile(r"\bbroker_[a-z_]+\b")
# a metric name followed by a label matcher: broker_x{a="b", c=~"d"}
SELECTOR = re.compile(r"\b(broker_[a-z_]+)\{([^}]*)\}")
REQUIRED_ALERTS = {
    "BrokerDown",
    "BrokerBackendErrors",
    "BrokerServingStale",
    "BrokerLeaseRenewalFailing",
    "BrokerTokenNearExpiry",
}


@pytest.fixture(scope="module")
def live_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A real `broker serve` with a file backend, one request served so every family has been touched."""
    tmp = tmp_path_factory.mktemp("monitoring")
    (tmp / "variables.json").write_text('{"k": "v"}')
    broker = BrokerProcess(
        {"backends": [{"name": "f", "type": "file", "variables_file_path": str(tmp / "variables.json")}]}, tmp
    ).start()
    try:
        assert broker.get("variable", "k")[0] == 200
        yield broker
    finally:
        broker.stop()


def exported_families(scrape: str) -> set[str]:
    return {line.split(" ")[2] for line in scrape.splitlines() if line.startswith("# TYPE ")}


def sample_names(families: set[str]) -> set[str]:
    names: set[str] = set()
    for name in families:
        names |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_info"}
    return names


def declared_labels() -> dict[str, set[str]]:
    """Label names per exported sample name, from the Metrics class the daemon uses."""
    labels: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, SharedGauge):
            metric = metric.gauge
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                for suffix in ("", "_total", "_bucket", "_sum", "_count", "_info", "_created"):
                    extra = {"le"} if suffix == "_bucket" else set()
                    labels[family.name + suffix] = set(metric._labelnames) | extra
    return labels


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert board["uid"] and board["title"] and board["panels"]
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


def monitoring_exprs() -> list[str]:
    return [r["expr"] for r in rules()] + dashboard_exprs()


def test_alert_rules_are_complete() -> None:
    found = {r["alert"] for r in rules()}
    assert REQUIRED_ALERTS <= found, REQUIRED_ALERTS - found
    for rule in rules():
        assert rule["expr"].strip() and rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_monitoring_uses_only_metric_names_a_live_broker_exports(live_broker: BrokerProcess) -> None:
    scraped = live_broker.metrics()
    families = exported_families(scraped)
    assert "broker_requests" in families or "broker_requests_total" in families, scraped[:500]
    used = {m for expr in monitoring_exprs() for m in METRIC.findall(expr)}
    assert len(used) >= 10, used
    unknown = used - sample_names(families)
    assert not unknown, f"metrics not exported by broker serve: {sorted(unknown)}"


def test_label_matchers_name_real_labels() -> None:
    labels = declared_labels()
    for expr in monitoring_exprs():
        for name, matchers in SELECTOR.findall(expr):
            for label in re.findall(r"([a-zA-Z_]+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels[name], f"{name} has no label {label!r}: {expr}"
        for by in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in by.split(",")):
                # pod and container come from the scrape target; everything else must be a metric label
                if label not in {"pod", "container", "namespace"}:
                    assert any(label in names for m, names in labels.items() if m in expr), (label, expr)


def test_podmonitor_selects_the_pods_and_ports_the_manifests_declare() -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = {e["port"]: e["path"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert set(endpoints.values()) == {"/metrics"}
    for variant in VARIANTS:
        template = next(d for d in render(variant) if d["kind"] == "Deployment")["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items(), variant
        ports = {p["name"] for p in container(template["spec"], "broker")["ports"]}
        assert ports & set(endpoints), variant
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    values = helm_values()
    assert selector.items() <= values["labels"].items()
    assert {p["name"] for p in values["workers"]["extraInitContainers"][0]["ports"]} & set(endpoints)
    assert values["airflowPodAnnotations"]["prometheus.io/port"] == "9464"


def probe_paths() -> set[str]:
    paths: set[str] = set()
    for variant in VARIANTS:
        broker = container(pod_spec(render(variant)), "broker")
        paths |= {broker[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    sidecar = helm_values()["workers"]["extraInitContainers"][0]
    paths |= {sidecar[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    return paths


def test_probe_paths_answer_on_a_live_metrics_listener(live_broker: BrokerProcess) -> None:
    paths = probe_paths()
    assert paths == {"/healthz", "/readyz"}
    for path in sorted(paths):
        status, _ = live_broker.metrics_get(path)
        assert status == 200, path
    # and the metrics listener never serves a secret
    status, _ = live_broker.metrics_get("/v1/variables/k")
    assert status == 404


def test_dashboard_parses() -> None:
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p.get("datasource") for p in board["panels"])
