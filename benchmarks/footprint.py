"""What one sidecar costs: idle memory per configured store, the floor under it, bytes per cached entry,
start to ready next to ``bao proxy``, and the Airflow client's import time in the task process.

``python benchmarks/footprint.py [--only idle,floor,entries,startup,client] [--quick]`` prints Markdown
tables; ``make bench`` runs it as its ``memory`` section. Every store is a local server on loopback: OpenBao
(jwt login), moto (both AWS stores, through boto3's credential chain), and the local Google (metadata server,
Secret Manager) and Azure (Entra, Key Vault) of tests/servers. Memory is read from /proc: ``RssAnon`` is the
process's own heap (Python objects, the SDKs' parsed data, native allocations), ``RssFile`` the mapped
interpreter, shared libraries and extension modules (shared with every other process mapping them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack
from stack import PY, ROOT, Daemon, Vault

STORES = ("file", "env", "vault", "aws_secrets_manager", "aws_ssm", "gcp_secret_manager", "azure_key_vault")
SETTLE_S = 1.0  # after ready: start-up garbage collected, the RSS settled (a measurement, not a test)
# What the image sets (Dockerfile): every daemon measured here runs with it.
IMAGE_ENV = {"MALLOC_ARENA_MAX": "2"}

# The import ladder for the floor: each step in one fresh interpreter, cumulative.
FLOOR_STEPS: list[tuple[str, str]] = [
    ("bare interpreter (python -c pass)", ""),
    ("+ asyncio (with ssl, concurrent.futures)", "import asyncio"),
    ("+ aiohttp.web (its client, connector and SSL contexts come with it)", "import aiohttp.web"),
    (
        "+ pydantic, one model built",
        "from pydantic import BaseModel\nclass M(BaseModel):\n    x: int\nM(x=1)",
    ),
    ("+ yaml, prometheus_client, uvloop, httptools", "import yaml, prometheus_client, uvloop, httptools"),
    ("+ the broker's modules (file backend, both servers)", "import broker.cli, broker.app, broker.server.fast"),
]


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (KiB) from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (a start-up figure the machine's load does not change)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


@contextlib.contextmanager
def environment(extra: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Stores:
    """Every store's local server, started on first use; backend configs and process environment for each."""

    def __init__(self, work: Path, vault: Vault | None = None) -> None:
        self.work = work
        self.vault = vault
        self._own_vault = False
        self._stack = contextlib.ExitStack()
        self.moto = ""
        self.gcp: Any = None
        self.azure: Any = None
        self.ca: Any = None
        files = work / "files"
        files.mkdir(parents=True, exist_ok=True)
        (files / "connections.json").write_text(json.dumps({"kv_conn": "postgres://u:p@h:5432/db"}))
        self.files = files

    def __enter__(self) -> Stores:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self.gcp is not None:
            self.gcp.stop()
        if self.azure is not None:
            self.azure.stop()
        if self._own_vault and self.vault is not None:
            self.vault.stop()

    def _need(self, store: str) -> None:
        if store == "vault" and self.vault is None:
            self.vault = Vault(self.work / "vault").start()
            self._own_vault = True
        elif store.startswith("aws") and not self.moto:
            self.moto = self._stack.enter_context(stack.moto_server())
        elif store in ("gcp_secret_manager", "azure_key_vault") and self.ca is None:
            from tests.servers.cloud import TestCA

            self.ca = TestCA(self.work / "ca")
        if store == "gcp_secret_manager" and self.gcp is None:
            from tests.servers.gcp import GcpServers

            self.gcp = GcpServers(self.ca)
            self.gcp.cloud.add("airflow-connections-kv_conn", "postgres://u:p@h:5432/db")
        if store == "azure_key_vault" and self.azure is None:
            from tests.servers.azure import AzureServers

            self.azure = AzureServers(self.ca)
            self.azure.cloud.add("airflow-connections-kv-conn", "postgres://u:p@h:5432/db")

    def backend(self, store: str) -> dict[str, Any]:
        self._need(store)
        if store == "file":
            return {"name": "file", "type": "file", "connections_file_path": str(self.files / "connections.json")}
        if store == "env":
            return {"name": "env", "type": "env"}
        if store == "vault":
            assert self.vault is not None
            return self.vault.broker_backend()
        if store.startswith("aws"):
            return {"name": store, "type": store, "region_name": "us-east-1", "endpoint_url": self.moto}
        if store == "gcp_secret_manager":
            return {
                "name": "gcp",
                "type": store,
                "endpoint_url": self.gcp.secret_manager.url,
                "ca_cert": str(self.ca.ca_path),
                "timeout": 5,
            }
        return {
            "name": "akv",
            "type": store,
            "vault_url": self.azure.key_vault.url,
            "ca_cert": str(self.ca.ca_path),
            "verify_challenge_resource": False,
            "timeout": 5,
        }

    def env(self, stores: list[str]) -> dict[str, str]:
        env = dict(stack.AWS_ENV)
        if "gcp_secret_manager" in stores:
            env |= self.gcp.env() | {"CLOUDSDK_CONFIG": str(self.work / "gcloud")}
        if "azure_key_vault" in stores:
            token = self.work / "azure-token"
            token.write_text(self.azure.cloud.federated_token)
            env |= self.azure.env(str(token))
        return env


def start_daemon(work: Path, config: dict[str, Any], env: dict[str, str]) -> Daemon:
    with environment(IMAGE_ENV | env):
        return Daemon(work, config).start(timeout=60)


# ---------------------------------------------------------------------------------------------- idle


def idle(
    stores: Stores, work: Path, quick: bool, only: list[str] | None = None
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Idle RSS after ready, each store alone, then every store in one chain; median of runs."""
    configs = [[s] for s in STORES] + [["aws_secrets_manager", "aws_ssm"], list(STORES)]
    if only:
        configs = [
            c for c in configs if (c[0] if len(c) == 1 else "+".join(c) if len(c) < len(STORES) else "all") in only
        ]
    rows, out = [], {}
    runs = 1 if quick else 3
    for chain in configs:
        name = chain[0] if len(chain) == 1 else "+".join(chain) if len(chain) < len(STORES) else "all"
        label = name if name != "all" else "all (" + ", ".join(chain) + ")"
        samples = []
        for i in range(runs):
            config = {"backends": [stores.backend(s) for s in chain]}
            d = start_daemon(work / f"idle-{name}-{i}", config, stores.env(chain))
            try:
                time.sleep(SETTLE_S)
                samples.append(status_kib(d.proc.pid))  # type: ignore[union-attr]
            finally:
                d.stop()
        med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        out[name] = {k: round(v / 1024, 1) for k, v in med.items()}
        rows.append([label, mib(med["VmRSS"]), mib(med["RssAnon"]), mib(med["RssFile"])])
    return rows, out


# ---------------------------------------------------------------------------------------------- floor


def floor() -> tuple[list[list[Any]], dict[str, Any]]:
    """RSS of a fresh interpreter after each cumulative import step (no broker, then the broker's modules)."""
    probe = (
        "import gc\n{code}\ngc.collect()\n"
        "import json\nprint(json.dumps({{l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/status') "
        "if l.startswith(('VmRSS', 'RssAnon', 'RssFile'))}}))"
    )
    rows, out = [], {}
    code = ""
    prev = 0
    for label, step in FLOOR_STEPS:
        code = f"{code}\n{step}" if step else code
        samples = []
        for _ in range(3):
            r = subprocess.run(
                [PY, "-c", probe.format(code=code)], capture_output=True, text=True, check=True, cwd=ROOT
            )
            samples.append(json.loads(r.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        out[label] = {k: round(v / 1024, 1) for k, v in med.items()}
        rows.append(
            [label, mib(med["VmRSS"]), mib(med["RssAnon"]), mib(med["RssFile"]), f"+{mib(med['VmRSS'] - prev)}"]
        )
        prev = med["VmRSS"]
    return rows, out


# ---------------------------------------------------------------------------------------------- entries


def entries(work: Path, quick: bool) -> tuple[list[list[Any]], dict[str, Any]]:
    """Bytes per cached entry: the daemon's RSS growth per entry filled over the unix socket (file backend
    holding every value already, so the growth is the cache's), and the cache alone under tracemalloc."""
    counts = (10_000, 100_000)
    files = work / "entries-files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "variables.json").write_text(
        json.dumps({f"v{i}": f"value-{i:06d}-0123456789abcdef" for i in range(counts[-1])})
    )
    backend = {"name": "file", "type": "file", "variables_file_path": str(files / "variables.json")}
    d = start_daemon(work / "entries", {"cache": {"ttl": 3600, "max_entries": 200_000}, "backends": [backend]}, {})
    rows, out = [], {}
    try:
        time.sleep(SETTLE_S)
        base = status_kib(d.proc.pid)["VmRSS"]  # type: ignore[union-attr]
        out["rss_before_mib"] = round(base / 1024, 1)
        rss_at: dict[int, int] = {}
        for count in counts:
            got = stack.loadgen(
                "fill", "--unix", d.socket, "--pattern", "/v1/variables/v{i}", "--count", str(count), "-c", "16",
                timeout=600,
            )  # fmt: skip
            if set(got["statuses"]) != {"200"}:
                raise RuntimeError(f"fill: {got}")
            time.sleep(SETTLE_S)
            rss = status_kib(d.proc.pid)["VmRSS"]  # type: ignore[union-attr]
            per = (rss - base) * 1024 / count
            rss_at[count] = rss
            out[f"daemon_{count}"] = {"rss_mib": round(rss / 1024, 1), "bytes_per_entry": round(per)}
            rows.append([f"daemon RSS growth, {count:,} entries", f"{per:,.0f} B", f"RSS {mib(rss)} MiB"])
        marginal = (rss_at[counts[-1]] - rss_at[counts[0]]) * 1024 / (counts[-1] - counts[0])
        out["daemon_marginal"] = {"bytes_per_entry": round(marginal)}
        rows.append(
            [
                f"daemon RSS growth per entry from {counts[0]:,} to {counts[-1]:,} entries",
                f"{marginal:,.0f} B",
                "what one more entry costs, without the first lookups' one-time growth",
            ]
        )
    finally:
        d.stop()
    r = subprocess.run(
        [PY, str(Path(__file__).resolve().parent / "cache_entries.py"), *map(str, counts)],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    alone = json.loads(r.stdout.strip().splitlines()[-1])
    for count in counts:
        b = alone[str(count)]
        out[f"cache_{count}"] = b
        rows.append(
            [
                f"the cache alone (tracemalloc), {count:,} entries",
                f"{b['bytes_per_entry']:,} B",
                f"redaction registry {b['registry_bytes_per_entry']:,} B more",
            ]
        )
    return rows, out


# ---------------------------------------------------------------------------------------------- startup


def startup(stores: Stores, work: Path, quick: bool) -> tuple[list[list[Any]], dict[str, Any]]:
    """Start to ready, interleaved: the broker (file; Vault with jwt login) and ``bao proxy`` (jwt auto-auth,
    ready when a KV read through it answers 200)."""
    vault = stores.vault
    if vault is None:
        stores.backend("vault")
        vault = stores.vault
    assert vault is not None
    runs = 2 if quick else 5
    labels = ("broker, file backend", "broker, Vault backend (jwt)", "bao proxy (jwt auto-auth, cache)")
    times: dict[str, list[float]] = {label: [] for label in labels}
    cpu: dict[str, list[float]] = {label: [] for label in labels}
    mem: dict[str, list[dict[str, int]]] = {label: [] for label in labels}
    for i in range(runs):
        for label, store in zip(labels, ("file", "vault"), strict=False):
            d = start_daemon(work / f"start-{store}-{i}", {"backends": [stores.backend(store)]}, stores.env([store]))
            times[label].append(d.ready_after)
            cpu[label].append(cpu_seconds(d.proc.pid))  # type: ignore[union-attr]
            time.sleep(SETTLE_S)
            mem[label].append(status_kib(d.proc.pid))  # type: ignore[union-attr]
            d.stop()
        stack.stop_process(vault.proxy_proc)
        log = getattr(vault, "_proxy_log", None)
        if log is not None:
            log.close()
        began = time.perf_counter()
        vault.start_proxy()
        times[labels[2]].append(time.perf_counter() - began)
        cpu[labels[2]].append(cpu_seconds(vault.proxy_proc.pid))  # type: ignore[union-attr]
        time.sleep(SETTLE_S)
        mem[labels[2]].append(status_kib(vault.proxy_proc.pid))  # type: ignore[union-attr]
    out = {
        k: {
            "ready_s": round(statistics.median(times[k]), 3),
            "cpu_s": round(statistics.median(cpu[k]), 3),
            **{f: round(statistics.median(m[f] for m in mem[k]) / 1024, 1) for f in ("VmRSS", "RssAnon", "RssFile")},
        }
        for k in labels
    }
    rows = [
        [
            k,
            f"{v['ready_s'] * 1000:.0f} ms",
            f"{v['cpu_s'] * 1000:.0f} ms",
            f"{v['VmRSS']} / {v['RssAnon']} / {v['RssFile']}",
        ]
        for k, v in out.items()
    ]
    return rows, out


# ---------------------------------------------------------------------------------------------- client


def client_import(quick: bool) -> tuple[list[list[Any]], dict[str, Any]]:
    """``import broker.client`` in a fresh task process: wall time over ``python -c pass`` and its own
    ``-X importtime`` figure; the modules it loads beyond the interpreter's own."""
    runs = 5 if quick else 21

    def wall(code: str) -> float:
        began = time.perf_counter()
        subprocess.run([PY, "-c", code], check=True, cwd=ROOT)
        return time.perf_counter() - began

    bare, with_client = [], []
    for _ in range(runs):
        bare.append(wall("pass"))
        with_client.append(wall("import broker.client"))
    r = subprocess.run(
        [PY, "-X", "importtime", "-c", "import broker.client"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    cumulative = [
        int(line.split("|")[1]) for line in r.stderr.splitlines() if line.rstrip().endswith("| broker.client")
    ]
    mods = subprocess.run(
        [PY, "-c", "import sys; a=set(sys.modules); import broker.client; print(len(set(sys.modules)-a))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    out = {
        "wall_over_bare_ms": round((statistics.median(with_client) - statistics.median(bare)) * 1000, 1),
        "importtime_us": cumulative[0] if cumulative else None,
        "modules_added": int(mods.stdout.strip()),
    }
    rows = [
        [
            "`import broker.client`, wall time over `python -c pass`",
            f"{out['wall_over_bare_ms']} ms",
            f"median of {runs}",
        ],
        ["`-X importtime` cumulative for broker.client", f"{(out['importtime_us'] or 0) / 1000:.1f} ms", ""],
        ["modules it adds to the task process", str(out["modules_added"]), "stdlib only"],
    ]
    return rows, out


# ---------------------------------------------------------------------------------------------- main

SECTIONS = ("idle", "floor", "entries", "startup", "client")
HEADERS = {
    "idle": ["configured stores", "RSS (MiB)", "RssAnon", "RssFile"],
    "floor": ["fresh interpreter, cumulative", "RSS (MiB)", "RssAnon", "RssFile", "step"],
    "entries": ["measure", "bytes per entry", "note"],
    "startup": ["process", "start to ready (wall)", "CPU time to ready", "RSS / RssAnon / RssFile when ready (MiB)"],
    "client": ["measure", "value", "note"],
}
TITLES = {
    "idle": "Idle RSS per configured store (after ready, median of 3)",
    "floor": "The floor: what the interpreter and the libraries cost before any broker code",
    "entries": "Bytes per cached entry",
    "startup": "Start to ready, side by side with `bao proxy` (median of 5, interleaved)",
    "client": "The Airflow client in the task process",
}


def run(
    work: Path, only: set[str], *, quick: bool = False, vault: Vault | None = None, subset: list[str] | None = None
) -> tuple[list[tuple[str, list[str], list[list[Any]]]], dict[str, Any]]:
    """Run the chosen sections; returns (title, header, rows) tables and the figures."""
    tables, results = [], {}
    # The image compiles every module to bytecode; a checkout run with PYTHONDONTWRITEBYTECODE would
    # compile the broker's own from source at every start (about 0.3 MiB more, and more CPU to ready).
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "broker")], check=True, capture_output=True)
    steps: dict[str, Callable[[Stores], tuple[list[list[Any]], dict[str, Any]]]] = {
        "idle": lambda s: idle(s, work, quick, subset),
        "floor": lambda s: floor(),
        "entries": lambda s: entries(work, quick),
        "startup": lambda s: startup(s, work, quick),
        "client": lambda s: client_import(quick),
    }
    with Stores(work / "stores", vault) as stores:
        for name in SECTIONS:
            if name in only:
                rows, results[name] = steps[name](stores)
                tables.append((TITLES[name], HEADERS[name], rows))
    return tables, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stores", default="", help=f"idle: a subset of {STORES} and all")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="broker-footprint-"))
    subset = [s for s in args.stores.split(",") if s] or None
    tables, results = run(work, set(args.only.split(",")), quick=args.quick, subset=subset)
    for title, header, rows in tables:
        print(f"### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
        print()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
