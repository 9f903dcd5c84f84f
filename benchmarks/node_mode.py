"""A node running short KubernetesExecutor tasks: sidecar mode vs node mode vs the provider backend direct.

Each task is a new pod: a new client process with its own projected token (issued by a local Kubernetes
API, tests/servers/tokenreview.py) reading a few secrets from one OpenBao whose kubernetes auth reviews the
tokens with that API. Tasks cycle through a few service accounts, one Vault role each.

- **sidecar**: every task pod starts its own broker (cold), which logs in with the pod's token and reads
  what the task asks for; the task's client reads through it.
- **node**: one broker for the node (node mode); each task's client sends its pod's token.
- **direct**: what Airflow's ``VaultBackend`` does in a task process: one kubernetes-auth login, then one
  KV v2 read per lookup. Simulated with the same HTTP calls (urllib) rather than installing the provider
  (Airflow, hvac and the provider would add seconds of import time per task that are not the backend's).

Reported per mode: store reads and logins (from the brokers' metrics; counted by the task for direct),
p50/p99 of each lookup as the task process sees it (the first lookup of a task includes its cold start:
connecting, the login or TokenReview), and memory (the broker's RSS; one sidecar per running task pod).
Run alone: ``python benchmarks/node_mode.py [--tasks 200] [--secrets 3]``; ``make bench`` runs it too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stack import PY, ROOT, Daemon

from tests.servers.openbao import OpenBao
from tests.servers.tokenreview import KubernetesAPI

NODE = "node-a"
ACCOUNTS = ("team-a", "team-b", "team-c", "team-d")

BROKER_TASK = """
import json, sys, time
t0 = time.perf_counter()
from broker.client import BrokerClient
client = BrokerClient(socket_path=sys.argv[1], pod_token_file=sys.argv[2] or None)
out = []
for name in sys.argv[3:]:
    start = time.perf_counter()
    value = client.get("variable", name)
    out.append(time.perf_counter() - start)
    assert value, name
print(json.dumps(out))
"""

DIRECT_TASK = """
import json, sys, time, urllib.request
url, role, token_file = sys.argv[1:4]
def call(method, path, body=None, token=None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body else None, method=method)
    if token:
        req.add_header("X-Vault-Token", token)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())
out, token = [], None
for name in sys.argv[4:]:
    start = time.perf_counter()
    if token is None:  # VaultBackend logs in on first use, once per task process
        jwt = open(token_file).read().strip()
        token = call("POST", "/v1/auth/kubernetes/login", {"role": role, "jwt": jwt})["auth"]["client_token"]
    data = call("GET", f"/v1/secret/data/{role}/variables/{name}", token=token)["data"]["data"]
    out.append(time.perf_counter() - start)
    assert data["value"], name
print(json.dumps(out))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Node:
    """The Kubernetes API and OpenBao of the simulated node."""

    def __init__(self, work: Path, secrets: int) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.names = [f"var_{i}" for i in range(secrets)]
        self.api = KubernetesAPI().start()
        broker_pod = self.api.add_pod("credential-broker", "credential-broker-node", node=NODE)
        self.reviewer = work / "reviewer-token"
        self.reviewer.write_text(self.api.token(broker_pod, audience="https://kubernetes.default.svc", ttl=86_400))
        self.bao = OpenBao(work / "bao").start()
        c = self.bao.client()
        c.sys.enable_auth_method("kubernetes")
        c.write(
            "auth/kubernetes/config",
            kubernetes_host=self.api.url,
            disable_local_ca_jwt=True,
            kubernetes_ca_cert=_ca_pem(),
        )
        for account in ACCOUNTS:
            c.sys.create_or_update_policy(account, f'path "secret/data/{account}/*" {{ capabilities = ["read"] }}\n')
            c.write(
                f"auth/kubernetes/role/{account}",
                bound_service_account_names=[account],
                bound_service_account_namespaces=["airflow"],
                audience="broker",
                token_policies=[account],
                token_ttl="1h",
            )
            for name in self.names:
                self.bao.kv2_put(f"{account}/variables/{name}", {"value": f"{account}-{name}"})
        self.tokens = work / "tokens"
        self.tokens.mkdir()

    def pod_token(self, i: int) -> tuple[str, Path]:
        account = ACCOUNTS[i % len(ACCOUNTS)]
        pod = self.api.add_pod("airflow", account, name=f"task-{i}-{time.monotonic_ns()}", node=NODE)
        path = self.tokens / f"{pod.name}"
        path.write_text(self.api.token(pod))
        return account, path

    def vault_backend(self, role: str, token_path: str | None = None) -> dict[str, Any]:
        auth: dict[str, Any] = {"method": "kubernetes", "role": role}
        if token_path:
            auth["token_path"] = token_path
        return {
            "name": "vault",
            "type": "vault",
            "url": self.bao.url,
            "auth": auth,
            "mount_point": "secret",
            "variables_path": f"{role}/variables",
            "timeout": 5,
        }

    def node_config(self) -> dict[str, Any]:
        identities = [
            {
                "namespace": "airflow",
                "service_account": a,
                "backends": ["vault"],
                "overrides": {"vault": {"auth": {"role": a}, "variables_path": f"{a}/variables"}},
            }
            for a in ACCOUNTS
        ]
        return {
            "listen": {"socket_mode": "0666"},
            "cache": {"ttl": 3600},
            "node": {
                "audience": "broker",
                "kubernetes": {"url": self.api.url, "token_path": str(self.reviewer), "ca_cert": None},
                "same_node": False,
                "identities": identities,
            },
            "backends": [self.vault_backend("unused")],
        }

    def stop(self) -> None:
        self.bao.stop()
        self.api.stop()


def _ca_pem() -> str:
    from tests.integration.vault.conftest import self_signed_ca_pem

    return self_signed_ca_pem()


def _task(args: list[str]) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([PY, "-c", *args], capture_output=True, text=True, timeout=60, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"task failed: {out.stderr[-2000:]}")
    return [float(x) for x in json.loads(out.stdout)]


def node_mode(node: Node, tasks: int) -> dict[str, Any]:
    broker = Daemon(node.work / "node-broker", node.node_config()).start()
    try:
        latencies: list[float] = []
        for i in range(tasks):
            _, token = node.pod_token(i)
            latencies += _task([BROKER_TASK, broker.socket, str(token), *node.names])
        return {
            "store_reads": broker.metric("broker_backend_calls_total", backend="vault", operation="fetch"),
            "logins": broker.metric("broker_logins_total", backend="vault", outcome="ok"),
            "latencies": latencies,
            "rss_kib": broker.rss_kib(),
            "brokers": 1,
        }
    finally:
        broker.stop()


def sidecar_mode(node: Node, tasks: int) -> dict[str, Any]:
    latencies: list[float] = []
    reads = logins = 0.0
    rss: list[int] = []
    startups: list[float] = []
    for i in range(tasks):
        account, token = node.pod_token(i)
        config = {"cache": {"ttl": 3600}, "backends": [node.vault_backend(account, str(token))]}
        sidecar = Daemon(node.work / f"sidecar-{i}", config).start()
        startups.append(sidecar.ready_after)
        try:
            latencies += _task([BROKER_TASK, sidecar.socket, "", *node.names])
            reads += sidecar.metric("broker_backend_calls_total", backend="vault", operation="fetch")
            logins += sidecar.metric("broker_logins_total", backend="vault", outcome="ok")
            rss.append(sidecar.rss_kib())
        finally:
            sidecar.stop()
    return {
        "store_reads": reads,
        "logins": logins,
        "latencies": latencies,
        "rss_kib": int(statistics.median(rss)),
        "startup_s": round(statistics.median(startups), 2),
        "brokers": tasks,
    }


def direct_mode(node: Node, tasks: int) -> dict[str, Any]:
    latencies: list[float] = []
    for i in range(tasks):
        account, token = node.pod_token(i)
        latencies += _task([DIRECT_TASK, node.bao.url, account, str(token), *node.names])
    return {
        "store_reads": float(tasks * len(node.names)),
        "logins": float(tasks),
        "latencies": latencies,
        "rss_kib": 0,
        "brokers": 0,
    }


def run(work: Path, tasks: int = 200, secrets: int = 3, sidecar_tasks: int | None = None) -> dict[str, Any]:
    """All three modes on one node; returns the figures (latencies summarised)."""
    node = Node(work, secrets)
    results: dict[str, Any] = {"tasks": tasks, "secrets_per_task": secrets, "service_accounts": len(ACCOUNTS)}
    try:
        modes: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
            ("sidecar", lambda: sidecar_mode(node, sidecar_tasks or tasks)),
            ("node", lambda: node_mode(node, tasks)),
            ("direct", lambda: direct_mode(node, tasks)),
        )
        for name, fn in modes:
            began = time.perf_counter()
            figures = fn()
            lat = figures.pop("latencies")
            figures |= {
                "tasks": sidecar_tasks or tasks if name == "sidecar" else tasks,
                "lookups": len(lat),
                "p50_ms": round(statistics.median(lat) * 1000, 2),
                "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
                "wall_s": round(time.perf_counter() - began, 1),
            }
            results[name] = figures
    finally:
        node.stop()
    return results


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["mode", "tasks", "store reads", "logins", "lookup p50", "lookup p99", "memory", "start-up per pod"]
    rows = []
    labels = {"sidecar": "sidecar per task pod", "node": "node mode (one broker)", "direct": "provider backend direct"}
    for mode in ("sidecar", "node", "direct"):
        r = results[mode]
        if mode == "sidecar":
            memory = f"{r['rss_kib'] / 1024:.0f} MiB per running task pod"
        elif mode == "node":
            memory = f"{r['rss_kib'] / 1024:.0f} MiB per node"
        else:
            memory = "none besides the task process"
        rows.append(
            [
                labels[mode],
                r["tasks"],
                int(r["store_reads"]),
                int(r["logins"]),
                f"{r['p50_ms']:.2f} ms",
                f"{r['p99_ms']:.2f} ms",
                memory,
                f"{r['startup_s']:.2f} s (sidecar ready)" if "startup_s" in r else "none",
            ]
        )
    return header, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--secrets", type=int, default=3)
    parser.add_argument("--sidecar-tasks", type=int, default=None, help="fewer sidecar tasks (each starts a broker)")
    args = parser.parse_args()
    results = run(Path(tempfile.mkdtemp(prefix="broker-node-bench-")), args.tasks, args.secrets, args.sidecar_tasks)
    header, rows = table(results)
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
