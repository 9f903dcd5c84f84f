"""``type: file``: Airflow's LocalFilesystemBackend formats (``.json``, ``.yaml``/``.yml``, ``.env``).

Files are read on a cache miss and re-parsed only when their modification time or size changes, so a
mounted Kubernetes Secret that the kubelet updates is picked up at the next refresh.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import yaml

from broker.backends.base import Backend as BaseBackend
from broker.backends.base import (
    BackendConfig,
    BackendContext,
    BackendError,
    Kind,
    SecretNotFound,
    SecretValue,
    layout_key,
)
from broker.providerkw import Moves

SUFFIXES = (".json", ".yaml", ".yml", ".env")
_COMMENT = re.compile(r"\s*#")


class FileConfig(BackendConfig):
    # Airflow's LocalFilesystemBackend names the config file's kwarg in the plural.
    provider_kwargs = {"configs_file_path": Moves("config_file_path")}
    uses_tls = False
    type: Literal["file"]
    connections_file_path: Path | None = None
    variables_file_path: Path | None = None
    config_file_path: Path | None = None


def _parse_env(text: str, where: str) -> dict[str, Any]:
    """Airflow's ``.env`` rules exactly: key and value as written (no whitespace stripped: a value may end in
    a space), empty lines and ``#`` comment lines skipped, and any other line without ``=``, key or value
    fails the whole file, as it fails Airflow's LocalFilesystemBackend."""
    out: dict[str, list[str]] = defaultdict(list)
    for number, line in enumerate(text.splitlines(), 1):
        if not line or _COMMENT.match(line):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise BackendError(f"{where}:{number}: invalid line: expected KEY=VALUE")
        if not key:
            raise BackendError(f"{where}:{number}: invalid line: empty key")
        if not value:
            raise BackendError(f"{where}:{number}: invalid line: empty value")
        out[key].append(value)
    return dict(out)


def parse_secret_file(path: Path) -> dict[str, Any]:
    """The mapping a secrets file holds. Raises BackendError naming the file (never a value)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BackendError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BackendError(f"{path}: cannot read file ({type(exc).__name__})") from None
    suffix = path.suffix.lower()
    if suffix == ".env":
        return _parse_env(text, str(path))
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        raise BackendError(f"{path}: file is not valid {suffix.lstrip('.').upper()}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BackendError(f"{path}: file must hold a mapping of ids to values")
    return {str(k): v for k, v in data.items()}


class Backend(BaseBackend):
    config_model = FileConfig
    config: FileConfig

    def __init__(self, config: BackendConfig, ctx: BackendContext) -> None:
        super().__init__(config, ctx)
        self._parsed: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}

    def _configured(self, kind: Kind) -> Path | None:
        path: Path | None = layout_key(self.config, kind, "file_path")
        return path

    def locate(self, kind: Kind, name: str) -> str | None:
        return name if self._configured(kind) is not None else None

    def _resolve_file(self, kind: Kind) -> Path | None:
        """The configured path, or for a path without a known suffix the first of PATH.json/.yaml/.yml/.env."""
        path = self._configured(kind)
        if path is None or path.suffix.lower() in SUFFIXES:
            return path
        for suffix in SUFFIXES:
            candidate = path.with_name(path.name + suffix)
            if candidate.exists():
                return candidate
        return None

    def _load(self, kind: Kind) -> dict[str, Any]:
        path = self._resolve_file(kind)
        if path is None:
            return {}
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BackendError(f"{path}: file not found") from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._parsed.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        data = parse_secret_file(path)
        self._parsed[path] = (stamp, data)
        return data

    async def fetch(self, kind: Kind, path: str) -> SecretValue:
        data = await self.ctx.run_blocking(self._load, kind)
        if path not in data:
            raise SecretNotFound(f"{kind} not in {self.name}")
        value = data[path]
        if isinstance(value, list):
            if len(value) != 1:
                raise BackendError(f"{self.name}: {kind} {path!r} has {len(value)} values; expected one")
            value = value[0]
        if kind is Kind.CONNECTION:
            if not isinstance(value, str | dict):
                raise BackendError(f"{self.name}: connection {path!r} must be a URI or a mapping of fields")
            return SecretValue(value)
        if isinstance(value, str):
            return SecretValue(value)
        return (
            SecretValue(json.dumps(value, separators=(",", ":")))
            if isinstance(value, dict | list)
            else SecretValue(str(value))
        )

    async def start(self) -> None:
        for kind in Kind:
            await self.ctx.run_blocking(self._load, kind)

    async def check(self) -> str:
        await self.start()
        files = [str(p) for k in Kind if (p := self._resolve_file(k)) is not None]
        return "files: " + (", ".join(files) if files else "(none present)")

    def check_warnings(self) -> list[str]:
        configured = {k: p for k in Kind if (p := self._configured(k)) is not None}
        if not configured:
            return ["serves nothing: no connections_file_path, variables_file_path or config_file_path is set"]
        if any(self._resolve_file(k) is not None for k in configured):
            return []
        tried = ", ".join(
            str(p) if p.suffix.lower() in SUFFIXES else f"{p}{{{','.join(SUFFIXES)}}}" for p in configured.values()
        )
        return [f"serves nothing: none of its files exists ({tried})"]
