"""Per-lookup latency of Airflow secrets backends, as a task feels it: ``get_conn_value`` on one conn id.

Runs inside the Airflow bench venv (``benchmarks/.venv-airflow``): BrokerSecretsBackend against a warm
broker, and Airflow's own provider backends going direct (VaultBackend against OpenBao,
SecretsManagerBackend against moto). Reads a JSON job on stdin, prints JSON results on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def measure(fn: Callable[[], Any], n: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        value = fn()
        samples.append(time.perf_counter_ns() - started)
        if not value:
            raise RuntimeError("lookup returned nothing")
    samples.sort()

    def pct(q: float) -> float:
        return round(samples[min(len(samples) - 1, round(q * (len(samples) - 1)))] / 1000, 1)

    return {"n": n, "p50_us": pct(0.5), "p99_us": pct(0.99), "mean_us": round(sum(samples) / n / 1000, 1)}


def main() -> int:
    job = json.load(sys.stdin)
    out: dict[str, Any] = {}
    conn_id = job["conn_id"]

    from broker.airflow import BrokerSecretsBackend

    broker = BrokerSecretsBackend(socket_path=job["broker_socket"])
    out["broker"] = measure(lambda: broker.get_conn_value(conn_id), job["n_broker"], 200)
    if job.get("fast_socket"):
        fast = BrokerSecretsBackend(socket_path=job["fast_socket"])
        out["broker_fast"] = measure(lambda: fast.get_conn_value(conn_id), job["n_broker"], 200)

    if job.get("vault"):
        from airflow.providers.hashicorp.secrets.vault import VaultBackend

        v = job["vault"]
        vault = VaultBackend(
            url=v["url"],
            auth_type="token",
            token=v["token"],
            mount_point="secret",
            connections_path="connections",
            kv_engine_version=2,
        )
        out["vault_provider"] = measure(lambda: vault.get_conn_value(conn_id), job["n_direct"], 20)

    if job.get("aws"):
        a = job["aws"]
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": a["endpoint_url"],
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        from airflow.providers.amazon.aws.secrets.secrets_manager import SecretsManagerBackend

        sm = SecretsManagerBackend(connections_prefix="airflow/connections", region_name="us-east-1")
        out["aws_provider"] = measure(lambda: sm.get_conn_value(conn_id), job["n_direct"], 20)

    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
