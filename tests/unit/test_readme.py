"""The README as a new user reads it: the quickstart's two commands, the example config shown verbatim, and a
configuration reference that shows the defaults except where a line says it is an example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from broker.config import embedded_default, validate_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_quickstart_keeps_exactly_make_run_and_make_test() -> None:
    first = blocks(section("Quickstart"), "sh")[0]
    commands = [line.split("#", 1)[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]


def test_make_run_serves_examples_on_the_socket_the_readme_uses() -> None:
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), flags=re.M)
    assert recipe is not None and "cd examples && " in recipe.group(1) and "--config" not in recipe.group(1)
    socket = Path(embedded_default()["listen"]["socket"])
    assert not socket.is_absolute()
    used = set(re.findall(r"--socket ([^\s;]+)", section("Quickstart")))
    assert used == {str(Path("examples") / socket)}
    for backend in embedded_default()["backends"]:
        for key in ("connections_file_path", "variables_file_path", "config_file_path"):
            stem = ROOT / "examples" / backend[key]
            assert any(stem.with_name(stem.name + s).is_file() for s in (".json", ".yaml", ".env")), stem


def test_the_example_config_is_shown_verbatim() -> None:
    shown = blocks(section("Quickstart"), "yaml")
    assert (ROOT / "examples" / "broker.yaml").read_text() in shown


def _line_of(block: str, section_name: str, key: str) -> str:
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split("#")[0].rstrip() == f"{section_name}:")
    for line in lines[start + 1 :]:
        if re.match(rf"^\s*{re.escape(key)}:", line):
            return line
        if section_name and re.match(r"^\S", line):
            break
    raise AssertionError(f"{section_name}.{key} not in the reference block")


def _top_line(block: str, key: str) -> str:
    return next(line for line in block.splitlines() if line.startswith(f"{key}:"))


def _differs(shown: Any, default: Any) -> bool:
    if isinstance(shown, float) and isinstance(default, float):
        return abs(shown - default) > 5e-4  # 0.667 stands for 2/3
    return bool(shown != default)


def test_reference_config_shows_the_defaults_or_says_it_is_an_example() -> None:
    block = blocks(section("Configuration"), "yaml")[0]
    doc: dict[str, Any] = yaml.safe_load(block)
    shown = validate_config(doc)
    defaults = validate_config({"backends": doc["backends"]})
    checked = 0
    for name, value in doc.items():
        if name == "backends":
            continue
        keys = value.keys() if isinstance(value, dict) else [None]
        for key in keys:
            if key is None:
                differs = _differs(getattr(shown, name), getattr(defaults, name))
                line = _top_line(block, name)
            else:
                differs = _differs(getattr(getattr(shown, name), key), getattr(getattr(defaults, name), key))
                line = _line_of(block, name, key)
            checked += 1
            if differs:
                assert "# example: default " in line, f"{name}.{key} differs from its default: {line!r}"
            else:
                assert "# example:" not in line, f"{name}.{key} is the default but marked as an example"
    scalars = [n for n, v in doc.items() if n != "backends" and not isinstance(v, dict)]
    every_field = sum(len(type(getattr(defaults, n)).model_fields) for n in doc if n != "backends" and n not in scalars)
    assert checked == every_field + len(scalars)  # every key of every section is shown, and the top-level ones
    assert {"threads", "multi_team"} <= set(scalars)
