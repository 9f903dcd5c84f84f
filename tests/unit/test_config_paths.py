"""Every path a config file names is taken from that file's directory, whatever the current directory.

The path-valued keys are read from the models (``BrokerConfig`` and every backend type's ``config_model``),
so a key added later is covered here without being listed: a ``Path`` key is checked to be re-rooted, and a
key whose name says it holds a local file but whose type is not ``Path`` fails.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from broker.backends import REGISTRY, load_type
from broker.config import BrokerConfig, load_config
from broker.node.config import identity_chain
from tests.unit.test_config_keys import _models

# A key named like this holds a local file, so it must be typed Path (the type is what re-roots it).
LOCAL_FILE_NAME = re.compile(r"(^|_)(file|path|dir|socket|cert|output|bundle)s?$")
# Keys named like files that hold something else: paths inside a store, or a flag.
NOT_LOCAL_FILES = {
    "listen.fast_path": "a flag",
    "backends[vault].connections_path": "a path in Vault",
    "backends[vault].variables_path": "a path in Vault",
    "backends[vault].config_path": "a path in Vault",
    "backends[vault].global_secrets_path": "a path in Vault",
    "backends[vault].use_team_secrets_path": "a flag",
    "backends[vault].dynamic_connections.path": "a path in Vault",
}
# The smallest valid config of each part, which the key under test is added to.
BACKENDS: dict[str, dict[str, Any]] = {
    "file": {},
    "env": {},
    "vault": {
        "url": "http://127.0.0.1:8200",
        "auth": {"method": "approle", "role_id_file": "/r", "secret_id_file": "/s"},
    },
    "aws_secrets_manager": {"region_name": "eu-west-1"},
    "aws_ssm": {"region_name": "eu-west-1"},
    "gcp_secret_manager": {"project_id": "my-project"},
    "azure_key_vault": {"vault_url": "https://kv.vault.azure.net"},
}
NODE_BACKEND = {
    "name": "vault",
    "type": "vault",
    "url": "http://127.0.0.1:8200",
    "auth": {"method": "kubernetes", "role": "airflow"},
}


def node_document(**identity: Any) -> dict[str, Any]:
    return {
        "listen": {"socket": "/run/broker/broker.sock"},
        "node": {"identities": [{"namespace": "airflow", "service_account": "a", "backends": ["vault"], **identity}]},
        "backends": [NODE_BACKEND],
    }


def _has(annotation: Any, kind: type) -> bool:
    return annotation is kind or any(_has(arg, kind) for arg in typing.get_args(annotation))


def _keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted key, key, annotation) for every key under ``model``."""
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", name, info.annotation
        for sub in _models(info.annotation):
            yield from _keys(sub, f"{prefix}{name}.")


def all_keys() -> list[tuple[str | None, str, str, Any]]:
    """(backend type or None, dotted key inside it, key, annotation) for every key the config accepts."""
    out: list[tuple[str | None, str, str, Any]] = [
        (None, *key) for key in _keys(BrokerConfig) if not key[0].startswith("backends")
    ]
    for type_name in REGISTRY:
        out.extend((type_name, *key) for key in _keys(load_type(type_name).config_model))
    return out


def shown(type_name: str | None, key: str) -> str:
    return key if type_name is None else f"backends[{type_name}].{key}"


def path_keys() -> list[tuple[str | None, str]]:
    keys = []
    for type_name, key, _, annotation in all_keys():
        if not _has(annotation, Path):
            continue
        if type_name is not None and key == "ca_cert" and not load_type(type_name).config_model.uses_tls:
            continue  # refused for the stores that open no connection
        keys.append((type_name, key))
    return keys


PATH_KEYS = path_keys()


def test_every_key_named_for_a_local_file_is_a_path() -> None:
    untyped = [
        shown(type_name, key)
        for type_name, key, name, annotation in all_keys()
        if LOCAL_FILE_NAME.search(name) and not _has(annotation, Path) and shown(type_name, key) not in NOT_LOCAL_FILES
    ]
    assert untyped == [], "type these keys Path (or Literal[...] | Path) so a relative value is re-rooted"
    core = {key for type_name, key in PATH_KEYS if type_name is None}
    assert {"listen.socket", "listen.token_file", "audit.output", "audit.name_hmac_key_file"} <= core
    assert {"node.kubernetes.token_path", "node.kubernetes.ca_cert"} <= core


def _set(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        document = document.setdefault(part, {})
    document[last] = value


def _get(model: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        model = getattr(model, part)
    return model


@pytest.mark.parametrize(("type_name", "key"), PATH_KEYS, ids=[shown(*k) for k in PATH_KEYS])
def test_a_relative_path_is_taken_from_the_config_files_directory(
    type_name: str | None, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = f"sub/{key.replace('.', '-')}"
    if type_name is None:
        document = node_document() if key.startswith("node.") else {"backends": [{"name": "f", "type": "file"}]}
        _set(document, key, relative)
    else:
        backend = {"name": "b", "type": type_name, **BACKENDS[type_name]}
        _set(backend, key, relative)
        document = {"backends": [backend]}
    (conf / "broker.yaml").write_text(yaml.safe_dump(document))
    monkeypatch.chdir(elsewhere)
    config = load_config(conf / "broker.yaml")
    value = _get(config if type_name is None else config.backends[0], key)
    assert value == conf / relative
    assert load_config(conf / "broker.yaml") == config  # a reload compares equal


def test_node_overrides_paths_are_taken_from_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {"vault": {"ca_cert": "ca/vault.pem", "auth": {"token_path": "tokens/a", "role": "other"}}}
    (tmp_path / "broker.yaml").write_text(yaml.safe_dump(node_document(overrides=overrides)))
    monkeypatch.chdir("/")
    config = load_config(tmp_path / "broker.yaml")
    assert config.node is not None
    [vault] = identity_chain(config.node.identities[0], config.backends)
    assert vault.ca_cert == tmp_path / "ca" / "vault.pem"
    auth = getattr(vault, "auth")
    assert (auth.token_path, auth.role) == (tmp_path / "tokens" / "a", "other")


def test_absolute_paths_and_defaults_stay_as_they_are(tmp_path: Path) -> None:
    document = node_document(overrides={"vault": {"ca_cert": "/etc/ssl/vault.pem"}})
    (tmp_path / "broker.yaml").write_text(yaml.safe_dump(document))
    config = load_config(tmp_path / "broker.yaml")
    assert config.node is not None
    assert config.node.kubernetes.token_path == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    [vault] = identity_chain(config.node.identities[0], config.backends)
    assert vault.ca_cert == Path("/etc/ssl/vault.pem")
    assert getattr(vault, "auth").token_path == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
