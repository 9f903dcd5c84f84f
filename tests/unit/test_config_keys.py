"""Every key the config accepts is documented and has an effect.

Walks the pydantic models (``broker/config.py``, ``broker/configtypes.py``, ``broker/node/config.py`` and
every backend type's ``config_model``) and fails for a key that is not documented (README's configuration
reference, or the store's page under docs/) or that nothing in ``broker/`` reads outside the config models
themselves (their validators do not count: a key only a validator looks at changes nothing).
"""

from __future__ import annotations

import ast
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from broker.backends import REGISTRY, load_type
from broker.config import BrokerConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "broker"
README = (ROOT / "README.md").read_text()
PAGES = {
    "vault": "vault.md",
    "aws_secrets_manager": "aws.md",
    "aws_ssm": "aws.md",
    "gcp_secret_manager": "gcp.md",
    "azure_key_vault": "azure.md",
}
# Where the top-level sections are documented, besides the README's reference block.
SECTION_PAGES = {"node": "node-mode.md", "audit": "audit.md", "listen": "airflow.md"}
KINDS = ("connections", "variables", "config")


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation holds (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def keys_of(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, type[BaseModel]]]:
    """(key path, key, the model that declares it) for every key under ``model``."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, name, model
        for sub in _models(info.annotation):
            yield from keys_of(sub, f"{path}.")


def core_keys() -> list[tuple[str, str, type[BaseModel]]]:
    return [k for k in keys_of(BrokerConfig) if k[0].split(".")[0] != "backends"]


def backend_keys() -> list[tuple[str, str, str, type[BaseModel]]]:
    out = []
    for type_name in REGISTRY:
        model = load_type(type_name).config_model
        for path, key, owner in keys_of(model):
            # ``ca_cert`` on a store that opens no connection is refused by the model (``uses_tls``)
            if key not in ("name", "type") and (path != "ca_cert" or model.uses_tls):
                out.append((type_name, path, key, owner))
    return out


def _config_model_names() -> set[str]:
    names = {owner.__name__ for _, _, owner in core_keys()} | {"BrokerConfig", "StrictModel"}
    names |= {owner.__name__ for _, _, _, owner in backend_keys()}
    return names


def _is_validator(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for decorator in fn.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
        if name.endswith("validator"):
            return True
    return False


def reads_in(tree: ast.AST, models: set[str]) -> set[str]:
    """Attribute names read in ``tree`` outside the config models' validators, plus names read dynamically:
    ``getattr(obj, "key")`` and ``layout_key(config, kind, "suffix")`` (``connections_suffix`` and so on)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_ClassDef(self, node: ast.ClassDef) -> None:
            if node.name not in models:
                self.generic_visit(node)
                return
            # A model's own properties and methods (``VaultAuth.mount_path``) are how the rest of the code
            # reads some keys; its validators only check values and do not count.
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and not _is_validator(item):
                    self.visit(item)

        def visit_Attribute(self, node: ast.Attribute) -> None:
            found.add(node.attr)
            self.generic_visit(node)

        def visit_Call(self, node: ast.Call) -> None:
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            consts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if func == "getattr" and consts:
                found.add(consts[0])
            if func == "layout_key" and consts:
                found.update(f"{kind}_{consts[-1]}" for kind in KINDS)
            self.generic_visit(node)

    Visitor().visit(tree)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


TREES = {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}
MODELS = _config_model_names()
READS = {name: reads_in(tree, MODELS) for name, tree in TREES.items()}
# Modules every backend runs through (the core), as opposed to one store's own modules and node mode's.
SHARED = {
    name
    for name in TREES
    if not name.startswith(("broker.backends.", "broker.identity.", "broker.node"))
    or name in ("broker.backends", "broker.backends.base", "broker.backends.guard")
}


def _imports(name: str) -> set[str]:
    out = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("broker"):
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("broker"))
    return out & set(TREES)


def closure(module: str) -> set[str]:
    """``module`` and every broker module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imports(name))
    return seen


def read_anywhere(key: str) -> bool:
    return any(key in found for found in READS.values())


def read_for_type(type_name: str, key: str) -> bool:
    """Read by the core or by the modules this store type runs (not by another store's, nor node mode's)."""
    return any(key in READS[name] for name in SHARED | closure(REGISTRY[type_name]))


def documented(key: str, text: str) -> bool:
    """``key`` appears as code (`` `key` `` or inside a code span) or as a YAML key (``key:``)."""
    pattern = rf"(`[^`\n]*\b{re.escape(key)}\b[^`\n]*`|^\s*-?\s*{re.escape(key)}:|[{{,]\s*{re.escape(key)}:)"
    return re.search(pattern, text, flags=re.M) is not None


def _page(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def _yaml_blocks(text: str) -> list[Any]:
    out = []
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        try:
            out.append(yaml.safe_load(block))
        except yaml.YAMLError:
            continue
    return out


def _holds(doc: Any, parts: list[str]) -> bool:
    """``doc`` has the nested key ``parts`` (in any entry of a list on the way)."""
    if not parts:
        return True
    if isinstance(doc, list):
        return any(_holds(item, parts) for item in doc)
    return isinstance(doc, dict) and parts[0] in doc and _holds(doc[parts[0]], parts[1:])


REFERENCE = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", README[README.index("\n## Configuration\n") :], re.S)[0])


def core_documented(path: str) -> bool:
    """``path`` (``cache.negative_ttl``) is in README's reference block, in a YAML example of its section's page,
    or named in full (`` `node.same_node: true` ``) in either."""
    parts = path.split(".")
    page = _page(SECTION_PAGES[parts[0]]) if parts[0] in SECTION_PAGES else ""
    if _holds(REFERENCE, parts) or any(_holds(doc, parts) for doc in _yaml_blocks(page)):
        return True
    text = README + page
    if re.search(rf"`{re.escape(path)}\b[^`\n]*`", text):
        return True
    # a key of the entries of a list (``listen.peer_teams[].uid``): named on a page that names the list in full
    parent, leaf = ".".join(parts[:-1]), parts[-1]
    return len(parts) > 2 and bool(re.search(rf"`{re.escape(parent)}`", page)) and documented(leaf, page)


@pytest.mark.parametrize(("path", "key"), [(p, k) for p, k, _ in core_keys()])
def test_core_key_is_documented_and_read(path: str, key: str) -> None:
    assert core_documented(path), f"{path} is accepted but not documented in the configuration reference"
    assert read_anywhere(key), f"{path} is accepted but nothing in broker/ reads it"


@pytest.mark.parametrize(("type_name", "path", "key"), [(t, p, k) for t, p, k, _ in backend_keys()])
def test_backend_key_is_documented_and_read(type_name: str, path: str, key: str) -> None:
    # node mode's page documents the backend keys that exist for node mode only (``federation``)
    text = README + _page("node-mode.md") + (_page(PAGES[type_name]) if type_name in PAGES else "")
    assert documented(key, text), f"backends[type={type_name}].{path} is accepted but not documented"
    assert read_for_type(type_name, key), (
        f"backends[type={type_name}].{path} is accepted but nothing a {type_name} backend runs reads it"
    )


def test_a_key_only_a_validator_reads_counts_as_unread() -> None:
    source = """
class DemoConfig(StrictModel):
    checked: int = 0
    used: int = 0

    @field_validator("checked")
    @classmethod
    def _bound(cls, value):
        return min(value, cls.checked)

    @property
    def doubled(self):
        return self.used * 2
"""
    found = reads_in(ast.parse(source), {"DemoConfig"})
    assert "used" in found and "checked" not in found


def test_the_walk_sees_every_model() -> None:
    """The walk reaches nested models (vault's auth, the circuit breaker, node identities)."""
    paths = {p for p, _, _ in core_keys()} | {f"{t}:{p}" for t, p, _, _ in backend_keys()}
    for expected in ("cache.negative_ttl", "node.kubernetes.token_path", "node.identities.overrides"):
        assert expected in paths
    for expected in ("vault:auth.role", "vault:circuit_breaker.cooldown", "file:variables_file_path"):
        assert expected in paths
