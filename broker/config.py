"""The YAML configuration: strict typed models, loading, and error messages that name their key path."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from broker.backends import EXTRAS, REGISTRY, load_type
from broker.backends.base import BackendConfig, ConfigurationError
from broker.configtypes import Duration, StrictModel, rooted
from broker.node.config import NodeConfig, anchor_overrides, node_errors
from broker.providerkw import translate

DEFAULT_SOCKET = Path("/run/broker/broker.sock")
M = TypeVar("M", bound=BaseModel)


def _parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _check_team(value: str) -> str:
    from broker.resolver import team_problem

    problem = team_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class PeerTeam(StrictModel):
    """One ``listen.peer_teams`` entry: callers on the unix socket with this uid (or gid) are bound to ``team``."""

    uid: int | None = Field(default=None, ge=0)
    gid: int | None = Field(default=None, ge=0)
    team: str

    _team_name = field_validator("team")(_check_team)

    @model_validator(mode="after")
    def _one_of_uid_gid(self) -> PeerTeam:
        if (self.uid is None) == (self.gid is None):
            raise ValueError("give exactly one of uid or gid")
        return self


class ListenConfig(StrictModel):
    """Where the secrets API listens: a unix socket, and optionally loopback TCP with a token."""

    socket: Path | None = DEFAULT_SOCKET
    socket_mode: int = 0o660
    allowed_uids: list[int] | None = None
    allowed_gids: list[int] | None = None
    tcp: str | None = None
    token_file: Path | None = None
    max_concurrency: int = Field(default=512, ge=1, le=100_000)
    max_connections: int = Field(default=1024, ge=1, le=100_000)
    header_timeout: Duration = Field(default=10.0, gt=0, le=300)
    max_body_bytes: int = Field(default=16_384, ge=256, le=1_048_576)
    fast_path: bool = True
    # Bind the secrets API to one Airflow team: requests with no team are served as this team's, requests
    # for another team get 403 (needs multi_team: true).
    team: str | None = None
    # Bind callers on the unix socket to a team by their uid or gid (SO_PEERCRED); a uid's entry wins over a
    # gid's, and a caller matching none gets ``team`` (null: not bound). Needs multi_team: true.
    peer_teams: list[PeerTeam] = []

    @field_validator("team")
    @classmethod
    def _team_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_team(value)

    @field_validator("peer_teams")
    @classmethod
    def _one_team_per_id(cls, value: list[PeerTeam]) -> list[PeerTeam]:
        seen: dict[tuple[str, int], int] = {}
        for i, entry in enumerate(value):
            key = ("uid", entry.uid) if entry.uid is not None else ("gid", entry.gid or 0)
            if key in seen:
                raise ValueError(f"[{i}] binds {key[0]} {key[1]} again (already bound by [{seen[key]}])")
            seen[key] = i
        return value

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                raise ValueError(f'socket_mode must be an octal string like "0660", got {value!r}') from None
        if isinstance(value, int) and not 0 <= value <= 0o777:
            raise ValueError("socket_mode must be between 0000 and 0777")
        return value

    @field_validator("tcp")
    @classmethod
    def _loopback_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _ = _parse_hostport(value, "tcp")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"tcp must bind an IP literal on loopback (127.0.0.1 or ::1), got {host!r}") from None
        if not address.is_loopback:
            raise ValueError(f"tcp must bind loopback only (127.0.0.1 or ::1), got {host!r}")
        return value

    @model_validator(mode="after")
    def _needs_a_listener(self) -> ListenConfig:
        if self.socket is None and self.tcp is None:
            raise ValueError("set socket or tcp: the secrets API needs a listener")
        if self.tcp is not None and self.token_file is None:
            raise ValueError("token_file is required when tcp is set")
        return self

    def served_teams(self) -> list[str | None]:
        """Every team a caller can be served as, each once: ``team`` (the TCP listener's, and that of callers
        no ``peer_teams`` entry binds), then the teams of ``peer_teams`` in order."""
        return list(dict.fromkeys([self.team, *(entry.team for entry in self.peer_teams)]))

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return _parse_hostport(self.tcp, "tcp") if self.tcp else None


class MetricsConfig(StrictModel):
    listen: str | None = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _hostport(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_hostport(value, "listen")
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        return _parse_hostport(self.listen, "listen") if self.listen else None


class CacheConfig(StrictModel):
    ttl: Duration = Field(default=300.0, gt=0, le=86_400 * 7)
    max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    refresh_ahead: float = Field(default=0.75, ge=0.0, lt=1.0)
    max_stale: Duration = Field(default=3600.0, ge=0, le=86_400 * 7)
    negative_ttl: Duration = Field(default=30.0, ge=0, le=86_400)
    negative_max_entries: int = Field(default=1000, ge=1, le=10_000_000)
    refresh_jitter: float = Field(default=0.1, ge=0.0, le=0.5)


class PrefetchConfig(StrictModel):
    connections: list[str] = []
    variables: list[str] = []
    config: list[str] = []


class LeasesConfig(StrictModel):
    renew_at: float = Field(default=2 / 3, gt=0.1, lt=0.95)
    revoke_on_shutdown: bool = True
    idle_timeout: Duration | None = None


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class AuditConfig(StrictModel):
    """The audit trail of reads (``broker.audit``): one JSON line per secret lookup, never a value."""

    enabled: bool = False
    output: Literal["stderr", "stdout"] | Path = "stderr"  # a stream, or a file path
    name_hmac_key_file: Path | None = None  # log hmac-sha256(key, name) instead of the name
    queue_size: int = Field(default=65_536, ge=100, le=10_000_000)
    readiness: bool = False  # /readyz fails while the stream cannot be written

    @field_validator("output", mode="before")
    @classmethod
    def _stream_or_path(cls, value: Any) -> Any:
        if value in ("stderr", "stdout") or isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'output must be "stderr", "stdout" or a file path, got {value!r}')
        return Path(value)


class ShutdownConfig(StrictModel):
    grace: Duration = Field(default=20.0, ge=0, le=600)
    drain_delay: Duration = Field(default=0.5, ge=0, le=30)


class BrokerConfig(StrictModel):
    listen: ListenConfig = ListenConfig()
    metrics: MetricsConfig = MetricsConfig()
    cache: CacheConfig = CacheConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    leases: LeasesConfig = LeasesConfig()
    logging: LoggingConfig = LoggingConfig()
    audit: AuditConfig = AuditConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    threads: int = Field(default=16, ge=1, le=256)
    # Airflow's [core] multi_team: turns on the providers' team rules (team-scoped paths, ambiguous ids refused).
    multi_team: bool = False
    node: NodeConfig | None = None
    backends: list[BackendConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _team_needs_multi_team(self) -> BrokerConfig:
        if self.listen.team is not None and not self.multi_team:
            raise ValueError("listen.team binds the API to an Airflow team: set multi_team: true as well")
        if self.listen.peer_teams and not self.multi_team:
            raise ValueError("listen.peer_teams binds callers to Airflow teams: set multi_team: true as well")
        return self

    def backend(self, name: str) -> BackendConfig:
        return next(b for b in self.backends if b.name == name)


def embedded_default() -> dict[str, Any]:
    """The configuration used when neither --config nor $BROKER_CONFIG is given."""
    return {
        "listen": {"socket": "./broker.sock"},
        "metrics": {"listen": "127.0.0.1:9464"},
        "backends": [
            {
                "name": "local",
                "type": "file",
                "connections_file_path": "./secrets/connections",
                "variables_file_path": "./secrets/variables",
                "config_file_path": "./secrets/config",
            }
        ],
    }


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown key"
    msg: str = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg[:1].lower() + msg[1:]


def _errors(exc: ValidationError, prefix: tuple[int | str, ...] = ()) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        out.append(f"{_loc(prefix + loc)}: {_message(err)}")
    return out


def validate_config(data: Any, *, notices: list[str] | None = None) -> BrokerConfig:
    """Validate a parsed document. Raises ConfigurationError listing every problem at once.

    The warnings for ignored and deprecated provider kwargs are logged, or appended to ``notices`` when given.
    """
    if not isinstance(data, dict):
        raise ConfigurationError(["(top level): expected a mapping of keys"])
    errors: list[str] = []
    raw_backends = data.get("backends")
    backends: list[BackendConfig] = []
    if raw_backends is None:
        errors.append("backends: field required")
    elif not isinstance(raw_backends, list) or not raw_backends:
        errors.append("backends: expected a non-empty list of backends")
    else:
        seen: dict[str, int] = {}
        for i, raw in enumerate(raw_backends):
            backend = _validate_backend(i, raw, errors, notices)
            if backend is None:
                continue
            if backend.name in seen:
                errors.append(
                    f"backends[{i}].name: duplicate backend name {backend.name!r} (also backends[{seen[backend.name]}])"
                )
            seen[backend.name] = i
            backends.append(backend)
    rest = {k: v for k, v in data.items() if k != "backends"}
    try:
        top = BrokerConfig.model_validate({**rest, "backends": [{"name": "placeholder", "type": "file"}]})
    except ValidationError as exc:
        errors.extend(_errors(exc))
        top = None
    if top is not None:
        errors.extend(_prefetch_errors(top))
    if errors or top is None:
        raise ConfigurationError(errors)
    config = top.model_copy(update={"backends": backends})
    errors.extend(node_errors(config))
    if errors:
        raise ConfigurationError(errors)
    return config


def _prefetch_errors(config: BrokerConfig) -> list[str]:
    from broker.resolver import name_problem

    out = []
    names = 0
    for kind in ("connections", "variables", "config"):
        names += len(set(getattr(config.prefetch, kind)))
        for i, name in enumerate(getattr(config.prefetch, kind)):
            problem = name_problem(name)
            if problem:
                out.append(f"prefetch.{kind}[{i}]: {problem}")
    teams = len(config.listen.served_teams())
    if names * teams > config.cache.max_entries:
        out.append(
            f"prefetch: {names} names warmed for each of {teams} teams (listen.team and listen.peer_teams) make "
            f"{names * teams} entries, more than cache.max_entries ({config.cache.max_entries})"
        )
    return out


def _validate_backend(i: int, raw: Any, errors: list[str], notices: list[str] | None) -> BackendConfig | None:
    where = f"backends[{i}]"
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping")
        return None
    type_name = raw.get("type")
    if type_name is None:
        errors.append(f"{where}.type: field required")
        return None
    if type_name not in REGISTRY:
        errors.append(f"{where}.type: unknown backend type {type_name!r}; expected one of {', '.join(REGISTRY)}")
        return None
    try:
        model = load_type(type_name).config_model
    except ImportError as exc:
        if exc.name == REGISTRY[type_name]:
            errors.append(f"{where}.type: backend type {type_name!r} is not part of this build")
            return None
        extra = EXTRAS.get(type_name)
        hint = f" (install credential-broker[{extra}])" if extra else ""
        errors.append(f"{where}.type: backend type {type_name!r} is not available: {exc.name or exc}{hint}")
        return None
    raw = translate(raw, model.provider_kwargs, where, errors, notices)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors.extend(_errors(exc, ("backends", i)))
        return None


def read_config_file(path: Path) -> Any:
    """Parse YAML. Raises ConfigurationError naming the file and the line on a syntax error."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigurationError([f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from None


def config_source(cli_path: str | None) -> Path | None:
    """--config, else $BROKER_CONFIG, else None (the embedded default)."""
    if cli_path:
        return Path(cli_path)
    env = os.environ.get("BROKER_CONFIG")
    return Path(env) if env else None


def load_config(path: Path | None) -> BrokerConfig:
    """Load and validate; None means the embedded default. Raises ConfigurationError.

    Relative paths in a config file are taken from the file's directory (``rooted``), so a config works
    whatever the current directory; the embedded default keeps resolving against the current directory.
    """
    if path is None:
        return validate_config(embedded_default())
    config = validate_config(read_config_file(path))
    return anchor_config(config, path.parent.absolute())


def anchor_config(config: BrokerConfig, base: Path) -> BrokerConfig:
    """``config`` with every relative path in it under ``base``: the models' ``Path`` keys, and the paths in
    node mode's per-identity overrides (raw mappings, read through the backend models they merge into)."""
    config = anchor_paths(config, base)
    if config.node is not None:
        config = config.model_copy(update={"node": anchor_overrides(config.node, config.backends, base)})
    return config


def anchor_paths(model: M, base: Path) -> M:
    """Return ``model`` with every relative ``Path`` in it (nested models, lists, mappings) under ``base``."""

    def anchor(value: Any) -> Any:
        if isinstance(value, Path):
            return rooted(value, base)
        if isinstance(value, BaseModel):
            return anchor_paths(value, base)
        if isinstance(value, list):
            return [anchor(v) for v in value]
        if isinstance(value, dict):
            return {k: anchor(v) for k, v in value.items()}
        return value

    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        anchored = anchor(value)
        if anchored is not value:
            update[name] = anchored
    return model.model_copy(update=update) if update else model
