"""What the process loads: cloud SDKs only for configured backends, and botocore's data held once, trimmed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import validate_config

SDKS = ("boto3", "botocore", "google", "azure", "hvac", "s3transfer")


def _loaded_after(code: str, cwd: Path) -> list[str]:
    """The SDK modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = code + (
        f"\nimport sys, json\ntops = {SDKS!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in tops)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def test_cli_and_a_file_only_start_import_no_cloud_sdk(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"a": "postgres://u:p@h/db"}')
    (tmp_path / "broker.yaml").write_text(
        "backends:\n  - {name: files, type: file, connections_file_path: c.json}\n"
        f"listen: {{socket: {tmp_path / 'b.sock'}}}\n"
    )
    # Everything a file-only `broker serve` builds before it listens: CLI, app, config, state, servers.
    code = (
        "import broker.cli, broker.app, broker.server.fast\n"
        "from pathlib import Path\n"
        "from broker.config import load_config\n"
        "from broker.state import BrokerState\n"
        "state = BrokerState(load_config(Path('broker.yaml')))\n"
        "assert [g.name for g in state.guards] == ['files']\n"
    )
    assert _loaded_after(code, tmp_path) == []


def test_aws_backends_share_one_botocore_loader_with_a_trimmed_endpoints_table() -> None:
    pytest.importorskip("botocore")
    from broker.backends.aws_common import SERVICES, shared_loader

    loader = shared_loader(None)
    assert shared_loader(None) is loader
    endpoints = loader.load_data("endpoints")
    assert {p["partition"] for p in endpoints["partitions"]} >= {"aws", "aws-cn", "aws-us-gov"}
    assert set().union(*(p["services"] for p in endpoints["partitions"])) <= SERVICES
    assert "secretsmanager" in endpoints["partitions"][0]["services"]
    assert loader.load_data("endpoints") is endpoints  # parsed and trimmed once


@pytest.mark.parametrize("region", ["us-east-1", "cn-north-1", "us-gov-west-1"])
def test_clients_on_the_trimmed_table_resolve_regional_endpoints(region: str) -> None:
    pytest.importorskip("botocore")
    import botocore.session

    from broker.backends.aws_common import shared_loader

    session = botocore.session.Session()
    session.register_component("data_loader", shared_loader(None))
    suffix = ".amazonaws.com.cn" if region.startswith("cn-") else ".amazonaws.com"
    for service in ("secretsmanager", "ssm", "sts"):
        client = session.create_client(
            service, region_name=region, aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        assert client.meta.endpoint_url == f"https://{service}.{region}{suffix}"


def test_role_session_name_length_is_bounded() -> None:
    base = {"name": "sm", "type": "aws_secrets_manager", "region_name": "us-east-1"}
    for name in ("ab", "x" * 64, "airflow-broker@team.example"):
        validate_config({"backends": [{**base, "role_session_name": name}]})
    for bad in ("a", "x" * 65, "has space"):
        with pytest.raises(Exception, match="role_session_name"):
            validate_config({"backends": [{**base, "role_session_name": bad}]})


def test_aws_service_models_keep_only_the_operations_the_broker_calls() -> None:
    pytest.importorskip("botocore")
    from broker.backends.aws_common import OPERATIONS, shared_loader

    loader = shared_loader(None)
    for service, operations in OPERATIONS.items():
        model = loader.load_service_model(service, "service-2")
        assert set(model["operations"]) == operations
        shapes = model["shapes"]
        for op in model["operations"].values():
            for ref in (op.get("input"), op.get("output"), *op.get("errors", [])):
                assert ref is None or ref["shape"] in shapes
        assert not any("documentation" in shape for shape in shapes.values())
        assert loader.load_service_model(service, "service-2") is model  # trimmed once


def test_an_aws_client_on_the_trimmed_model_serialises_and_parses_its_calls() -> None:
    pytest.importorskip("botocore")
    import botocore.session
    from botocore.stub import Stubber

    from broker.backends.aws_common import shared_loader

    session = botocore.session.Session()
    session.register_component("data_loader", shared_loader(None))
    client = session.create_client(
        "ssm", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    with Stubber(client) as stub:
        stub.add_response(
            "get_parameter",
            {"Parameter": {"Name": "/a", "Type": "SecureString", "Value": "v", "Version": 3}},
            {"Name": "/a", "WithDecryption": True},
        )
        assert client.get_parameter(Name="/a", WithDecryption=True)["Parameter"]["Version"] == 3
    assert not hasattr(client, "put_parameter")


def _botocore_data(name: str) -> str:
    import gzip

    import botocore

    base = Path(botocore.__file__).parent / "data"
    plain = base / f"{name}.json"
    if plain.exists():
        return plain.read_text(encoding="utf-8")
    [packed] = base.glob(f"{name}.json.gz")
    return gzip.decompress(packed.read_bytes()).decode("utf-8")


def _without_docs(node: object) -> object:
    if isinstance(node, dict):
        return {k: _without_docs(v) for k, v in node.items() if k not in ("documentation", "documentationUrl")}
    if isinstance(node, list):
        return [_without_docs(v) for v in node]
    return node


def test_the_endpoints_table_read_member_by_member_is_the_full_table_filtered() -> None:
    pytest.importorskip("botocore")
    from broker.backends.aws_common import SERVICES, endpoints_for

    text = _botocore_data("endpoints")
    full = json.loads(text)
    expected = {
        **full,
        "partitions": [
            {**p, "services": {k: v for k, v in p["services"].items() if k in SERVICES}} for p in full["partitions"]
        ],
    }
    assert json.dumps(endpoints_for(text, SERVICES)) == json.dumps(expected)


@pytest.mark.parametrize("service", ["secretsmanager", "ssm", "sts"])
def test_a_model_read_shape_by_shape_keeps_what_its_operations_reach(service: str) -> None:
    pytest.importorskip("botocore")
    from botocore.loaders import Loader

    from broker.backends.aws_common import OPERATIONS, model_for

    version = Loader().determine_latest_version(service, "service-2")
    text = _botocore_data(f"{service}/{version}/service-2")
    full: dict = json.loads(text)  # type: ignore[type-arg]
    shapes = full["shapes"]
    reach = [n for n, s in shapes.items() if s.get("exception")]
    for name in OPERATIONS[service]:
        op = full["operations"][name]
        reach += [ref["shape"] for ref in (op.get("input"), op.get("output"), *op.get("errors", [])) if ref]
    kept: set[str] = set()
    while reach:
        name = reach.pop()
        if name not in kept:
            kept.add(name)
            shape = shapes[name]
            links = [shape.get("member"), shape.get("key"), shape.get("value"), *shape.get("members", {}).values()]
            reach += [ref["shape"] for ref in links if ref]
    expected = {
        **full,
        "operations": {n: op for n, op in full["operations"].items() if n in OPERATIONS[service]},
        "shapes": {n: shapes[n] for n in sorted(kept)},
    }
    assert json.dumps(model_for(text, OPERATIONS[service])) == json.dumps(_without_docs(expected))


@pytest.mark.parametrize(
    "text", ["", "[]", '{"partitions": [{"services": {"sts": }}]}', '{"a": 1', '{"a": 1} x', "{1: 2}"]
)
def test_a_table_that_is_not_json_is_an_error(text: str) -> None:
    from broker.backends.aws_common import SERVICES, endpoints_for, model_for

    with pytest.raises(ValueError, match=r"\S"):
        endpoints_for(text, SERVICES)
    with pytest.raises(ValueError, match=r"\S"):
        model_for(text, frozenset({"GetParameter"}))
