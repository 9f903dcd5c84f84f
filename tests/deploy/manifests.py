"""Render the kustomize variants once and pick out the parts the deploy tests look at."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate.utils  # type: ignore[import-untyped]
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
NODE_MODE = "overlays/node-mode"  # a DaemonSet, not the sidecar: tests/deploy/test_node_mode.py checks it
OVERLAYS = sorted(
    p.name
    for p in (KUSTOMIZE / "overlays").iterdir()
    if (p / "kustomization.yaml").exists() and f"overlays/{p.name}" != NODE_MODE
)
VARIANTS = ["base", *(f"overlays/{name}" for name in OVERLAYS)]
REQUIRED_OVERLAYS = {
    "aws-irsa",
    "aws-pod-identity",
    "gke-workload-identity",
    "azure-workload-identity",
    "vault-kubernetes",
    "no-native-sidecar",
}
NON_NATIVE = {"overlays/no-native-sidecar"}
MIN_KUBERNETES = (1, 29)


def kubernetes_versions() -> list[str]:
    """Every bundled schema version from 1.29 to the newest, e.g. ["1.29.0", ..., "1.37.0"]."""
    versions = {v for v in kubernetes_validate.utils.all_versions() if _minor(v) >= MIN_KUBERNETES}
    return sorted(versions, key=_minor)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.lstrip("v").split(".")[:2]
    return int(major), int(minor)


def kubectl() -> str:
    return shutil.which("kubectl") or "/usr/bin/kubectl"


@functools.cache
def _render(variant: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(KUSTOMIZE / variant)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {variant} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(variant: str) -> list[dict[str, Any]]:
    """The rendered objects of a variant (a fresh copy: tests may change it)."""
    return copy.deepcopy(list(_render(variant)))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in all_containers(spec) if c["name"] == name]
    return found


def broker_yaml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The broker.yaml held by the variant's generated ConfigMap."""
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("broker-config")]
    data: dict[str, Any] = yaml.safe_load(cm["data"]["broker.yaml"])
    return data


def helm_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((DEPLOY / "helm" / "values-broker.yaml").read_text())
    return values


def base_broker_config() -> dict[str, Any]:
    """The base variant's broker.yaml, as a fresh dict."""
    return broker_yaml(render("base"))
