"""``make bench``: the broker against its peer on this machine, side by side, printed as Markdown.

Sections: (1) cached lookups over loopback TCP (wrk) and the unix socket (loadgen, with its ceiling);
(2) OpenBao's caching proxy on the same wrk settings in the same run, cached dynamic secret and KV v2;
(3) ``get_conn_value`` latency as an Airflow task feels it, broker vs Airflow's provider backends direct;
(4) a thundering herd on one cold key; (5) the audit trail's cost on the hot path, on vs off; (6) memory
and start-up (benchmarks/footprint.py: idle RSS per store, the floor, bytes per entry, start to ready next
to ``bao proxy``, the client's import time); (7) a node running 200 short tasks: sidecar mode vs node
mode vs the provider backend direct (benchmarks/node_mode.py). Every figure is the median of repeated runs,
and every ratio compares runs interleaved in the same session (this machine is shared and noisy).

Results: benchmarks/results/<UTC time>.json and results/latest.json; the tables also go to
benchmarks/RESULTS.md. Options: --quick (1 short repeat), --repeats N, --duration S, --only SECTIONS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack
from stack import HERE, ROOT, TOKEN, Daemon, Vault

AIRFLOW_VENV = Path(os.environ.get("BROKER_BENCH_AIRFLOW_VENV", HERE / ".venv-airflow"))
AIRFLOW_PACKAGES = [
    "apache-airflow==3.3.2",
    "apache-airflow-providers-hashicorp",
    "apache-airflow-providers-amazon",
]
AUTH = {"X-Broker-Token": TOKEN}
SECTIONS = ("throughput", "airflow", "herd", "audit", "memory", "node")

tables: list[str] = []


def emit(title: str, header: list[str], rows: list[list[Any]], note: str = "") -> None:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    tables.append(text)
    print(text, flush=True)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def us(value: float) -> str:
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------- 1 + 2


def throughput(vault: Vault, broker: Daemon, fast: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    """wrk at 8 and 64 connections: proxy, broker with the fast path off and on, interleaved."""
    results: dict[str, Any] = {}
    targets: list[tuple[str, str, dict[str, str]]] = []
    if vault.pg is not None:
        targets += [
            ("proxy dynamic", vault.proxy_url("/v1/database/creds/airflow"), {}),
            ("broker dynamic", broker.tcp_url("/v1/connections/pg_dynamic"), AUTH),
            ("fast dynamic", fast.tcp_url("/v1/connections/pg_dynamic"), AUTH),
        ]
    targets += [
        ("proxy kv2", vault.proxy_url("/v1/secret/data/connections/kv_conn"), {}),
        ("broker kv2", broker.tcp_url("/v1/connections/kv_conn"), AUTH),
        ("fast kv2", fast.tcp_url("/v1/connections/kv_conn"), AUTH),
    ]
    rows = []
    for conns in (8, 64):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
        for _ in range(args.repeats):
            for name, url, headers in targets:
                runs[name].append(stack.wrk(url, conns, args.duration, headers))
        med = {name: stack.median_of(r) for name, r in runs.items()}
        results[f"tcp_c{conns}"] = med
        for name, _, _ in targets:
            what = name.split()[1]
            peer = med[f"proxy {what}"]
            m = med[name]
            rows.append(
                [
                    f"{name} (TCP, wrk -c{conns})",
                    f"{m['rps']:,.0f}",
                    us(m["p50_us"]),
                    us(m["p99_us"]),
                    "1.00x" if name.startswith("proxy") else ratio(m["rps"], peer["rps"]),
                    "" if name.startswith("proxy") else ratio(m["p99_us"], peer["p99_us"]),
                ]
            )
    emit(
        "Cached lookups over loopback TCP, side by side with OpenBao's caching proxy",
        ["server, secret", "req/s", "p50", "p99", "req/s vs proxy", "p99 vs proxy"],
        rows,
        f"wrk -t1, {args.duration:g} s per run, median of {args.repeats} interleaved runs. `proxy dynamic`: "
        "`bao proxy` (auto-auth jwt, `cache {}`) serving a cached leased secret (database/creds); `proxy kv2`: "
        "KV v2 read through the proxy (it cannot cache KV). `broker`: `broker serve` (aiohttp), Vault backend "
        "with jwt login, cached; `fast`: the default fast path on; `broker`: `listen.fast_path: false`.",
    )

    # The unix socket: the project's load generator, and its own ceiling against a trivial server.
    unix_rows = []
    with tempfile.TemporaryDirectory(prefix="broker-bench-triv-") as tmp:
        trivial = str(Path(tmp) / "trivial.sock")
        with stack.trivial_server(trivial):
            for conns in (8, 64):
                sockets = [("trivial server (loadgen ceiling)", trivial), ("broker", broker.socket)]
                sockets.append(("fast", fast.socket))
                runs = {name: [] for name, _ in sockets}
                for _ in range(args.repeats):
                    for name, path in sockets:
                        r = stack.loadgen(
                            "run",
                            "--unix",
                            path,
                            "--path",
                            "/v1/connections/kv_conn",
                            "-c",
                            str(conns),
                            "-d",
                            str(args.duration),
                        )
                        if r["errors"] or set(r["statuses"]) != {"200"}:
                            raise RuntimeError(f"loadgen against {name}: {r}")
                        runs[name].append(r)
                med = {name: stack.median_of(r) for name, r in runs.items()}
                results[f"unix_c{conns}"] = med
                for name, _ in sockets:
                    m = med[name]
                    unix_rows.append(
                        [f"{name} (unix, -c{conns})", f"{m['rps']:,.0f}", us(m["p50_us"]), us(m["p99_us"])]
                    )
    emit(
        "Cached lookups over the unix socket",
        ["server", "req/s", "p50", "p99"],
        unix_rows,
        "benchmarks/loadgen.py (asyncio + uvloop, keep-alive, one request in flight per connection). The "
        "trivial server answers canned bytes: its row is the generator's ceiling on this machine.",
    )
    return results


# ---------------------------------------------------------------------------------------------- 3


def airflow_venv() -> Path | None:
    python = AIRFLOW_VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"building the Airflow bench venv at {AIRFLOW_VENV} (about 2 minutes)", file=sys.stderr, flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(AIRFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *AIRFLOW_PACKAGES], check=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"cannot build the Airflow venv ({exc}); skipping the Airflow section", file=sys.stderr)
        return None
    return python


def airflow(vault: Vault, broker: Daemon, fast: Daemon, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    python = airflow_venv()
    if python is None:
        return {"skipped": "no Airflow venv"}
    import boto3

    with stack.moto_server() as endpoint:
        sm = boto3.client(
            "secretsmanager",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        sm.create_secret(Name="airflow/connections/kv_conn", SecretString=json.dumps(stack.KV_CONN))
        job = {
            "conn_id": "kv_conn",
            "broker_socket": broker.socket,
            "fast_socket": fast.socket,
            "n_broker": 5000 if not args.quick else 1000,
            "n_direct": 1000 if not args.quick else 200,
            "vault": {"url": vault.bao.url, "token": vault.root_token},
            "aws": {"endpoint_url": endpoint},
        }
        home = work / "airflow-home"
        home.mkdir(exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(home),
            "AIRFLOW_HOME": str(home),
            "PYTHONPATH": str(ROOT),
            "SSL_CERT_FILE": os.environ.get("SSL_CERT_FILE", ""),
        }
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [str(python), str(HERE / "airflow_lookup.py")],
                input=json.dumps(job),
                check=False,
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )
            if out.returncode != 0:
                raise RuntimeError(f"airflow_lookup failed: {out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    names = {
        "broker": "BrokerSecretsBackend (unix socket, cache hit)",
        "broker_fast": "BrokerSecretsBackend, fast front (unix socket, cache hit)",
        "vault_provider": "VaultBackend direct (KV v2, OpenBao)",
        "aws_provider": "SecretsManagerBackend direct (moto)",
    }
    med = {
        key: {f: round(statistics.median(r[key][f] for r in runs), 1) for f in ("p50_us", "p99_us", "mean_us")}
        for key in runs[0]
    }
    rows = []
    for key, m in med.items():
        speedup = "" if key.startswith("broker") else f"{m['p50_us'] / med['broker']['p50_us']:.1f}x"
        if key.startswith("aws") or key.startswith("vault"):
            speedup += f" ({m['p50_us'] / med['broker_fast']['p50_us']:.1f}x with the fast front)"
        rows.append([names[key], us(m["p50_us"]), us(m["p99_us"]), speedup])
    emit(
        "What an Airflow task feels: `get_conn_value` latency",
        ["backend", "p50", "p99", "broker is faster by (p50)"],
        rows,
        f"Airflow {AIRFLOW_PACKAGES[0].split('==')[1]} in {AIRFLOW_VENV.name}; one backend object, sequential "
        f"lookups of one conn id; median of {args.repeats} runs of {job['n_broker']} (broker) / "
        f"{job['n_direct']} (direct) lookups.",
    )
    return med


# ---------------------------------------------------------------------------------------------- 4


def herd(vault: Vault, broker: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    rounds = []
    for i in range(args.repeats):
        before = broker.metric("broker_backend_calls_total", backend="vault", operation="fetch")
        r = stack.loadgen("herd", "--unix", broker.socket, "--path", f"/v1/connections/herd_{i}", "-n", "1000")
        calls = broker.metric("broker_backend_calls_total", backend="vault", operation="fetch") - before
        rounds.append({"backend_calls": calls, "all_served_ms": r["all_served_ms"], "statuses": r["statuses"]})
    rows = [
        [f"round {i + 1}", f"{r['backend_calls']:.0f}", f"{r['all_served_ms']:.0f} ms", json.dumps(r["statuses"])]
        for i, r in enumerate(rounds)
    ]
    emit(
        "Herd: 1,000 concurrent cold requests for one key",
        ["round", "backend calls", "time until all served", "answers"],
        rows,
        "1,000 unix-socket connections opened first, then one request each written back to back for a key "
        'not yet cached (Vault KV v2). Backend calls from `broker_backend_calls_total{operation="fetch"}`. '
        "The daemon runs with `listen.max_concurrency: 2000` (the default 512 answers the rest 429).",
    )
    return {"rounds": rounds}


# ---------------------------------------------------------------------------------------------- 5


def audit_cost(vault: Vault, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Cached lookups with the audit trail off and on (to a file), fast path on, runs interleaved."""
    base = {
        "listen": {"max_concurrency": 2000, "max_connections": 4096},
        "cache": {"ttl": 3600},
        "backends": [vault.broker_backend()],
    }
    audit_file = work / "audit-on" / "audit.jsonl"
    variants = {
        "audit off": json.loads(json.dumps(base)),
        "audit on": {**json.loads(json.dumps(base)), "audit": {"enabled": True, "output": str(audit_file)}},
    }
    daemons = {name: Daemon(work / name.replace(" ", "-"), cfg, tcp=True).start() for name, cfg in variants.items()}
    results: dict[str, Any] = {}
    rows = []
    try:
        for d in daemons.values():
            if d.get_tcp("/v1/connections/kv_conn")[0] != 200:
                raise RuntimeError("warming kv_conn for the audit section")
        for listener in ("unix", "tcp"):
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in daemons}
            for _ in range(args.repeats):
                for name, d in daemons.items():
                    if listener == "tcp":
                        runs[name].append(stack.wrk(d.tcp_url("/v1/connections/kv_conn"), 8, args.duration, AUTH))
                        continue
                    r = stack.loadgen(
                        "run", "--unix", d.socket, "--path", "/v1/connections/kv_conn", "-c", "8",
                        "-d", str(args.duration),
                    )  # fmt: skip
                    if r["errors"] or set(r["statuses"]) != {"200"}:
                        raise RuntimeError(f"loadgen against {name}: {r}")
                    runs[name].append(r)
            med = {name: stack.median_of(r) for name, r in runs.items()}
            results[listener] = med
            off, on = med["audit off"], med["audit on"]
            for name in daemons:
                m = med[name]
                rows.append(
                    [
                        f"{name} ({listener}, -c8)",
                        f"{m['rps']:,.0f}",
                        us(m["p50_us"]),
                        us(m["p99_us"]),
                        "1.00x" if name == "audit off" else ratio(on["rps"], off["rps"]),
                    ]
                )
        on_daemon = daemons["audit on"]
        written = on_daemon.metric("broker_audit_lines_total")
        dropped = on_daemon.metric("broker_audit_dropped_total")
        served = on_daemon.metric("broker_requests_total")
        results["audit_lines"] = {"written": written, "dropped": dropped, "requests": served}
    finally:
        for d in daemons.values():
            d.stop()
    emit(
        "The audit trail's cost on the hot path (cached lookups, fast path on)",
        ["broker", "req/s", "p50", "p99", "req/s vs audit off"],
        rows,
        f"Median of {args.repeats} interleaved runs of {args.duration:g} s; `audit on` writes one JSON line per "
        f"lookup to a file. In that daemon's whole run {written:,.0f} lines were written and {dropped:,.0f} "
        f"dropped for {served:,.0f} requests.",
    )
    return results


def memory(vault: Vault, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """benchmarks/footprint.py: idle RSS per configured store and the floor under it, bytes per cached entry,
    start to ready next to ``bao proxy``, and the Airflow client's import time."""
    import footprint

    tables, results = footprint.run(work / "footprint", set(footprint.SECTIONS), quick=args.quick, vault=vault)
    for title, header, rows in tables:
        emit(title, header, rows)
    return results


# ---------------------------------------------------------------------------------------------- main


def node_tasks(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import node_mode

    tasks = 20 if args.quick else 200
    results = node_mode.run(work / "node-mode", tasks=tasks, secrets=3)
    header, rows = node_mode.table(results)
    emit(
        f"Node mode: a node running {tasks} short tasks, each a new pod reading 3 secrets",
        header,
        rows,
        f"{results['service_accounts']} service accounts in turn, one Vault role each; the provider backend direct "
        "is simulated with the same HTTP calls VaultBackend makes (one kubernetes login and one KV read per "
        "lookup in each task process). Lookup latency is as the task process sees it, its first lookup included.",
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short repeat of everything")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk/loadgen run")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.duration = 1, 2.0
    only = set(args.only.split(","))
    if "throughput" in only and stack.ensure_wrk() is None:
        print("wrk is required: install it (Debian/Ubuntu: apt-get install wrk) and run again", file=sys.stderr)
        return 2
    os.environ.update(stack.AWS_ENV)  # the AWS backends and SDK clients in this run talk only to moto
    began = time.perf_counter()
    info = machine()
    print(f"## Benchmarks ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print(
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}; client and servers share the cores.\n",
        flush=True,
    )
    results: dict[str, Any] = {"machine": info, "args": vars(args)}
    work = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    vault = Vault(work).start()
    daemons: list[Daemon] = []
    try:
        vault.start_proxy()
        if vault.pg is not None and not vault.proxy_caches_dynamic():
            raise RuntimeError("bao proxy did not cache the leased secret")
        config = {
            "listen": {"max_concurrency": 2000, "max_connections": 4096},
            "cache": {"ttl": 3600},
            "backends": [vault.broker_backend()],
        }
        aiohttp_only = json.loads(json.dumps(config))
        aiohttp_only["listen"]["fast_path"] = False
        broker = Daemon(work / "broker", aiohttp_only, tcp=True).start()
        daemons.append(broker)
        fast = Daemon(work / "fast", json.loads(json.dumps(config)), tcp=True).start()
        daemons.append(fast)
        for d in (broker, fast):
            for path in (
                ("/v1/connections/kv_conn", "/v1/connections/pg_dynamic") if vault.pg else ("/v1/connections/kv_conn",)
            ):
                status, _ = d.get_tcp(path)
                if status != 200:
                    raise RuntimeError(f"warming {path}: {status}")
        if "throughput" in only:
            results["throughput"] = throughput(vault, broker, fast, args)
        if "airflow" in only:
            results["airflow"] = airflow(vault, broker, fast, args, work)
        if "herd" in only:
            results["herd"] = herd(vault, broker, args)
        for d in daemons:
            d.stop()
        daemons.clear()
        if "audit" in only:
            results["audit"] = audit_cost(vault, args, work)
        if "memory" in only:
            results["memory"] = memory(vault, args, work)
        if "node" in only:
            results["node"] = node_tasks(args, work)
    finally:
        for d in daemons:
            d.stop()
        vault.stop()
    elapsed = time.perf_counter() - began
    results["elapsed_s"] = round(elapsed, 1)
    footer = (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, Linux {info['kernel']}, "
        f"Python {info['python']}; load average at start {info['load_average_at_start'][0]:.2f}. "
        f"Whole run: {elapsed:.0f} s (`make bench`).\n"
    )
    print(footer)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    payload = json.dumps(results, indent=2, default=str)
    (out_dir / f"{stamp}.json").write_text(payload)
    (out_dir / "latest.json").write_text(payload)
    if only == set(SECTIONS) and not args.quick:
        (HERE / "RESULTS.md").write_text(
            f"# Benchmark results ({time.strftime('%Y-%m-%d', time.gmtime())})\n\n" + footer + "\n" + "\n".join(tables)
        )
    print(f"results: {out_dir / (stamp + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
