"""Command line: ``broker serve | get | check | migrate | version``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from broker import __version__

if TYPE_CHECKING:
    from broker.config import BrokerConfig

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="Sidecar credential broker for Apache Airflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="YAML config file (default: $BROKER_CONFIG, else the embedded default)")

    get = sub.add_parser("get", help="print one value from a running broker")
    get.add_argument("kind", choices=["connection", "variable", "config"])
    get.add_argument("name")
    target = get.add_mutually_exclusive_group()
    target.add_argument(
        "--socket", help="API socket (default: $BROKER_SOCKET, ./broker.sock if present, else /run/broker/broker.sock)"
    )
    target.add_argument("--url", help="loopback TCP listener, e.g. http://127.0.0.1:8201")
    get.add_argument("--token-file", help="file holding the X-Broker-Token for --url")
    get.add_argument("--timeout", type=float, default=5.0)
    get.add_argument("--pod-token-file", help="node mode: the pod's projected service-account token for the broker")

    check = sub.add_parser("check", help="validate the config and log in to every backend once")
    check.add_argument("--config", help="YAML config file (default: $BROKER_CONFIG, else the embedded default)")
    check.add_argument("--validate-only", action="store_true", help="validate the config without contacting backends")
    check.add_argument(
        "--strict", action="store_true", help="also fail on warnings, such as a backend that can serve nothing"
    )

    mig = sub.add_parser(
        "migrate", help="write the broker.yaml equivalent to Airflow's provider secrets backend settings"
    )
    mig.add_argument(
        "--airflow-cfg", help="airflow.cfg to read (the AIRFLOW__SECRETS__*/WORKERS__* env applies over it)"
    )
    mig.add_argument("--output", default="broker.yaml", help="where to write the broker config (default: broker.yaml)")
    mig.add_argument("--socket", default="/run/broker/broker.sock", help="the API socket to configure on both sides")
    mig.add_argument("--force", action="store_true", help="overwrite --output if it exists")

    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"broker {__version__}")
        return EXIT_OK
    if args.command == "get":
        return _get(args)
    if args.command == "check":
        return _check(args)
    if args.command == "migrate":
        return _migrate(args)
    return _serve(args)


def _load(path_arg: str | None) -> tuple[BrokerConfig, Path | None] | None:
    from broker.backends.base import ConfigurationError
    from broker.config import config_source, load_config

    path = config_source(path_arg)
    try:
        return load_config(path), path
    except ConfigurationError as exc:
        source = str(path) if path else "embedded default config"
        print(f"broker: invalid configuration ({source}):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from broker.app import serve
    from broker.backends.base import ConfigurationError
    from broker.logging import setup_logging
    from broker.server.listener import ListenError

    loaded = _load(args.config)
    if loaded is None:
        return EXIT_ERROR
    config, path = loaded
    setup_logging(config.logging.level)
    try:
        return serve(config, path)
    except (ListenError, ConfigurationError) as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"broker: cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _default_socket() -> str:
    env = os.environ.get("BROKER_SOCKET")
    if env:
        return env
    if Path("broker.sock").exists():
        return "./broker.sock"
    from broker.client import DEFAULT_SOCKET

    return DEFAULT_SOCKET


def _get(args: argparse.Namespace) -> int:
    from broker.client import BrokerClient, BrokerClientError

    token = None
    if args.url:
        if not args.token_file:
            print("broker get: --url needs --token-file", file=sys.stderr)
            return EXIT_ERROR
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"broker get: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
            return EXIT_ERROR
    try:
        client = BrokerClient(
            socket_path=None if args.url else (args.socket or _default_socket()),
            url=args.url,
            token=token,
            timeout=args.timeout,
            pod_token_file=args.pod_token_file,
        )
        value = client.get(args.kind, args.name)
    except (BrokerClientError, ValueError) as exc:
        print(f"broker get: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if value is None:
        print(f"broker get: {args.kind} {args.name!r} not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    sys.stdout.write(value + "\n")
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    import yaml

    from broker.backends.base import ConfigurationError
    from broker.config import validate_config
    from broker.migrate import MigrateError, migrate

    output = Path(args.output)
    if output.exists() and not args.force:
        print(f"broker migrate: {output} exists (--force to overwrite)", file=sys.stderr)
        return EXIT_ERROR
    try:
        result = migrate(Path(args.airflow_cfg) if args.airflow_cfg else None, os.environ, args.socket)
    except (MigrateError, OSError) as exc:
        print(f"broker migrate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    notices: list[str] = []
    try:
        # What is written is what broker serve accepts; its warnings (deprecated kwargs) become notes.
        validate_config(result.config, notices=notices)
    except ConfigurationError as exc:
        print("broker migrate: the equivalent config does not validate:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_ERROR
    output.write_text(yaml.safe_dump(result.config, sort_keys=False), encoding="utf-8")
    print(f"# wrote {output}; switch Airflow to the broker with:")
    for key, value in result.airflow_settings.items():
        print(f"{key}='{value}'")
    for note in [*result.notes, *notices]:
        print(f"note: {note}", file=sys.stderr)
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_ERROR
    config, _ = loaded
    if args.validate_only:
        print(
            f"config ok: {len(config.backends)} backend(s): "
            + ", ".join(f"{b.name} ({b.type})" for b in config.backends)
        )
        return EXIT_OK
    return asyncio.run(_check_backends(config, strict=args.strict))


def _check_local_files(config: BrokerConfig) -> tuple[bool, bool]:
    """Print a line per file the daemon reads or writes at start (the listener's token, the audit key and
    output); (all usable, some warned)."""
    from broker.app import read_token
    from broker.audit import read_hmac_key
    from broker.backends.base import ConfigurationError

    ok, warned = True, False
    readers = []
    if config.listen.tcp is not None and config.listen.token_file is not None:
        readers.append(("listen.token_file", config.listen.token_file, read_token))
    if config.audit.enabled and config.audit.name_hmac_key_file is not None:
        readers.append(("audit.name_hmac_key_file", config.audit.name_hmac_key_file, read_hmac_key))
    for key, path, read in readers:
        try:
            read(path)
        except ConfigurationError as exc:
            ok = False
            print(f"FAIL  {exc.errors[0]}")
        else:
            print(f"ok    {key}: {path}")
    output = config.audit.output
    if config.audit.enabled and isinstance(output, Path):
        writable = os.access(output, os.W_OK) if output.exists() else os.access(output.parent, os.W_OK | os.X_OK)
        if writable:
            print(f"ok    audit.output: {output}")
        else:
            warned = True
            print(f"WARN  audit.output: cannot write {output}: its lines would be dropped and counted")
    return ok, warned


async def _check_backends(config: object, *, strict: bool) -> int:
    from broker.backends.base import BackendContext, BrokerError
    from broker.clock import SystemClock
    from broker.config import BrokerConfig
    from broker.metrics import Metrics
    from broker.state import build_guards

    assert isinstance(config, BrokerConfig)
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="broker-check")
    ctx = BackendContext(executor=executor, clock=SystemClock(), metrics=Metrics())
    ok, warned = _check_local_files(config)
    try:
        for guard in build_guards(config.backends, ctx):
            label = f"{guard.name} ({guard.backend.config.type})"
            try:
                detail = await guard.check()
            except BrokerError as exc:
                ok = False
                print(f"FAIL  {label}: {exc.code}: {exc.message}")
            else:
                print(f"ok    {label}: {detail}")
                for warning in guard.backend.check_warnings():
                    warned = True
                    print(f"WARN  {label}: {warning}")
            finally:
                await guard.aclose()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    if warned and ok:
        print("warnings found" + (": failing under --strict" if strict else " (--strict makes them fail)"))
    return EXIT_OK if ok and not (strict and warned) else EXIT_ERROR
