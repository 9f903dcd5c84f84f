"""The broker through BrokerSecretsBackend against the provider backends, side by side, on the same stores.

One OpenBao (KV v2 at ``secret/``, KV v1 at ``kv1/``), one moto server (Secrets Manager and SSM, reached
through boto3's real credential chain), the local Key Vault (tests/servers/azure.py, over TLS, reached
with the workload-identity flow of azure-identity on both sides) and the local Secret Manager
(tests/servers/gcp.py, over TLS, both sides' credentials from google-auth's metadata-server flow, the
provider's client on the REST transport: tests/parity/runner.py says why) hold every case's secret; one broker
process per variant serves the broker side. One Airflow process per venv asks every case of every variant
of both backends and records what Airflow builds from each answer (tests/parity/runner.py). Any answer
that differs must be a row of the parity table in docs/airflow.md (tests/parity/differences.py); anything
else fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.e2e.venvs import AIRFLOW_VERSIONS, ensure_airflow
from tests.parity.cases import (
    BAD_ENTRY_VARIANTS,
    LAYOUT_VARIANTS,
    NAMING_VARIANTS,
    PASSWORD,
    TEAM_VARIANTS,
    VARIANTS,
    Seed,
    bad_entry_plan,
    layout_plan,
    naming_plan,
    plan,
    team_plan,
)
from tests.parity.differences import DIFFERENCES, explain, view
from tests.servers.azure import AzureServers
from tests.servers.cloud import TestCA
from tests.servers.gcp import SECRET_ID, GcpServers
from tests.servers.openbao import ROOT_TOKEN, OpenBao
from tests.support.broker_process import BrokerProcess
from tests.support.leakcheck import plant

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
REGION = "us-east-1"
CLOUD_VARIABLES = ("AWS_", "AZURE_", "GOOGLE_", "GCE_", "CLOUDSDK_")  # the runner's own: none reaches either side
plant("parity", PASSWORD)  # stored in many cases' passwords and variables: it must reach no broker log


def seed(seeds: list[Seed], bao: OpenBao, moto_url: str, azure: AzureServers, gcp: GcpServers) -> None:
    """Write every seed in its store (a name a store refuses is left out: both sides then find nothing)."""
    vault = bao.client()
    sm = boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_url, **_keys())
    ssm = boto3.client("ssm", region_name=REGION, endpoint_url=moto_url, **_keys())
    for s in seeds:
        try:
            if s.store in ("env", "file"):
                continue  # set in the environment of both sides (job, run_in_airflow); files: write_files
            if s.store == "gcp":
                if not SECRET_ID.fullmatch(s.path):
                    continue  # a name Secret Manager cannot hold: INVALID_ARGUMENT whoever asks
                gcp.cloud.add(s.path, s.value)
                if s.access == "denied":
                    gcp.cloud.denied.add(s.path)
                elif s.access == "disabled":
                    gcp.cloud.secrets[s.path][-1].state = "DISABLED"
            elif s.store == "azure":
                # a name Key Vault refuses is never asked for by either side
                azure.cloud.add(s.path, s.value, enabled=s.access != "disabled")
                if s.access == "denied":
                    azure.cloud.denied.add(s.path)
            elif s.store == "vault_kv2":
                vault.secrets.kv.v2.create_or_update_secret(path=s.path, secret=s.value, mount_point="secret")
            elif s.store == "vault_kv1":
                vault.secrets.kv.v1.create_or_update_secret(path=s.path, secret=s.value, mount_point="kv1")
            elif s.store == "secretsmanager":
                sm.create_secret(Name=s.path, SecretString=s.value)
            elif s.value:  # SSM refuses empty values
                ssm.put_parameter(Name=s.path, Value=s.value, Type="SecureString", Overwrite=True)
        except Exception as exc:
            print(f"parity: {s.store} refused {s.path!r}: {type(exc).__name__}")
    vault.adapter.close()


def write_files(seeds: list[Seed], kwargs: dict[str, Any]) -> None:
    """One file variant's secrets files, at the paths of its kwargs: JSON objects, or ``.env`` lines."""
    paths = {"connection": "connections_file_path", "variable": "variables_file_path", "config": "configs_file_path"}
    by_file: dict[Path, dict[str, Any]] = {Path(kwargs[key]): {} for key in paths.values() if key in kwargs}
    for s in seeds:
        by_file[Path(kwargs[paths[s.kind]])][s.path] = s.value
    for path, entries in by_file.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".env":
            path.write_text("".join(f"{key}={value}\n" for key, value in entries.items()))
        else:
            path.write_text(json.dumps(entries))


def fill(settings: dict[str, Any], files: Path) -> dict[str, Any]:
    """Settings with ``{files}`` naming the variant's directory of secrets files."""
    return {k: v.format(files=files) if isinstance(v, str) else v for k, v in settings.items()}


def _keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("parity")
    bao = OpenBao(work / "bao").start()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    ca = TestCA(work / "ca")
    azure = AzureServers(ca)
    gcp = GcpServers(ca)
    try:
        bao.client().sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
        token = work / "bao.token"
        token.write_text(ROOT_TOKEN)
        azure_token = work / "azure-identity-token"  # the projected service-account token of the pod
        azure_token.write_text(azure.cloud.federated_token)
        yield {
            "bao": bao,
            "moto_url": f"http://{host}:{port}",
            "token": token,
            "work": work,
            "azure": azure,
            "gcp": gcp,
            "ca": ca,
            # what the AKS webhook injects and what a GKE pod sees (the metadata server), for both sides; the
            # Azure SDK's and the google REST transport's requests sessions read the CA from REQUESTS_CA_BUNDLE:
            # the test CA alone, as only the local servers are reached (the google provider opens a connection
            # per lookup, and loading the system bundle for each costs about 30 ms); no gcloud configuration
            # from a home directory
            "cloud_env": azure.env(str(azure_token))
            | gcp.env()
            | {"REQUESTS_CA_BUNDLE": str(ca.ca_path), "CLOUDSDK_CONFIG": str(work / "gcloud")},
        }
    finally:
        gcp.stop()
        azure.stop()
        moto.stop()
        bao.stop()


def broker_backend(store: str, settings: dict[str, Any], stores: dict[str, Any]) -> dict[str, Any]:
    if store == "file":
        return {"name": "parity", "type": "file", **settings}
    if store == "env":
        return {"name": "parity", "type": "env", **settings}
    if store == "gcp":
        base = {
            "type": "gcp_secret_manager",
            "endpoint_url": stores["gcp"].secret_manager.url,
            "ca_cert": str(stores["ca"].ca_path),
        }
    elif store == "azure":
        base = {
            "type": "azure_key_vault",
            "vault_url": stores["azure"].key_vault.url,
            "ca_cert": str(stores["azure"].ca.ca_path),
            "verify_challenge_resource": False,  # the local vault is 127.0.0.1, not *.vault.azure.net
        }
    elif store.startswith("vault"):
        base = {
            "type": "vault",
            "url": stores["bao"].url,
            "auth": {"method": "token", "token_file": str(stores["token"])},
        }
    else:
        kind = "aws_secrets_manager" if store == "secretsmanager" else "aws_ssm"
        base = {"type": kind, "region_name": REGION, "endpoint_url": stores["moto_url"]}
    return {"name": "parity", **base, **settings}


def provider_kwargs(store: str, kwargs: dict[str, Any], stores: dict[str, Any]) -> dict[str, Any]:
    if store in ("file", "env", "gcp"):  # the google provider's project and credentials: the metadata server
        return dict(kwargs)
    if store == "azure":  # extra kwargs go to the provider's SecretClient
        return {"vault_url": stores["azure"].key_vault.url, "verify_challenge_resource": False, **kwargs}
    if store.startswith("vault"):
        return {"url": stores["bao"].url, "token": ROOT_TOKEN, **kwargs}
    return {"region_name": REGION, "endpoint_url": stores["moto_url"], **kwargs}


@pytest.fixture(scope="module")
def job(stores: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Seed the stores, start one broker per variant (in parallel), and build the job the runner reads."""
    groups, seeds, brokers = [], [], []
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLOUD_VARIABLES)} | AWS_ENV
    env |= stores["cloud_env"]
    planned = [(v, plan) for v in VARIANTS] + [(v, team_plan) for v in TEAM_VARIANTS]
    planned += [(v, layout_plan) for v in LAYOUT_VARIANTS] + [(v, naming_plan) for v in NAMING_VARIANTS]
    planned += [(v, bad_entry_plan) for v in BAD_ENTRY_VARIANTS]
    for index, (variant, planner) in enumerate(planned):
        variant_seeds, cases = planner(index, variant)
        seeds += variant_seeds
        work = stores["work"] / f"broker-{variant.name}"
        work.mkdir()
        files = stores["work"] / "files" / variant.name
        if variant.store == "file":
            write_files(variant_seeds, fill(variant.kwargs, files))
        config = {
            "cache": {"ttl": 300, "negative_ttl": 0},
            "shutdown": {"drain_delay": 0},  # nothing is in flight at the end
            "backends": [broker_backend(variant.store, fill(variant.broker, files), stores)],
            "multi_team": variant.multi_team,
        }
        brokers.append(BrokerProcess(config, work, env=env))
        groups.append(
            {
                "variant": variant.name,
                "provider": variant.provider,
                "kwargs": provider_kwargs(variant.store, fill(variant.kwargs, files), stores),
                "broker_kwargs": {"socket_path": brokers[-1].socket_path, "timeout": 10},
                "cases": cases,
                "multi_team": variant.multi_team,
                # teams are Airflow 3.2+; path lists and global_secrets_path arrived in hashicorp 4.8
                "airflow3_only": variant.multi_team or bool(variant.path_list),
                # LocalFilesystemBackend builds the ORM Connection itself and has no get_conn_value: the task
                # SDK's context is not asked of it
                "server_only": variant.store == "file",
                # the google provider's client on the REST transport, to the local Secret Manager
                **({"rest_endpoint": stores["gcp"].secret_manager.url} if variant.store == "gcp" else {}),
            }
        )
    seed(seeds, stores["bao"], stores["moto_url"], stores["azure"], stores["gcp"])
    # The environment backends' seeds: in every broker's environment and the Airflow processes' (not in
    # this process's: the other tests' brokers inherit it).
    env_seeds = {s.path: s.value for s in seeds if s.store == "env" and "=" not in s.path}  # '=' cannot be in one
    for broker in brokers:
        broker.env = env | env_seeds
        broker.start(wait_ready=False)
    try:
        for broker in brokers:
            broker.wait_ready(30)
        yield {"groups": groups, "env": env_seeds}
    finally:
        with ThreadPoolExecutor(8) as pool:  # each waits for its own process to exit
            list(pool.map(lambda broker: broker.stop(), brokers))


def run_in_airflow(python: Path, job: dict[str, Any], work: Path, cloud_env: dict[str, str]) -> dict[str, Any]:
    job_file, out_file = work / "job.json", work / "out.json"
    job_file.write_text(json.dumps({"groups": job["groups"]}))
    home = work / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VIRTUAL_ENV", *CLOUD_VARIABLES))}
    env |= (
        AWS_ENV
        | cloud_env
        | job["env"]
        | {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "PYTHONWARNINGS": "ignore",
        }
    )
    result = subprocess.run(
        [str(python), str(REPO / "tests" / "parity" / "runner.py"), str(job_file), str(out_file)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=home,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return dict(json.loads(out_file.read_text()))


def test_broker_answers_as_the_provider_backends(job: dict[str, Any], stores: dict[str, Any]) -> None:
    versions = sorted(AIRFLOW_VERSIONS.values())
    with ThreadPoolExecutor(len(versions)) as pool:
        pythons = list(pool.map(ensure_airflow, versions))
    for version in versions:
        (stores["work"] / f"airflow-{version}").mkdir()
    started = time.monotonic()
    with ThreadPoolExecutor(len(versions)) as pool:  # one Airflow process per venv, side by side
        outputs = list(
            pool.map(
                lambda vp: run_in_airflow(vp[1], job, stores["work"] / f"airflow-{vp[0]}", stores["cloud_env"]),
                zip(versions, pythons),
            )
        )
    print(f"\nparity: both Airflow processes took {time.monotonic() - started:.1f}s")
    for out in outputs:
        slowest = sorted(out["seconds"].items(), key=lambda kv: -kv[1])[:4]
        print(f"parity: airflow {out['airflow']} slowest variants: {slowest}")
    total, agree, documented = 0, 0, Counter[str]()
    undocumented: list[str] = []
    for out in outputs:
        for result in out["results"]:
            total += 1
            provider, broker = view(result["provider"]), view(result["broker"])
            if provider == broker:
                agree += 1
                continue
            row = explain({**result["case"], "airflow": out["airflow"]}, provider, broker)
            if row is None:
                undocumented.append(f"airflow {out['airflow']}: {json.dumps(result, sort_keys=True)}")
            else:
                documented[row] += 1
    print(f"\nparity: {total} cases, {agree} agree, {sum(documented.values())} documented differences")
    for row, count in sorted(documented.items()):
        print(f"parity:   {count:4d} x {row}")
    assert total >= 400, total
    every = stores["work"] / "undocumented.txt"
    every.write_text("".join(f"{line}\n" for line in undocumented))
    assert not undocumented, f"{len(undocumented)} undocumented differences (all in {every}):\n" + "\n".join(
        undocumented[:40]
    )
    assert set(documented) <= {d.id for d in DIFFERENCES}


def test_every_documented_difference_is_a_row_of_the_parity_table() -> None:
    table = (REPO / "docs" / "airflow.md").read_text()
    assert "## Parity with the provider backends" in table
    section = table.split("## Parity with the provider backends", 1)[1]
    missing = [d.id for d in DIFFERENCES if f"`{d.id}`" not in section]
    assert not missing, f"rows missing from the parity table in docs/airflow.md: {missing}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
